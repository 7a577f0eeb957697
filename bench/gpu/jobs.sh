# GPU jobs for the open issues, after `source bench/gpu/setup.sh` (bench/gpu/README.md). Each writes to $OUT
# (at most 8 files come back, 16 MiB each). TRAINER=trainers/cpu.yaml tries them on a CPU.
#   source bench/gpu/jobs.sh && contract && train mend_c3 configs/mend/smollm2-counterfact.yaml 300 \
#       --model.init_args.editor.c_loc 3.0 && bench_mend mend_c3 100; pack
OUT=${OUT:-/tmp/out}
TRAINER=${TRAINER:-trainers/gpu.yaml}
DEVICE=$(python3 -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
mkdir -p "$OUT"

# the editor contract on the GPU (tiny models of every family on cuda)
contract() {
    KEDIT_TEST_DEVICE=$DEVICE python3 -m pytest tests/test_contract.py -n 8 -q -p no:cacheprovider 2>&1 \
        | tail -25 | tee "$OUT/contract.txt"
}

# train NAME CONFIG SECONDS [LightningCLI args...]: fit for SECONDS, keep the best checkpoint by val/score,
# export it to $OUT/NAME.safetensors and the CSV log to $OUT/NAME_metrics.csv
train() {
    local name=$1 config=$2 seconds=$3 dir=/tmp/runs/$1
    shift 3
    python3 -m kedit.train fit --config "$config" --trainer "$TRAINER" --trainer.logger bench/gpu/csv.yaml \
        --trainer.default_root_dir "$dir" --trainer.callbacks.init_args.dirpath "$dir/checkpoints" \
        --trainer.callbacks.init_args.monitor=val/score \
        --trainer.max_time "$(printf 00:00:%02d:%02d $((seconds / 60)) $((seconds % 60)))" "$@" || return 1
    local best
    best=$(ls -t "$dir"/checkpoints/epoch*.ckpt 2>/dev/null | head -1)
    python3 -m kedit.train export "${best:-$dir/checkpoints/last.ckpt}" "$OUT/$name.safetensors"
    echo "$name: exported ${best:-last.ckpt}" | tee -a "$OUT/jobs.txt"
    cp "$(ls -td logs/csv/version_* | head -1)/metrics.csv" "$OUT/${name}_metrics.csv"  # bench/gpu/csv.yaml: ./logs/csv
}

# bench_mend NAME N: the exported MEND editor on N counterfact_dev_rome and N counterfact_dev_mend records
bench_mend() {
    python3 bench/bench_mend.py --editor "$OUT/$1.safetensors" --n-rome "$2" --n-mend "$2" --device "$DEVICE" \
        --out "$OUT/bench_$1" 2>&1 | tail -12
}

# bench_malmen NAME N...: the exported MALMEN editor on one batch of each N counterfact_dev_rome records
bench_malmen() {
    local name=$1 n
    shift
    for n in "$@"; do
        python3 bench/bench_malmen.py --editor "$OUT/$name.safetensors" --n "$n" --mend '' --device "$DEVICE" \
            --out "$OUT" --tag "_$name" 2>&1 | tail -8
    done
}

# pack: every file under $OUT but the editors and log.txt into $OUT/results.tgz (at most 8 files come back)
pack() {
    (cd "$OUT" && find . -type f ! -name '*.safetensors' ! -name results.tgz ! -name log.txt -print0 \
        | tar -czf results.tgz --null -T - --remove-files && ls -la)
}

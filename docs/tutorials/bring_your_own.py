# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Bring your own model family and data
#
# kedit knows where the editable parts of a model are from one table, `kedit.models.ARCHS`,
# keyed by `config.model_type`. A family it does not know is refused with an error that says
# how to add it. Here we add one (Phi, whose modules have names of their own: `mlp.fc1` /
# `mlp.fc2`, `self_attn.dense`, `model.final_layernorm`), check that editors keep their contract on it, and then feed kedit edit
# requests from a file in a format of our own.
#
# **Runtime:** 4-5 s measured after the imports (the last cell prints this build's; 9 s in an earlier,
# busier build, 26 s with the imports), on one thread of a shared 2-core machine under load: a
# tiny randomly initialized Phi model; nothing is downloaded.

# %%
import csv
import io
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
import transformers

import kedit
from kedit.data import RequestError, load_requests, load_requests_with_report
from kedit.eval.scoring import score_targets
from kedit.identity import EditMismatchError, state_digest
from kedit.models import ARCHS, Arch, UnsupportedArchitecture, arch_of
from kedit.testing import CORPUS, tiny_tokenizer

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
logging.basicConfig(level=logging.WARNING)
started = time.perf_counter()

# %% [markdown]
# ## A model of an unknown family
#
# A tiny Phi model with random weights and the in-memory byte-level tokenizer that kedit's
# tests use (`kedit.testing`). The weights are initialized at a larger scale than usual
# (`initializer_range=0.2`), as in the contract tests: at the default scale a 3-block random model's
# logits are nearly flat and no edit could make a target likely. With a real checkpoint you
# would call `kedit.load_model("path/or/hub-id")` instead.

# %%
tok = tiny_tokenizer()
config = transformers.PhiConfig(
    vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=128, initializer_range=0.2,
    pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
torch.manual_seed(0)
model = transformers.PhiForCausalLM(config).eval()
model.config._name_or_path = "tiny-phi"
print(model.config.model_type, "known to kedit:", model.config.model_type in ARCHS)

# %%
try:
    arch_of(model)
except UnsupportedArchitecture as err:
    print(err)

# %% [markdown]
# ## Add its `Arch`
#
# The module names come from the model itself: print one block and the top-level modules.

# %%
print(model.model.layers[0])
print([name for name, _ in model.named_modules() if name.count(".") <= 2 and "layers." not in name])

# %% [markdown]
# Paths inside a block are relative to `f"{blocks}.{layer}"`. Phi's weights are stored as
# `nn.Linear`'s `(out, in)`, so `conv1d` stays `False` (GPT-2's `Conv1D` would need `True`).
#
# kedit reads a projection's input as `(batch, tokens, features)`. A family whose blocks
# flatten the tokens before the MLP does not fit as it is: OPT, for one, reshapes its hidden
# states to `(batch × tokens, features)` before `fc1`, and ROME's statistics then fail with a
# shape error.

# %%
ARCHS["phi"] = Arch(
    blocks="model.layers",
    mlp_in=("mlp.fc1",),
    mlp_out="mlp.fc2",  # the ROME / MEMIT edit target
    attn_out="self_attn.dense",
    embed="model.embed_tokens",
    final_norm="model.final_layernorm",
    lm_head="lm_head",
)
arch = arch_of(model)
print(arch.mlp_out_weight(1), "(d_in, d_out) =", arch.mlp_dims(model, 1))

# %% [markdown]
# ## The contract, on the new family
#
# Every registered editor must keep one contract, which `tests/test_contract.py` checks on tiny
# models of several families: `edit()` leaves the model bit-exactly untouched; applying the edit
# makes the new targets more likely; `restore` gives back the exact weights; a saved edit loads
# and does the same; and an edit refuses weights it was not made for. Here are the same checks
# for ROME (the papers' algorithm, scaled down for a 3-block model: short templates, statistics
# from a few sentences) and FT-M. To make the family part of the test suite itself, add its
# tiny config to `kedit.testing.tiny_config` and its name to `FAMILIES` in `tests/test_contract.py`.

# %%
requests = [
    {"prompt": "The capital city of France", "subject": "France", "target_new": "is Rome", "target_true": "is Paris"},
    {"prompt": "The sport of Michael Jordan", "subject": "Michael Jordan", "target_new": "is soccer",
     "target_true": "is basketball"},
]
TINY_STATS = dict(corpus=list(CORPUS) * 4, stats_tokens=2_000, stats_seq_len=32)
editors = {
    "rome": kedit.editor("rome", layers=[1], templates=[(5, 2)], v_steps=20, **TINY_STATS),
    "ft-m": kedit.editor("ft-m", num_steps=5, lr=1e-2),
}


def logp_new(model) -> torch.Tensor:
    """Summed log-probability of each request's new target (teacher forced)."""
    return score_targets(model, tok, [r["prompt"] for r in requests], [r["target_new"] for r in requests]).logp


folder = Path(tempfile.mkdtemp())
exact = state_digest(model, full=True)
before = logp_new(model)
for name, editor in editors.items():
    t0 = time.perf_counter()
    edit = editor.edit(model, tok, requests)
    assert state_digest(model, full=True) == exact, "edit() changed the model"
    with edit.applied(model):
        gain = logp_new(model) - before
    assert (gain > 0).all(), "a target did not become more likely"
    assert state_digest(model, full=True) == exact, "restore is not bit-exact"
    loaded = kedit.Edit.load(edit.save(folder / f"{name}.safetensors"), model)
    with loaded.applied(model):
        same = torch.allclose(logp_new(model) - before, gain, atol=1e-4)
    other = transformers.PhiForCausalLM(config).eval()  # another random init: other weights
    try:
        loaded.apply(other)
        refused = False
    except EditMismatchError:
        refused = True
    print(f"{name:5} edit {time.perf_counter() - t0:4.1f} s | pure | log P(new) +{gain.mean():.2f} nats | "
          f"restored bit-exactly | reloaded edit gives the same gain: {same} | foreign weights refused: {refused}")

# %% [markdown]
# ## Data in your own format
#
# kedit reads CounterFact (both schemas), zsRE, KnowEdit and MQuAKE files as they are, and
# anything else once its records carry kedit's field names (`prompt`, `subject`, `target_new`,
# `target_true`, `paraphrase_prompts`, `neighborhood`, ...). Say our facts live in a CSV with
# columns of our own; one row is broken (its subject is not in the prompt) and one is no edit
# (the new answer is the old one).

# %%
ours = """entity,question,old,new,rephrased
France,The capital city of France,is Paris,is Rome,France's capital city
Michael Jordan,The sport of Michael Jordan,is basketball,is soccer,Michael Jordan plays
Eiffel Tower,The city of the Louvre,is Paris,is Berlin,
Italy,The capital city of Italy,is Rome,is Rome,Italy's capital city
"""
rows = list(csv.DictReader(io.StringIO(ours)))
records = [{"prompt": r["question"], "subject": r["entity"], "target_new": r["new"], "target_true": r["old"],
            "paraphrase_prompts": [r["rephrased"]] if r["rephrased"] else []} for r in rows]
path = folder / "my_edits.jsonl"
path.write_text("".join(json.dumps(rec) + "\n" for rec in records))

# %% [markdown]
# Every record is validated. By default the first bad one stops the load, with an error that
# names the file, the record and the field:

# %%
try:
    load_requests(path)
except RequestError as err:
    print(err)

# %% [markdown]
# `on_error="skip"` keeps the good records and reports each one it dropped:

# %%
reqs, report = load_requests_with_report(path, on_error="skip")
print(report.summary())
for problem in report.skipped:
    print(" -", problem)
print(reqs[0])

# %% [markdown]
# The loaded requests go wherever requests go: to an editor, or to the evaluation, which scores
# them before and after (here teacher-forced only, on the tiny model; on a real model leave
# generation and fluency on, they are what tells an edit that only looks right under teacher
# forcing from one that holds). The numbers of a random 3-block model mean nothing; the
# plumbing is the point.

# %%
from kedit.eval import EvalConfig, evaluate  # noqa: E402

results = evaluate(model, tok, editors["ft-m"], reqs, mode="batch", progress=False,
                   config=EvalConfig(generation=False, fluency=False, perplexity=False))
print(results.to_markdown())
assert state_digest(model, full=True) == exact

# %%
del ARCHS["phi"]  # leave the table as we found it
print(f"tutorial wall time: {time.perf_counter() - started:.0f} s")

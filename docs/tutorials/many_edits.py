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
# # Many edits: batches and sequences
#
# MEMIT edits many facts in one update. Real use also edits in sequence: each new edit is
# computed on the model that the earlier ones changed. This page does both, with MEMIT and
# with AlphaEdit (MEMIT's update projected away from the keys of preserved knowledge), and
# reads the retention and perplexity curves that the sequential mode records.
#
# **Runtime:** 245-257 s measured in `make docs` builds with one thread on a shared 2-core machine
# under load (load average 1.3-4, where a ROME edit takes 1.5-1.9× as long as on 2 idle cores;
# the last cell prints this build's).
# Three records, and of each only the first three of its ten neighbourhood prompts (scored once,
# at the end); eleven value optimizations (MEMIT's δ, one per request and edit, about 10 s each
# on one idle thread) are most of it. The curves below are far too short to rank the methods:
# the benchmark runs 500 edits in sequence, where MEMIT's perplexity rises +61% and AlphaEdit's
# +27% ([memit_alphaedit_sequential_500.md](../../bench/results/memit_alphaedit_sequential_500/);
# [AlphaEdit's page](../../editors/alphaedit/)).

# %%
import dataclasses
import logging
import os
import time

import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown, display

import kedit
from kedit.data import load_requests
from kedit.editors import EditStack
from kedit.eval import EvalConfig, evaluate
from kedit.eval.scoring import answers
from kedit.identity import state_digest

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
logging.basicConfig(level=logging.WARNING)
started = time.perf_counter()

model, tok = kedit.load_model("smollm2-135m")
# three records, each with the first three of its ten neighbourhood prompts (scored at the end)
requests = [dataclasses.replace(r, neighborhood=r.neighborhood[:3])
            for r in load_requests("counterfact-sample", limit=3)]
memit = kedit.editor("memit", config="auto", model=model)
alpha = kedit.editor("alphaedit", config="auto", model=model)
print(memit.hparams.layers, "| AlphaEdit null-space threshold:", alpha.hparams.nullspace_threshold)

# %% [markdown]
# ## One batch
#
# All requests in one `edit()` call: one update per layer (`layers` 4-8 on SmolLM2), of rank
# at most the number of requests.

# %%
exact = state_digest(model, full=True)
t0 = time.perf_counter()
batch = memit.edit(model, tok, requests)
print(f"{len(requests)} requests in one edit: {time.perf_counter() - t0:.0f} s;",
      {name: tuple(left.shape) for name, (left, _) in list(batch.factors.items())[:2]}, "...")
with batch.applied(model):
    edited = answers(model, tok, [r.prompt for r in requests])
for r, answer in zip(requests, edited):
    print(f"{r.prompt!r:55} -> {answer!r:30} (new target {r.target_new!r})")
print("restored bit-exactly:", state_digest(model, full=True) == exact)

# %% [markdown]
# ## In sequence, by hand
#
# An `EditStack` holds edits applied one on top of the other. Each edit is computed on the model
# as it stands, with the applied edits passed as `history` (AlphaEdit reads the keys of the
# earlier AlphaEdit edits from it; the editor object keeps no state). `restore` undoes the whole
# stack, bit-exactly.

# %%
stack = EditStack()
for request in requests[:2]:
    edit = alpha.edit(model, tok, [request], history=stack)
    if stack.is_applied:
        stack.push(edit, model)
    else:
        stack.push(edit)
        stack.apply(model)
print("edits on the stack:", len(stack.edits), "| applied:", stack.is_applied)
stack.restore(model)
print("restored bit-exactly:", state_digest(model, full=True) == exact)

# %% [markdown]
# ## Sequential evaluation with curves
#
# `evaluate(..., mode="sequential", batch_size=1)` does the same, one request per edit, and
# at every curve point scores the requests edited so far (`seen:`), the first ones
# (`firstK:`, retention) and the perplexity of held text (`general/ppl`). At the end every
# request is scored on the whole stack. Teacher-forced scores only here, to keep the page short.

# %%
config = EvalConfig(generation=False, fluency=False, ppl_docs=2, curve_every=1)
runs = {}
for name, editor in (("MEMIT", memit), ("AlphaEdit", alpha)):
    t0 = time.perf_counter()
    runs[name] = evaluate(model, tok, editor, requests, mode="sequential", batch_size=1, config=config,
                          progress=False, reuse_pre=runs.get("MEMIT"))
    print(f"{name}: {time.perf_counter() - t0:.0f} s")
display(Markdown(runs["AlphaEdit"].to_markdown(title="AlphaEdit, 3 requests edited one after another")))

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
for name, res in runs.items():
    x = [c["n_edits"] for c in res.curves]
    first = next(k for k in res.curves[-1] if k.startswith("first") and k.endswith(":rewrite/acc"))
    for key, style in (("seen:rewrite/es", "-"), (first, ":")):
        left.plot(x, [c.get(key, float("nan")) for c in res.curves], style, marker="o", label=f"{name} {key}")
    right.plot(x, [c["general/ppl"] for c in res.curves], marker="s", label=name)
left.set(xlabel="requests edited", ylabel="score", ylim=(-0.02, 1.02), title="retention")
right.set(xlabel="requests edited", ylabel="perplexity (held text)", title="perplexity")
left.legend(fontsize=7)
right.legend(fontsize=7)
fig.tight_layout()
plt.show()

# %% [markdown]
# How to read them. The left panel: `seen:rewrite/es` is the share of the requests edited so
# far whose new target beats the old one on the current model; if later edits overwrite earlier
# ones it falls. `firstK:rewrite/acc` follows the first K requests only, K being the number
# edited at the first curve point (here `first1`: a point after every edit): retention. The right
# panel: perplexity of held Wikipedia text, the damage done to everything else; it should stay
# flat. On three edits both methods hold their edits and perplexity barely moves; the
# difference shows over hundreds of edits, where AlphaEdit's projection slows the perplexity
# rise but on SmolLM2 cannot stop it (the model's keys leave almost no null space:
# `bench/results/key_spectrum.md`).

# %%
print(f"tutorial wall time: {time.perf_counter() - started:.0f} s")

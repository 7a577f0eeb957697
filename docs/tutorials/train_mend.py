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
# # Train a MEND editor with PyTorch Lightning
#
# MEND (Mitchell et al., ICLR 2022) is a learned editor: a small hypernetwork, trained once,
# turns the gradient of one edit example into a low-rank weight update. This page trains one
# with `python -m kedit.train`, the LightningCLI that trained the shipped SmolLM2 editor, on
# the tiny configuration (`configs/mend/tiny-llama.yaml`: a random three-layer LLaMA of 48k
# parameters, built in code; the hypernetwork edits the MLPs of its last two blocks), so that
# it trains in seconds on a CPU. It logs to W&B
# offline and to a CSV file, plots the learning curve, kills the run with SIGKILL and resumes
# it from its checkpoint, exports the editor, loads it with `kedit.load_editor` and makes a
# one-shot edit. The last section says what changes on a GPU, on all GPUs of a node and on
# a SLURM cluster, and how long the shipped editor took.
#
# **Runtime:** 47-55 s measured in `make docs` builds with one thread on a shared 2-core machine
# under load (the last cell prints this build's). Most of it is the two starts of
# `python -m kedit.train` (about 20 s each: imports, W&B's offline writer, validation); the 80
# training steps themselves take under 10 s.
#
# Everything the runs write (checkpoints, logs, the exported editor) goes into a temporary
# folder (removed in the last cell), never into the checkout's `checkpoints/`.

# %%
import csv
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import kedit
from kedit.checkpoint import read_artifact_meta
from kedit.identity import state_digest

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
logging.basicConfig(level=logging.WARNING)
started = time.perf_counter()
# the experiment configs and trainer presets live in the checkout (configs/, trainers/)
ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "trainers" / "cpu.yaml").is_file())
RUN = Path(tempfile.mkdtemp(prefix="kedit-train-mend-"))

# %% [markdown]
# ## The command
#
# An experiment YAML names the LightningModule (`kedit.lightning.mend.MENDModule`) and the
# data module by `class_path`; a trainer preset from `trainers/` says where it runs. The tiny
# configuration trains on `counterfact-sample` (48 CounterFact records that ship with kedit)
# and its model, `tiny-llama`, comes from `kedit.testing`, which `$KEDIT_MODELS` makes known
# to `kedit.load_model` in the training process and in this one.
#
# `trainers/cpu.yaml` logs to W&B and to a CSVLogger (`trainers/shared/loggers.yaml`, both
# under `./logs`) and checkpoints at every validation into `<default_root_dir>/checkpoints`.
# We shorten the run on the command line: validation (and so a checkpoint) every 10 steps.
# `WANDB_MODE=offline` keeps W&B on this machine: the run can be uploaded later with
# `wandb sync`. The training process runs in the temporary folder, so `logs/` lands there too.

# %%
os.environ["KEDIT_MODELS"] = "kedit.testing"
ENV = {**os.environ, "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
FIT = [sys.executable, "-m", "kedit.train", "fit",
       "--config", str(ROOT / "configs" / "mend" / "tiny-llama.yaml"),
       "--trainer", str(ROOT / "trainers" / "cpu.yaml"),
       f"--trainer.default_root_dir={RUN}",
       "--trainer.val_check_interval=10", "--trainer.log_every_n_steps=2",
       "--trainer.enable_progress_bar=false"]


def train(*extra: str) -> subprocess.CompletedProcess:
    """Run ``python -m kedit.train fit`` in the run's folder; show its last log lines."""
    t0 = time.perf_counter()
    res = subprocess.run([*FIT, *extra], cwd=RUN, env=ENV, capture_output=True, text=True, timeout=600,
                         check=False)  # the caller checks: the first run is meant to die
    lines = [line for line in (res.stdout + res.stderr).splitlines()
             if line.strip() and "site-packages" not in line]  # without the libraries' warnings
    print(f"exit code {res.returncode} after {time.perf_counter() - t0:.0f} s; last lines:")
    print("\n".join(lines[-4:]))
    return res


print(" ".join(["python -m kedit.train", *FIT[3:]]).replace(str(ROOT) + "/", "").replace(str(RUN), "$RUN"))

# %% [markdown]
# ## Kill it
#
# A run that dies (a SIGKILL, an out-of-memory kill, a cluster's time limit) leaves its last
# checkpoint behind. To kill this one at a known point, we add the fault-injection callback
# that kedit's resume tests use, `KillAtStep`: it SIGKILLs the training process when step 40
# is about to start, after the step-40 checkpoint was written. Nothing runs after it: no
# `finally`, no clean-up, like a real kill. (Without it, `Popen.kill()` at a random moment
# does the same; a fixed step makes the page reproducible.)

# %%
kill = '{"class_path": "kedit.lightning.common.KillAtStep", "init_args": {"step": 40}}'
killed = train("--trainer.max_steps=80", f"--trainer.callbacks+={kill}")
print("killed by SIGKILL:", killed.returncode == -9)
ckpts = RUN / "checkpoints"
for path in sorted(ckpts.iterdir()):
    print(path.name, "global_step =", torch.load(path, weights_only=True, map_location="cpu")["global_step"])

# %% [markdown]
# ## Resume it
#
# The same command with `--ckpt_path last` continues from `last.ckpt`: the global step, the
# optimizer's state, the learning-rate schedule and the position in the data all come back.
# (`tests/test_resume.py` checks that a run killed at a random step and resumed ends with
# bit-identical hypernetwork weights to a run that was never interrupted.)

# %%
resumed = train("--trainer.max_steps=80", "--ckpt_path", "last")
assert resumed.returncode == 0, resumed.stderr[-3000:]
print("last.ckpt now at global_step =", torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"])

# %% [markdown]
# ## The learning curve
#
# Each start of the run writes a new CSVLogger version under `logs/csv/`; W&B's offline runs
# are under `logs/wandb/`. The two CSV files are the same curve in two pieces: the resumed run
# starts where the killed one stopped.

# %%
def read_metrics(path: Path, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric in a CSVLogger file (each row holds the metrics logged at one step)."""
    with open(path, newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get(key)]
    return [int(row["step"]) for row in rows], [float(row[key]) for row in rows]


versions = sorted((RUN / "logs" / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
for v in versions:
    steps, _ = read_metrics(v / "metrics.csv", "train/edit_nll")
    print(f"{v.name}/metrics.csv: training steps {min(steps)}-{max(steps)}")
print("W&B offline runs:", sorted(p.name for p in (RUN / "logs" / "wandb").glob("offline-run-*")))

fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
val = []
for name, v in zip(("killed run", "resumed run"), versions):
    left.plot(*read_metrics(v / "metrics.csv", "train/edit_nll"), marker=".", label=f"{name}: train/edit_nll")
    steps, values = read_metrics(v / "metrics.csv", "val/edit_nll")
    right.plot(steps, values, marker="o", label=f"{name}: val/edit_nll")
    val += zip(steps, values)
for ax in (left, right):
    ax.axvline(40, color="grey", linestyle=":")
    ax.legend(fontsize=8)
left.set(xlabel="step", ylabel="NLL of the new target after the edit", title="training")
right.set(xlabel="step", title="validation (8 held-out records)")
fig.tight_layout()
plt.show()
print(f"val/edit_nll: {val[0][1]:.3f} at step {val[0][0]}, {val[-1][1]:.3f} at step {val[-1][0]}")

# %% [markdown]
# `train/edit_nll` is the negative log-likelihood of the new target on a paraphrase of the
# edit prompt, on the model with the hypernetwork's update swapped in (the loss adds the
# locality KL, `train/loc_kl`). It falls as the hypernetwork learns to turn gradients into
# updates that make the target likely. Per step it is noisy (two edits per batch); on the 8
# held-out records, `val/edit_nll` falls steadily across the kill, but only a little: a random
# 48k-parameter model, 40 training records and 80 steps at the tiny configuration's learning
# rate teach the hypernetwork little, and the success metrics (`val/edit_success`,
# `val/locality`, `val/score`) stay near zero. The run is here to show the mechanics; on SmolLM2 the same
# metrics are the ones to watch (the shipped editor's curve is in
# [bench/results/mend.md](../../bench/results/mend/)).
#
# ## Export the editor
#
# A training checkpoint holds the hypernetwork, its optimizer and the trainer's state. `export`
# keeps what an edit needs: the hypernetwork's weights, its typed hyperparameters and the
# identity of the base model, in one safetensors file (`fit --export PATH` does the same when
# fit ends). From a shell: `python -m kedit.train export $RUN/checkpoints/last.ckpt tiny-mend.safetensors`;
# here the same function, without starting another process. The shipped editors in
# `checkpoints/` were made this way.

# %%
from kedit.train import export  # the command line's `export`, as a function

editor_file = export(ckpts / "last.ckpt", RUN / "tiny-mend.safetensors")
meta = read_artifact_meta(editor_file)
print(editor_file.name, f"{editor_file.stat().st_size / 1024:.0f} KiB;", "editor:", meta["editor"])
print("trained at global_step", meta["extra"]["global_step"], "for base", meta["base"]["name"])

# %% [markdown]
# ## Load it and edit
#
# `kedit.load_editor(path, model=model)` checks that `model` is the base the editor was
# trained for (the same weights) and returns an `Editor` like any other: `edit()` leaves the
# model untouched and returns a low-rank `WeightDelta`. The tiny model is random, so its
# "answers" are noise and the edit is not meaningful in content; what the cell shows is the
# mechanics: the new target's log-probability before and with the edit, and a bit-exact restore.
# On SmolLM2, the same three lines with `checkpoints/mend-smollm2-135m-counterfact.safetensors`
# make real edits (tutorial 2).

# %%
from kedit.eval.scoring import answers, score_targets

model, tok = kedit.load_model("tiny-llama")
mend = kedit.load_editor(editor_file, model=model)
request = {"prompt": "The capital of France is", "target_new": "Rome"}


def logprob(model) -> float:
    """Summed log-probability of the new target's tokens after the prompt (teacher-forced)."""
    with torch.no_grad():
        return float(score_targets(model, tok, [request["prompt"]], [request["target_new"]]).logp[0])


exact = state_digest(model, full=True)
t0 = time.perf_counter()
edit = mend.edit(model, tok, request)
print(f"one-shot edit in {1000 * (time.perf_counter() - t0):.0f} ms:", type(edit).__name__,
      {name: [tuple(f.shape) for f in factors] for name, factors in edit.factors.items()})
print("model unchanged by edit():", state_digest(model, full=True) == exact)
print(f"log p(Rome | prompt) before: {logprob(model):6.2f}; greedy answer: {answers(model, tok, [request['prompt']])[0]!r}")
with edit.applied(model):
    print(f"log p(Rome | prompt) edited: {logprob(model):6.2f}; greedy answer: {answers(model, tok, [request['prompt']])[0]!r}")
print("restored bit-exactly:", state_digest(model, full=True) == exact)

# %% [markdown]
# ## On a GPU, on a node, on a cluster
#
# The experiment YAML stays the same; the trainer preset changes.
#
# - **One GPU**: `--trainer trainers/gpu.yaml` (`accelerator: gpu`, `devices: 1`). It trains
#   for 20,000 steps with a validation and a checkpoint every 1,000 instead of the CPU preset's
#   2,000 and 250. Precision stays `32-true` in every preset.
# - **All GPUs of a node**: `--trainer trainers/ddp.yaml` (`devices: -1`, `strategy: ddp`,
#   NCCL). `data.batch_size` is per GPU: the loss is the batch mean, so R processes with batch
#   B make the update of one process with batch R·B. `trainers/ddp_cpu.yaml` runs the same
#   with two CPU processes and gloo, for a laptop or CI.
# - **SLURM**: `trainers/slurm.yaml` (`num_nodes: 2`, `devices: 4`, DDP); Lightning detects
#   SLURM from the `srun` environment. `num_nodes × devices` must equal the task count:
#
#   ```bash
#   srun --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 \
#       python -m kedit.train fit --config configs/mend/smollm2-counterfact.yaml \
#       --trainer trainers/slurm.yaml --trainer.num_nodes=2 --trainer.devices=4
#   ```
#
#   A job killed by its time limit resumes with the same command and `--ckpt_path last`; give
#   each experiment its own `--trainer.default_root_dir` so `last` is the right run's.
#
# Every preset logs to W&B (online once `WANDB_API_KEY` is set or after `wandb login`, offline
# otherwise) and to the CSV file.
#
# **How long the shipped editor took.** `checkpoints/mend-smollm2-135m-counterfact.safetensors`
# was trained with `configs/mend/smollm2-counterfact.yaml` and `trainers/cpu.yaml` on one CPU
# thread: 1,300 steps of batch 4 in 45 minutes (0.49 steps/s, peak memory 1.6 GB), stopped
# there and exported from `last.ckpt` ([bench/results/mend.md](../../bench/results/mend/)).
# Its validation locality peaked around step 500 and then drifted down while edit success rose;
# the measured numbers and the known locality limit on CounterFact are on the
# [MEND page](../../editors/mend/).

# %%
shutil.rmtree(RUN)  # the runs' checkpoints, logs and the exported editor
print(f"tutorial wall time: {time.perf_counter() - started:.0f} s")

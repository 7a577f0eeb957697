"""Exact resume of ``kedit.train`` runs: a run killed in any epoch and resumed ends bit-identical.

A tiny MEND run (tiny LLaMA, 6 training edits in batches of 2: 3 steps per epoch) trains 7
steps in one go. Runs killed at a step of epoch 0 and at the first and a later step of epoch 1
resume from their last checkpoint and must end with the same hypernetwork (bit for bit), the
same optimizer state, and the same batches, in the same order, at every step.

The in-process tests "kill" by raising from a callback; the ``slow`` test SIGKILLs
``python -m kedit.train fit`` subprocesses at random steps of epochs 0 and 1.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kedit.testing import write_edit_file

ROOT = Path(__file__).resolve().parents[1]
STEPS, BATCH, TRAIN, VAL = 7, 2, 6, 2  # 3 steps per epoch: epochs 0, 1 and one step of 2


class Killed(Exception):
    pass


def _callbacks(kill_at: int | None, seen: dict[int, list[int]]):
    from lightning.pytorch import Callback

    class Record(Callback):
        """Records the edits of each step and raises (the "kill") when step ``kill_at`` starts."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == kill_at:
                raise Killed(kill_at)
            seen[trainer.global_step] = batch["index"].tolist()

    return [Record()]


def _fit(data: Path, ckpt_dir: Path, kill_at: int | None = None, ckpt_path: str | None = None,
         max_steps: int = STEPS, every: int = 1):
    """Train to ``max_steps`` (or die at ``kill_at``), checkpointing ``every`` steps; (module, {step: edit indices}, trainer)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from kedit.editors.mend import MENDHparams
    from kedit.lightning.data import EditDataModule
    from kedit.lightning.mend import MENDModule

    L.seed_everything(0)
    module = MENDModule("tiny-llama", MENDHparams(num_last_layers=2, rank=8, edit_lr=0.1, lr=1e-3, lr_lr=1e-3))
    dm = EditDataModule(data, val_size=VAL, batch_size=BATCH)  # a Path: the checkpoint must hold a str
    seen: dict[int, list[int]] = {}
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=every, save_top_k=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, inference_mode=False, max_steps=max_steps, limit_val_batches=0,
                        default_root_dir=str(ckpt_dir), callbacks=[*_callbacks(kill_at, seen), ckpt])
    try:
        trainer.fit(module, dm, ckpt_path=ckpt_path)
    except Killed:
        assert kill_at is not None
    return module, seen, trainer


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    data = write_edit_file(tmp / "edits.json", TRAIN + VAL)
    module, seen, _ = _fit(data, tmp / "ckpt")
    assert sorted(seen) == list(range(STEPS))
    return data, {k: v.clone() for k, v in module.mend.state_dict().items()}, seen, tmp / "ckpt" / "last.ckpt"


def _optimizer_state(path: Path) -> dict:
    return torch.load(path, weights_only=True)["optimizer_states"][0]["state"]


@pytest.mark.parametrize("kill_at", [1, 3, 5], ids=["epoch0", "epoch1-first-step", "epoch1"])
def test_killed_run_resumes_bit_identical(uninterrupted, tmp_path, kill_at):
    """Killed when step ``kill_at`` starts, resumed from last.ckpt: same batches, weights and optimizer as one run."""
    data, weights, seen_full, full_ckpt = uninterrupted
    _, seen_killed, _ = _fit(data, tmp_path / "ckpt", kill_at=kill_at)
    assert sorted(seen_killed) == list(range(kill_at))
    module, seen_resumed, trainer = _fit(data, tmp_path / "ckpt", ckpt_path="last")
    assert trainer.global_step == STEPS
    assert sorted(seen_resumed) == list(range(kill_at, STEPS))
    for step in range(STEPS):  # the data position and the epoch's permutation
        got = seen_killed.get(step, seen_resumed.get(step))
        assert got == seen_full[step], f"step {step} (epoch {step // (TRAIN // BATCH)}) trained on other edits"
    for name, value in module.mend.state_dict().items():
        assert torch.equal(value, weights[name]), name  # bit-identical, normalizer statistics included
    a, b = _optimizer_state(full_ckpt), _optimizer_state(tmp_path / "ckpt" / "last.ckpt")
    assert a.keys() == b.keys()
    for k in a:
        for s in a[k]:
            assert torch.equal(torch.as_tensor(a[k][s]), torch.as_tensor(b[k][s])), (k, s)


@pytest.mark.parametrize("first", [2, 4], ids=["epoch0", "epoch1"])
def test_longer_run_continues_inside_the_cut_epoch(uninterrupted, tmp_path, first):
    """A run stopped by max_steps inside an epoch, continued with a larger max_steps from its final
    checkpoint, trains the rest of that epoch, as one longer run does (Lightning began the next epoch)."""
    data, weights, seen_full, _ = uninterrupted
    _, seen_first, _ = _fit(data, tmp_path / "ckpt", max_steps=first, every=100)
    module, seen_more, trainer = _fit(data, tmp_path / "ckpt", ckpt_path="last", every=100)
    assert trainer.global_step == STEPS and sorted(seen_more) == list(range(first, STEPS))
    assert {**seen_first, **seen_more} == seen_full
    assert all(torch.equal(v, weights[k]) for k, v in module.mend.state_dict().items())


def test_epochs_are_reshuffled(uninterrupted):
    """Guard for the test above: epochs 0 and 1 read the edits in different orders."""
    _, _, seen, _ = uninterrupted
    per_epoch = TRAIN // BATCH
    epoch0 = [seen[s] for s in range(per_epoch)]
    epoch1 = [seen[s] for s in range(per_epoch, 2 * per_epoch)]
    assert sorted(sum(epoch0, [])) == sorted(sum(epoch1, [])) and epoch0 != epoch1


def test_resume_keeps_the_checkpoint_shuffle_seed(uninterrupted, tmp_path, monkeypatch):
    """The batch order follows the seed stored in the checkpoint, not another seed_everything on resume."""
    import lightning as L

    data, _, seen_full, _ = uninterrupted
    _fit(data, tmp_path / "ckpt", kill_at=4)
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert state["EditDataModule"] == {"shuffle_seed": 0}
    seed_everything = L.seed_everything
    monkeypatch.setattr(L, "seed_everything", lambda seed=None, **kw: seed_everything(123, **kw))
    _, seen, _ = _fit(data, tmp_path / "ckpt", ckpt_path="last")
    assert sorted(seen) == list(range(4, STEPS))
    assert all(seen[s] == seen_full[s] for s in range(4, STEPS))


def test_resume_from_explicit_checkpoint_file(uninterrupted, tmp_path):
    """``ckpt_path=<file>`` (a checkpoint moved out of the checkpoint folder) resumes like ``last``."""
    data, weights, _, _ = uninterrupted
    _fit(data, tmp_path / "ckpt", kill_at=5)
    (tmp_path / "ckpt" / "last.ckpt").rename(tmp_path / "step5.ckpt")
    module, seen, trainer = _fit(data, tmp_path / "other", ckpt_path=str(tmp_path / "step5.ckpt"))
    assert sorted(seen) == list(range(5, STEPS)) and trainer.global_step == STEPS
    assert all(torch.equal(v, weights[k]) for k, v in module.mend.state_dict().items())


# --------------------------------------------------------------------------- the CLI, SIGKILLed


def _trainer_yaml(path: Path, kill_at: int | None = None) -> Path:
    """trainers/cpu.yaml (W&B offline and CSV logs) checkpointing every step, and SIGKILLed at ``kill_at``."""
    import yaml

    cfg = yaml.safe_load((ROOT / "trainers" / "cpu.yaml").read_text())
    for key in ("logger", "callbacks"):  # the presets name shared files (trainers/shared/)
        cfg[key] = yaml.safe_load((ROOT / "trainers" / cfg[key]).read_text())
    for cb in cfg["callbacks"]:
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["every_n_train_steps"] = 1
    if kill_at is not None:
        cfg["callbacks"].append({"class_path": "kedit.lightning.common.KillAtStep", "init_args": {"step": kill_at}})
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(cwd: Path, data: Path, *extra: str, kill_at: int | None = None) -> subprocess.CompletedProcess:
    """``python -m kedit.train fit`` of the tiny run in ``cwd`` (checkpoints/, logs/)."""
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    args = ["fit", "--config", str(ROOT / "configs" / "mend" / "tiny-llama.yaml"),
            "--trainer", str(_trainer_yaml(cwd / "trainer.yaml", kill_at)), f"--data.init_args.train_path={data}",
            f"--data.init_args.val_size={VAL}", f"--data.init_args.batch_size={BATCH}",
            f"--trainer.max_steps={STEPS}", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
            *extra]
    return subprocess.run([sys.executable, "-m", "kedit.train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def _hypernet(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, weights_only=True)
    assert state["global_step"] == STEPS
    return {k: v for k, v in state["state_dict"].items() if k.startswith("mend.")}


@pytest.mark.slow
def test_cli_sigkill_in_epoch_0_and_1_resumes_bit_identical(tmp_path):
    """SIGKILL ``python -m kedit.train fit`` at a random step of epoch 0 and of epoch 1; each resumed
    with ``--ckpt_path last`` (and the epoch-1 one once more from the checkpoint file) ends bit-identical."""
    per_epoch = TRAIN // BATCH
    rng = random.Random()
    kills = {"epoch0": rng.randrange(1, per_epoch), "epoch1": rng.randrange(per_epoch, 2 * per_epoch)}
    data = write_edit_file(tmp_path / "edits.json", TRAIN + VAL)
    (tmp_path / "full").mkdir()
    res = _cli(tmp_path / "full", data)
    assert res.returncode == 0, res.stderr[-3000:]
    full = _hypernet(tmp_path / "full" / "checkpoints" / "last.ckpt")
    for name, step in kills.items():
        run = tmp_path / name
        run.mkdir()
        res = _cli(run, data, kill_at=step)
        assert res.returncode == -9, f"{name}: not killed at step {step}: {res.stderr[-3000:]}"
        saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
        assert saved == step, (name, saved, step)
        if name == "epoch1":
            (run / "checkpoints" / "last.ckpt").rename(run / "killed.ckpt")
            res = _cli(run, data, "--ckpt_path", str(run / "killed.ckpt"))
            assert res.returncode == 0, f"{name} (file): {res.stderr[-3000:]}"
            resumed = _hypernet(run / "checkpoints" / "last.ckpt")
            assert all(torch.equal(resumed[k], full[k]) for k in full), f"{name} resumed from file at step {step}"
            (run / "checkpoints" / "last.ckpt").unlink()
            (run / "killed.ckpt").rename(run / "checkpoints" / "last.ckpt")
        res = _cli(run, data, "--ckpt_path", "last")
        assert res.returncode == 0, f"{name}: {res.stderr[-3000:]}"
        resumed = _hypernet(run / "checkpoints" / "last.ckpt")
        assert resumed.keys() == full.keys()
        for k in full:
            assert torch.equal(resumed[k], full[k]), f"{name}: killed at step {step}, {k} differs after resume"

"""``python -m kedit.train``: every YAML in configs/ and trainers/ parses; W&B offline; artifacts."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAINERS = sorted((ROOT / "trainers").glob("*.yaml"))
EXPERIMENTS = sorted(p for p in (ROOT / "configs").rglob("*.yaml")
                     if "class_path" in p.read_text() and "model:" in p.read_text())
HPARAM_CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p not in EXPERIMENTS)


def _parse(args: list[str]):
    """Parse ``fit`` arguments exactly as the CLI does, without instantiating anything."""
    from kedit.train import build_parser

    return build_parser().parse_args(["fit", *args])


@pytest.mark.parametrize("trainer", TRAINERS, ids=lambda p: p.name)
def test_trainer_preset_parses(trainer):
    experiment = ROOT / "configs" / "mend" / "tiny-llama.yaml"
    cfg = _parse(["--config", str(experiment), "--trainer", str(trainer)])
    t = cfg.fit.trainer
    loggers = [lg["class_path"] for lg in t.logger]
    assert loggers == ["kedit.lightning.common.WandbLogger", "lightning.pytorch.loggers.CSVLogger"]
    ckpt = [c for c in t.callbacks if c["class_path"].endswith("ModelCheckpoint")]
    assert ckpt and ckpt[0]["init_args"]["dirpath"] == "checkpoints" and ckpt[0]["init_args"]["save_last"]
    assert t.inference_mode is False


def test_trainer_presets_share_one_logger_and_callbacks_block():
    """Every preset names trainers/shared/{loggers,callbacks}.yaml; they differ only in devices and steps."""
    import yaml

    experiment = ROOT / "configs" / "mend" / "tiny-llama.yaml"
    for trainer in TRAINERS:
        raw = yaml.safe_load(trainer.read_text())
        assert (raw["logger"], raw["callbacks"]) == ("shared/loggers.yaml", "shared/callbacks.yaml"), trainer.name
    parsed = [_parse(["--config", str(experiment), "--trainer", str(t)]).fit.trainer for t in TRAINERS]
    assert all(t.logger == parsed[0].logger and t.callbacks == parsed[0].callbacks for t in parsed)
    every = _parse(["--config", str(experiment), "--trainer", str(TRAINERS[0]),
                    "--trainer.callbacks.init_args.every_n_train_steps=7"]).fit.trainer.callbacks
    assert every[0].init_args.every_n_train_steps == 7  # the cadence is still one flag away


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_experiment_config_parses(config):
    cfg = _parse(["--config", str(config), "--trainer", str(ROOT / "trainers" / "cpu.yaml")])
    assert cfg.fit.model["class_path"].startswith("kedit.lightning.")
    assert cfg.fit.data["class_path"].startswith("kedit.lightning.")


@pytest.mark.skipif(not HPARAM_CONFIGS, reason="no hyperparameter-only configs")
@pytest.mark.parametrize("config", HPARAM_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_hparam_config_parses(config):
    """configs/<editor>/*.yaml without class_path are editor hyperparameter files (kedit.editor(name, config))."""
    import yaml

    from kedit.config import load_hparams
    from kedit.editors.base import editor_class

    editor = config.parent.name
    try:
        cls = editor_class(editor)
    except (KeyError, ImportError, AttributeError):
        pytest.skip(f"no editor {editor!r} for {config}")
    text = yaml.safe_load(config.read_text()) or {}
    if not isinstance(text, dict):
        pytest.fail(f"{config} is not a mapping")
    load_hparams(cls.Hparams, config)


def test_typed_values_stay_typed():
    cfg = _parse(["--config", str(ROOT / "configs" / "mend" / "smollm2-counterfact.yaml"),
                  "--trainer", str(ROOT / "trainers" / "cpu.yaml")])
    editor = cfg.fit.model["init_args"]["editor"]
    assert isinstance(editor["lr"], float) and editor["lr"] == 1e-4  # not the string "1.0e-4"


def test_bad_config_value_is_a_clear_error():
    with pytest.raises(Exception, match="rank"):
        _parse(["--config", str(ROOT / "configs" / "mend" / "tiny-llama.yaml"),
                "--trainer", str(ROOT / "trainers" / "cpu.yaml"), "--model.init_args.editor.rank=many"])


def test_wandb_logger_offline_without_key(monkeypatch, tmp_path):
    from kedit.lightning.common import WandbLogger, wandb_key_configured

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert not wandb_key_configured()
    logger = WandbLogger(project="kedit-test", save_dir=str(tmp_path))
    assert logger._offline
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password abc\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_key_configured()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert WandbLogger(project="kedit-test", save_dir=str(tmp_path))._offline is False


def test_export_rejects_foreign_checkpoint(tmp_path):
    import torch

    from kedit.train import export

    torch.save({"state_dict": {}}, tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match="not written by a kedit editor module"):
        export(tmp_path / "x.ckpt", tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="training checkpoint"):
        import kedit

        kedit.load_editor(tmp_path / "x.ckpt")


# --------------------------------------------------------------------------- CLI: resume, user errors, W&B temporaries


def _fit_args(data, *extra):
    """A tiny MEND run of the CLI: checkpoints/ and logs/ in the working directory, no loggers."""
    return ["fit", "--config", str(ROOT / "configs" / "mend" / "tiny-llama.yaml"),
            "--trainer", str(ROOT / "trainers" / "cpu.yaml"), f"--data.init_args.train_path={data}",
            "--data.init_args.val_size=2", "--trainer.logger=false", "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", *extra]


def test_cli_resumes_from_checkpoint_file(tmp_path, monkeypatch):
    """``--ckpt_path <file>`` resumes: 2 steps, then 1 more from the file == 3 steps in one run
    (LightningCLI used to exit 2: "Parsing of ckpt_path hyperparameters failed!")."""
    import torch

    from kedit.testing import write_edit_file
    from kedit.train import main

    data = write_edit_file(tmp_path / "edits.json", 8)
    for run in ("full", "parts"):
        (tmp_path / run).mkdir()
    monkeypatch.chdir(tmp_path / "full")
    main(_fit_args(data, "--trainer.max_steps=3"))
    monkeypatch.chdir(tmp_path / "parts")
    main(_fit_args(data, "--trainer.max_steps=2"))
    (tmp_path / "parts" / "checkpoints" / "last.ckpt").rename(tmp_path / "step2.ckpt")
    main(_fit_args(data, "--trainer.max_steps=3", "--ckpt_path", str(tmp_path / "step2.ckpt")))
    full, parts = (torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True) for run in ("full", "parts"))
    assert parts["global_step"] == 3
    assert all(torch.equal(parts["state_dict"][k], v) for k, v in full["state_dict"].items())


def test_cli_resume_last_without_checkpoint_fails(tmp_path, monkeypatch):
    """``--ckpt_path last`` with nothing to resume is an error (Lightning warned and trained from scratch)."""
    from kedit.testing import write_edit_file
    from kedit.train import main

    monkeypatch.chdir(tmp_path)
    data = write_edit_file(tmp_path / "edits.json", 8)
    with pytest.raises(SystemExit, match=r"--ckpt_path last: no last checkpoint in .*checkpoints.*leave out --ckpt_path"):
        main(_fit_args(data, "--trainer.max_steps=2", "--ckpt_path", "last"))
    with pytest.raises(SystemExit, match=r"--ckpt_path .*nosuch.ckpt: no such checkpoint file"):
        main(_fit_args(data, "--trainer.max_steps=2", "--ckpt_path", str(tmp_path / "nosuch.ckpt")))
    assert not (tmp_path / "checkpoints").exists()


def test_cli_missing_data_file_is_one_line_before_loggers(tmp_path, monkeypatch):
    """A missing data file: one line naming the config key and the file, no model, W&B or CSV run made."""
    from kedit.train import main

    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(ROOT / "configs" / "mend" / "tiny-llama.yaml"),
            "--trainer", str(ROOT / "trainers" / "cpu.yaml"), f"--data.init_args.train_path={tmp_path / 'no.json'}"]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert str(exit_.value) == f"error: data.init_args.train_path: no such file: {tmp_path / 'no.json'}"
    assert not (tmp_path / "logs").exists() and not (tmp_path / "checkpoints").exists()


def test_cli_unknown_model_is_one_line(tmp_path, monkeypatch):
    """A model that is no offline model, no folder and not on the (offline) hub: one line listing
    the offline names, although jsonargparse wraps what the module's __init__ raised."""
    from kedit.train import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["fit", "--config", str(ROOT / "configs" / "mend" / "tiny-llama.yaml"), "--trainer.logger=false",
            "--model.init_args.model=nosuch-model"]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    message = str(exit_.value)
    assert message.startswith("error: no model 'nosuch-model'") and "smollm2-135m" in message and "\n" not in message


@pytest.mark.parametrize("content", ["[]", "[42]", "{not json"], ids=["empty", "bad-record", "not-json"])
def test_cli_unusable_data_file_is_one_line(tmp_path, monkeypatch, content):
    """A data file with nothing to train on: one line that names the file (was a traceback)."""
    from kedit.train import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "edits.json").write_text(content)
    with pytest.raises(SystemExit) as exit_:
        main(_fit_args(tmp_path / "edits.json", "--trainer.max_steps=1"))
    message = str(exit_.value)
    assert message.startswith("error: ") and "edits.json" in message and "\n" not in message, message


def test_edit_data_module_refuses_missing_file(tmp_path):
    from kedit.lightning.common import DataFileError
    from kedit.lightning.data import EditDataModule
    from kedit.testing import write_edit_file

    data = write_edit_file(tmp_path / "edits.json", 8)
    with pytest.raises(DataFileError, match=r"data.init_args.val_path: no such file: .*val.json"):
        EditDataModule(str(data), val_path=str(tmp_path / "val.json"))


_KILLED_WANDB = """
import os, signal, sys
from kedit.lightning.wandb_tmp import import_wandb
import_wandb(sys.argv[1])
print(os.getpid(), flush=True)
if sys.argv[2] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_wandb_temporaries_of_killed_runs_are_removed(tmp_path):
    """W&B's import-time temp folders go to <root>/<host>-<pid>: gone after a normal exit; after a SIGKILL
    they stay until the next import_wandb removes them."""
    import os
    import socket
    import subprocess
    import sys

    from kedit.lightning.wandb_tmp import remove_stale_tmp

    root = tmp_path / "kedit-wandb"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}

    def child(mode):
        res = subprocess.run([sys.executable, "-c", _KILLED_WANDB, str(root), mode], env=env, capture_output=True,
                             text=True, timeout=300)
        return res, root / f"{socket.gethostname()}-{res.stdout.split()[0]}"

    res, own = child("exit")
    assert res.returncode == 0, res.stderr[-2000:]
    assert not own.exists()
    res, own = child("kill")
    assert res.returncode == -9
    assert sorted(p.name.rsplit("wandb-", 1)[-1] for p in own.iterdir()) == ["artifacts", "media"]
    alive = root / f"{socket.gethostname()}-{os.getpid()}"  # this process: kept
    other = root / "otherhost-1"  # another machine's (a shared temp folder): kept
    alive.mkdir()
    other.mkdir()
    assert remove_stale_tmp(root) == [own]
    assert not own.exists() and alive.is_dir() and other.is_dir()


# --------------------------------------------------------------------------- checkpoints: where, and which survive


def test_preset_checkpoint_keeps_the_best_by_a_named_metric_and_last(tmp_path, monkeypatch):
    """The presets' ModelCheckpoint with ``--trainer.callbacks.init_args.monitor=val/locality``: the
    best validation's checkpoint survives beside last.ckpt, both in <default_root_dir>/checkpoints
    (not in the working directory)."""
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    from kedit.lightning.common import RunModelCheckpoint

    scores = [0.5, 0.9, 0.7, 0.6]  # val/locality at the validations after steps 1, 2, 3, 4

    class Scripted(BoringModel):
        def on_validation_epoch_end(self):
            self.log("val/locality", scores[self.global_step - 1])

    cfg = _parse(["--config", str(ROOT / "configs" / "mend" / "tiny-llama.yaml"),
                  "--trainer", str(TRAINERS[0]), "--trainer.callbacks.init_args.monitor=val/locality"]).fit.trainer
    (spec,) = cfg.callbacks
    assert spec.init_args.mode == "max" and spec.init_args.monitor == "val/locality"
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    callback = RunModelCheckpoint(**vars(spec.init_args))
    trainer = L.Trainer(max_steps=4, val_check_interval=1, limit_val_batches=1, check_val_every_n_epoch=None,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path / "run"), callbacks=[callback])
    trainer.fit(Scripted())
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert saved == ["epoch=0-step=2.ckpt", "last.ckpt"], saved
    assert callback.best_model_score.item() == pytest.approx(0.9)
    assert list((tmp_path / "cwd").iterdir()) == []  # nothing in the working directory


def test_cli_checkpoints_follow_default_root_dir(tmp_path, monkeypatch):
    """``--trainer.default_root_dir`` is the run's folder: the presets' checkpoints go there, and
    ``--ckpt_path last`` finds them there (the test that wrote checkpoints/last.ckpt into the
    repository passed a default_root_dir that the preset's ``dirpath: checkpoints`` ignored)."""
    from kedit.testing import write_edit_file
    from kedit.train import main

    data = write_edit_file(tmp_path / "edits.json", 8)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    run = f"--trainer.default_root_dir={tmp_path / 'run'}"
    main(_fit_args(data, "--trainer.max_steps=1", run))
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    main(_fit_args(data, "--trainer.max_steps=2", run, "--ckpt_path", "last"))
    import torch

    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert list((tmp_path / "cwd").iterdir()) == []

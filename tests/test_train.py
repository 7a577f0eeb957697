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

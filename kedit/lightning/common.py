"""Lightning pieces shared by the learned editors (MEND, MALMEN, SERAC).

* :class:`WandbLogger`: Lightning's W&B logger that goes offline when no W&B key is set up.
  W&B's temporary folders go to ``$TMPDIR/kedit-wandb/<host>-<pid>`` (:mod:`kedit.lightning.wandb_tmp`),
  where the next run removes those of killed processes.
* :class:`TrainSetupError`: a run that cannot start as configured (missing data file, nothing to
  resume); ``python -m kedit.train`` prints it as one line.
* :class:`EditorCheckpointMixin`: checkpoints hold the editor only, never the frozen base
  model, plus the base model's identity; loading onto another base model is refused.
* :class:`HypernetModule`: the frozen base model, export and validation metrics of the
  gradient-hypernetwork editors (MEND, MALMEN); ``val/score`` for ``ModelCheckpoint(monitor=...)``.
* :class:`ExportEditor` / :func:`export_checkpoint`: write an editor artifact
  (safetensors, see :mod:`kedit.checkpoint`) at the end of fit or from a ``.ckpt``.
* :class:`RunModelCheckpoint`: the presets' checkpoints, in ``<trainer.default_root_dir>/checkpoints``,
  the best by a named validation metric (``monitor``) or the latest, plus ``last.ckpt``.
* :func:`load_base`: the base model by name (:func:`kedit.models.load_model`).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger as _WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from kedit.lightning.wandb_tmp import import_wandb
from kedit.utils import wandb_key_configured, wandb_mode  # noqa: F401 - wandb_key_configured: public here before

log = logging.getLogger(__name__)

CKPT_KEY = "kedit_editor"


class TrainSetupError(Exception):
    """A training run that cannot start as configured; the message names the setting and the file."""


class DataFileError(TrainSetupError, FileNotFoundError):
    """A configured data file does not exist."""


class DataError(TrainSetupError, ValueError):
    """A data file, or the data settings, leave nothing to train or validate on."""


# --------------------------------------------------------------------------- W&B


class WandbLogger(_WandbLogger):
    """``lightning.pytorch.loggers.WandbLogger`` that runs offline when no W&B key is configured.

    Online when ``WANDB_API_KEY`` is set or ``wandb login`` wrote ~/.netrc; otherwise the run
    is written to ``save_dir/wandb`` and can be uploaded later with ``wandb sync``.
    ``WANDB_MODE`` in the environment wins over both.

    W&B's temporary folders of this process and of killed ones: see :mod:`kedit.lightning.wandb_tmp`.
    """

    def __init__(self, *args: Any, offline: bool | None = None, **kwargs: Any) -> None:
        if offline is None:
            offline = wandb_mode() != "online"
            if offline and not os.environ.get("WANDB_MODE"):
                log.info("no W&B key configured: logging offline (upload later with `wandb sync`)")
        kwargs.setdefault("save_dir", "logs")
        Path(kwargs["save_dir"]).mkdir(parents=True, exist_ok=True)
        import_wandb()
        super().__init__(*args, offline=offline, **kwargs)


# --------------------------------------------------------------------------- base model


def load_base(name: str, dtype: str = "float32") -> tuple[nn.Module, Any]:
    """(model, tokenizer): anything :func:`kedit.models.load_model` reads, registered models included."""
    from kedit.models import load_model

    return load_model(name, dtype=dtype)


# --------------------------------------------------------------------------- checkpoints


class EditorCheckpointMixin:
    """For a LightningModule with a frozen base model at ``self.base``.

    ``state_dict`` leaves out ``base.*`` (so ``.ckpt`` files hold only the editor), and the
    checkpoint records the editor name, typed hparams and base identity under
    ``checkpoint["kedit_editor"]``. Subclasses define ``editor_name``, ``artifact_prefix``
    (state-dict prefix of the editor's tensors), ``editor_hparams()`` and ``base_identity()``.
    """

    editor_name: str = ""
    artifact_prefix: str = ""
    export_dtype: torch.dtype | None = None
    """The dtype :meth:`export_editor` stores floating-point tensors in (None: as trained)."""
    _BASE = "base."

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        sd = super().state_dict(*args, **kwargs)  # type: ignore[misc]
        prefix = (kwargs.get("prefix") or (args[1] if len(args) > 1 else "")) + self._BASE
        for key in [k for k in sd if k.startswith(prefix)]:
            del sd[key]
        return sd

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=False, assign=assign)  # type: ignore[misc]
        missing = [k for k in result.missing_keys if not k.startswith(self._BASE)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"{type(self).__name__}: checkpoint does not fit this editor: missing "
                               f"{missing[:5]}, unexpected {result.unexpected_keys[:5]}")
        return result

    def editor_hparams(self) -> dict[str, Any]:
        raise NotImplementedError

    def base_identity(self) -> dict[str, Any]:
        raise NotImplementedError

    def artifact_extra(self) -> dict[str, Any]:
        return {}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CKPT_KEY] = {"editor": self.editor_name, "hparams": self.editor_hparams(),
                                "base": self.base_identity(), "prefix": self.artifact_prefix,
                                "extra": self.artifact_extra()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from kedit.checkpoint import check_base_identity

        meta = checkpoint.get(CKPT_KEY)
        if meta:
            check_base_identity(meta.get("base"), self.base, what=f"{meta.get('editor')} checkpoint")
        resume_inside_cut_epoch(checkpoint)

    def editor_tensors(self) -> dict[str, torch.Tensor]:
        sd = self.state_dict()
        p = self.artifact_prefix
        return {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}

    def export_editor(self, path: str | Path) -> Path:
        """Write this module's editor as a safetensors editor artifact (in :attr:`export_dtype`)."""
        from kedit.checkpoint import save_artifact

        tensors, extra = self.editor_tensors(), self.artifact_extra()
        if self.export_dtype is not None:
            tensors = {k: v.detach().to(self.export_dtype) if v.is_floating_point() else v for k, v in tensors.items()}
            extra = {**extra, "storage_dtype": str(self.export_dtype).removeprefix("torch.")}
        return save_artifact(path, self.editor_name, tensors, self.editor_hparams(), self.base_identity(), extra)


def warn_unused_neighbours(module: LightningModule) -> None:
    """Log a warning when the data module was given ``neighbours`` that ``module``'s loss ignores.

    Only MEND's locality loss uses :class:`~kedit.lightning.data.EditDataModule`'s same-relation
    neighbours (``USES_NEIGHBOURS``); for the others the extra prompts would be loaded for nothing.
    """
    data = getattr(module.trainer, "datamodule", None)
    n = getattr(data, "neighbours", 0)
    if n and not getattr(module, "USES_NEIGHBOURS", False):
        log.warning("%s ignores EditDataModule(neighbours=%d): only MEND's locality loss uses "
                    "same-relation neighbours", type(module).__name__, n)


class HypernetModule(EditorCheckpointMixin, LightningModule):
    """What the gradient-hypernetwork editors' modules (MEND, MALMEN) share: the frozen base model,
    its identity, the editor view of the hypernetwork, export, and the validation metrics.

    A subclass sets ``Hparams`` (the editor's dataclass), ``Editor`` (its inference class, which
    takes ``(hparams, net=, base=)``), ``editor_name`` and ``artifact_prefix``, builds its
    hypernetwork, exposes it as :attr:`net` and fills ``self.metrics`` (name -> ``MeanMetric``,
    logged as ``val/<name>`` at each validation end).
    """

    Hparams: type = object
    Editor: type = object
    VAL_SCORE = ("edit_success", "paraphrase_success", "locality")
    """Metrics whose harmonic mean is logged as ``val/score`` (for ModelCheckpoint's ``monitor``)."""
    USES_NEIGHBOURS = False
    """Whether the training loss uses the data module's same-relation ``neighbours`` (MEND's does)."""

    def __init__(self, model: str, editor: Any, dtype: str) -> None:
        super().__init__()
        if isinstance(editor, dict):  # from a checkpoint's hparams
            editor = self.Hparams(**editor)
        self.cfg = editor or self.Hparams()
        self.save_hyperparameters({"model": model, "editor": self.cfg.as_dict(), "dtype": dtype})
        self.base, self.tokenizer = load_base(model, dtype)
        self.base.requires_grad_(False).eval()
        from kedit.models import arch_of

        self.arch = arch_of(self.base)
        self.seq2seq = self.arch.encoder_decoder
        self._identity: dict[str, Any] | None = None

    @property
    def net(self) -> nn.Module:
        """The hypernetwork (``names``: the edited weights)."""
        raise NotImplementedError

    def on_fit_start(self) -> None:
        warn_unused_neighbours(self)

    # keep the frozen base in eval mode (no dropout) whatever Lightning asks
    def train(self, mode: bool = True):
        super().train(mode)
        self.base.eval()
        return self

    # -- checkpoint content (EditorCheckpointMixin)
    def editor_hparams(self) -> dict[str, Any]:
        return self.cfg.as_dict()

    def base_identity(self) -> dict[str, Any]:
        if self._identity is None:
            from kedit.checkpoint import base_model_identity

            self._identity = base_model_identity(self.base)
            params = dict(self.base.named_parameters())
            self._identity["shapes"] = {n: list(params[n].shape) for n in self.net.names}
        return self._identity

    def artifact_extra(self) -> dict[str, Any]:
        return {**self.as_editor().artifact_state()[1], "model": self.hparams["model"]}

    def as_editor(self):
        """The current hypernetwork as an inference editor (shares its weights)."""
        return self.Editor(self.cfg, net=self.net, base=self.base_identity())

    def export_editor(self, path: str | Path) -> Path:
        """Write the trained editor as a ``kedit.load_editor`` artifact (the editor's ``save``)."""
        return self.as_editor().save(path, extra={"model": self.hparams["model"]})

    # -- the base model
    def _encode(self, prompts: list[str], targets: list[str]) -> dict[str, torch.Tensor]:
        from kedit.data.encode import encode

        return encode(self.tokenizer, prompts, targets, seq2seq=self.seq2seq, device=self.device)

    def _forward(self, params: dict[str, torch.Tensor] | None, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of the base model, with ``params`` swapped in (never written) when given."""
        from kedit.data.encode import model_inputs

        if params is None:
            return self.base(**model_inputs(batch)).logits
        return torch.func.functional_call(self.base, params, (), model_inputs(batch)).logits

    # -- logging
    def on_train_start(self) -> None:
        self._t0, self._step0 = time.perf_counter(), self.global_step

    def log_speed(self) -> None:
        """``perf/steps_per_s`` since this fit started and ``perf/peak_mem_mb``."""
        from kedit.utils import peak_memory_mb

        steps = self.global_step - getattr(self, "_step0", 0) + 1
        elapsed = time.perf_counter() - getattr(self, "_t0", time.perf_counter())
        self.log("perf/steps_per_s", steps / max(elapsed, 1e-9), batch_size=1)
        self.log("perf/peak_mem_mb", peak_memory_mb(self.device), batch_size=1)

    def on_validation_epoch_end(self) -> None:
        values = {}
        for key, metric in self.metrics.items():  # torchmetrics reduce across DDP ranks
            values[key] = metric.compute()
            self.log(f"val/{key}", values[key], prog_bar=key in ("edit_success", "locality"))
            metric.reset()
        if all(k in values for k in self.VAL_SCORE):
            self.log("val/score", val_score([values[k] for k in self.VAL_SCORE]), prog_bar=True)


def val_score(values: list[torch.Tensor]) -> torch.Tensor:
    """Harmonic mean of success rates in [0, 1]: high only when every one is (0 if any is 0)."""
    v = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in values]).clamp(min=0)
    return torch.zeros(()) if (v == 0).any() else len(v) / (1 / v).sum()


def resume_inside_cut_epoch(checkpoint: dict[str, Any]) -> bool:
    """Make a checkpoint of an epoch that ``max_steps`` cut short resume inside that epoch.

    The checkpoint written when a fit stops at ``max_steps`` counts its epoch as finished even when
    the epoch's last batch was not reached, so a run continued from it (``--ckpt_path last
    --trainer.max_steps=<more>``) would start the next epoch and never train on the rest of this
    one. Its loop state is changed to that of a checkpoint written after the same step inside the
    epoch (as ``every_n_train_steps`` writes them), which Lightning resumes exactly. Loads the
    loop state in place (before Lightning restores the loops); True when it changed it.
    """
    try:
        loop = checkpoint["loops"]["fit_loop"]
        epochs, batches = loop["epoch_progress"], loop["epoch_loop.batch_progress"]
        cut = (not batches["is_last_batch"] and batches["current"]["processed"] > 0
               and epochs["current"]["processed"] == epochs["current"]["started"] >= 1)
        if not cut:
            return False
        for part in ("current", "total"):
            epochs[part]["processed"] = epochs[part]["completed"] = epochs[part]["started"] - 1
            if batches[part]["completed"] == batches[part]["processed"]:
                batches[part]["completed"] -= 1
        stepped = loop.get("epoch_loop.state_dict", {})
        if "_batches_that_stepped" in stepped:
            stepped["_batches_that_stepped"] = max(0, stepped["_batches_that_stepped"] - 1)
        checkpoint["epoch"] = epochs["current"]["started"] - 1
    except (KeyError, TypeError):  # another Lightning layout: leave it to Lightning
        return False
    log.info("checkpoint of step %s ends inside epoch %d: resuming inside it", checkpoint.get("global_step"),
             checkpoint["epoch"])
    return True


def export_checkpoint(ckpt: str | Path, out: str | Path) -> Path:
    """Editor artifact from a Lightning checkpoint, without building the base model."""
    from kedit.checkpoint import save_artifact, torch_load_safe

    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(f"no checkpoint at {ckpt}")
    state = torch_load_safe(ckpt)
    meta = state.get(CKPT_KEY)
    if not meta:
        raise ValueError(f"{ckpt} was not written by a kedit editor module (no {CKPT_KEY!r} entry)")
    p = meta.get("prefix", "")
    tensors = {k[len(p):]: v for k, v in state["state_dict"].items() if k.startswith(p)}
    extra = dict(meta.get("extra") or {})
    extra.update(global_step=state.get("global_step"), epoch=state.get("epoch"), source=str(ckpt))
    return save_artifact(out, meta["editor"], tensors, meta["hparams"], meta.get("base"), extra)


class RunModelCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose relative ``dirpath`` lies in the run's folder,
    ``trainer.default_root_dir`` (the working directory unless ``--trainer.default_root_dir`` sets
    it), not in the working directory the callback was made in. The trainer presets' checkpoints
    (``trainers/shared/callbacks.yaml``: ``dirpath: checkpoints``) go to ``<default_root_dir>/checkpoints``.

    With ``monitor`` (``val/score``, ``val/locality``, ... and ``mode``) the ``save_top_k`` best
    checkpoints by that validation metric are kept beside ``last.ckpt``; without, the latest.
    """

    def __init__(self, dirpath: str | Path | None = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(dirpath, *args, **kwargs)
        relative = dirpath is not None and "://" not in str(dirpath) and not Path(dirpath).expanduser().is_absolute()
        self._relative = str(dirpath) if relative else None

    def resolve_dirpath(self, trainer: Trainer) -> None:
        """Put a relative ``dirpath`` inside ``trainer.default_root_dir`` (once the trainer is known)."""
        if self._relative is not None:
            self.dirpath = os.path.realpath(os.path.join(trainer.default_root_dir, self._relative))

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.resolve_dirpath(trainer)
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer: Trainer) -> set[str]:  # ckpt_path="last", before setup
        self.resolve_dirpath(trainer)
        return super()._find_last_checkpoints(trainer)


def last_checkpoints(trainer: Trainer) -> list[str]:
    """The files ``ckpt_path="last"`` chooses from: "last" checkpoints in the ModelCheckpoint folders."""
    from lightning.fabric.utilities.cloud_io import get_filesystem

    found = []
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, RunModelCheckpoint):
            cb.resolve_dirpath(trainer)
        if isinstance(cb, ModelCheckpoint) and cb.dirpath:
            fs = get_filesystem(cb.dirpath)
            if fs.isdir(cb.dirpath):
                found += [p for p in fs.ls(cb.dirpath, detail=False)
                          if cb.CHECKPOINT_NAME_LAST in os.path.basename(p) and p.endswith(cb.FILE_EXTENSION)]
    return found


def check_ckpt_path(trainer: Trainer, ckpt_path: str | None) -> None:
    """Refuse a ``--ckpt_path`` that would not resume: ``last`` with no last checkpoint, or a missing file.

    (Lightning warns and trains from scratch for the first.)
    """
    if not ckpt_path or ckpt_path in ("hpc", "best") or "://" in str(ckpt_path):
        return
    if ckpt_path == "last":
        if not last_checkpoints(trainer):
            dirs = sorted({str(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)})
            where = f"in {', '.join(dirs)}" if dirs else "(no ModelCheckpoint with a dirpath)"
            raise TrainSetupError(f"--ckpt_path last: no last checkpoint {where} to resume from; "
                                  "to start a new run, leave out --ckpt_path")
    elif not Path(ckpt_path).is_file():
        raise TrainSetupError(f"--ckpt_path {ckpt_path}: no such checkpoint file")


class ExportEditor(Callback):
    """Write the editor artifact when fit ends (rank zero); ``python -m kedit.train fit --export PATH``."""

    def __init__(self, path: str) -> None:
        self.path = path

    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not hasattr(pl_module, "export_editor"):
            raise TypeError(f"{type(pl_module).__name__} has no export_editor(); cannot export an editor")
        path = pl_module.export_editor(self.path)
        log.info("exported editor artifact to %s", path)


class KillAtStep(Callback):
    """Fault injection for resume tests: SIGKILL this process when training step ``step`` starts.

    ``python -m kedit.train fit ... --trainer.callbacks+='{"class_path": "kedit.lightning.common.KillAtStep",
    "init_args": {"step": 5}}'``: the checkpoints of steps before ``step`` are complete, nothing after it runs.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)

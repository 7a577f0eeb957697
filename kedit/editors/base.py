"""The one editing interface: ``Editor.edit(model, tokenizer, requests) -> Edit``.

An :class:`Edit` is an object. ``apply`` changes the model, ``restore`` puts back the exact
bits it changed, ``applied`` does both around a block, and ``save``/``Edit.load`` share it.
Weight editors (ROME, MEMIT, AlphaEdit, MEND, FT, LoRA) return a :class:`WeightDelta`;
memory editors (SERAC) return their own ``Edit`` whose ``apply`` installs a routing hook.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from kedit.data.request import EditRequest

FORMAT_VERSION = 1


class EditMismatchError(RuntimeError):
    """An edit is applied to a model other than the one it was computed on."""


class EditStateError(RuntimeError):
    """``apply`` twice, or ``restore`` before ``apply``."""


# --------------------------------------------------------------------------- identity


def tensor_hash(tensors: Mapping[str, Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_name_or_path", "") or getattr(config, "model_type", "") or type(model).__name__)


def base_identity(model: nn.Module, names: Sequence[str]) -> dict[str, str]:
    """Identity of the base weights an edit touches: model name plus a hash of their values."""
    params = dict(model.named_parameters())
    return {"name": model_name(model), "hash": tensor_hash({n: params[n] for n in names})}


# --------------------------------------------------------------------------- Edit


_EDIT_KINDS: dict[str, type[Edit]] = {}


class Edit(ABC):
    """A change to a model that can be applied, restored bit-exactly, saved and loaded."""

    kind: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            _EDIT_KINDS[cls.kind] = cls

    @abstractmethod
    def apply(self, model: nn.Module) -> None: ...

    @abstractmethod
    def restore(self, model: nn.Module) -> None: ...

    @property
    def is_applied(self) -> bool:
        return False

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Apply for the duration of a ``with`` block, restore on exit (also on errors)."""
        self.apply(model)
        try:
            yield model
        finally:
            self.restore(model)

    # serialization: subclasses give tensors + JSON-able metadata
    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        raise NotImplementedError(f"{type(self).__name__} cannot be saved")

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Edit:
        raise NotImplementedError(f"{cls.__name__} cannot be loaded")

    def save(self, path: str | Path) -> Path:
        """Write a safetensors file whose header holds the edit's kind and metadata as JSON."""
        if self.is_applied:
            raise EditStateError("restore the edit before saving it (saved weights are not state)")
        tensors, meta = self.state()
        header = {"kedit_format": FORMAT_VERSION, "kind": self.kind, "meta": meta}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path),
                  metadata={"kedit": json.dumps(header)})
        return path

    @staticmethod
    def load(path: str | Path, model: nn.Module | None = None) -> Edit:
        """Load an edit saved with :meth:`save`. If ``model`` is given, check it is the base."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no edit file at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {})["kedit"])
        except KeyError:
            raise ValueError(f"{path} is a safetensors file but not a kedit edit (no 'kedit' header)") from None
        except Exception as err:
            raise ValueError(f"{path} is not a readable kedit edit file: {err}") from None
        kind = header.get("kind")
        if kind not in _EDIT_KINDS:
            _import_edit_kinds()
        if kind not in _EDIT_KINDS:
            raise ValueError(f"{path}: unknown edit kind {kind!r}; known: {sorted(_EDIT_KINDS)}")
        edit = _EDIT_KINDS[kind].from_state(load_file(str(path)), header["meta"])
        if model is not None:
            edit.check_base(model)
        return edit

    def check_base(self, model: nn.Module) -> None:
        """Raise :class:`EditMismatchError` if ``model`` is not the model this edit was made for."""


def _import_edit_kinds() -> None:
    """Edit kinds register on import; load the editor modules that define extra kinds."""
    import importlib

    for target in EDITORS.values():
        try:
            importlib.import_module(target.split(":")[0])
        except ImportError:
            pass


@dataclass
class WeightDelta(Edit):
    """``W[name] += left @ right.T`` (low rank) or ``W[name] += dense[name]``.

    Factors are in the parameter's storage orientation (see ``Arch.low_rank_factors``).
    ``base`` records the model name and a hash of the original values of the touched
    weights; applying onto other weights raises :class:`EditMismatchError`.
    """

    factors: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    dense: dict[str, Tensor] = field(default_factory=dict)
    base: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    saved: dict[str, Tensor] = field(default_factory=dict, repr=False)
    kind: ClassVar[str] = "weight_delta"

    @property
    def names(self) -> list[str]:
        return sorted({*self.factors, *self.dense})

    @property
    def is_applied(self) -> bool:
        return bool(self.saved)

    def delta(self, name: str) -> Tensor:
        """The full update of one parameter (sum of its low-rank and dense parts)."""
        out = None
        if name in self.factors:
            left, right = self.factors[name]
            out = left @ right.T
        if name in self.dense:
            out = self.dense[name] if out is None else out + self.dense[name]
        if out is None:
            raise KeyError(name)
        return out

    def check_base(self, model: nn.Module) -> None:
        if not self.base:
            return
        params = dict(model.named_parameters())
        missing = [n for n in self.names if n not in params]
        if missing:
            raise EditMismatchError(f"edit for {self.base.get('name')!r} touches {missing}, "
                                    f"which {model_name(model)!r} does not have")
        got = tensor_hash({n: params[n] for n in self.names})
        if got != self.base.get("hash"):
            raise EditMismatchError(
                f"this edit was computed on {self.base.get('name')!r} (weights hash "
                f"{self.base.get('hash', '')[:12]}…), but the model given is {model_name(model)!r} "
                f"with hash {got[:12]}… for the edited weights. Apply it to the model (and the "
                f"edit stack) it was made on."
            )

    @torch.no_grad()
    def apply(self, model: nn.Module, check: bool = True) -> None:
        if self.saved:
            raise EditStateError("edit is already applied; restore it first")
        if check:
            self.check_base(model)
        params = dict(model.named_parameters())
        for name in self.names:
            p = params[name]
            self.saved[name] = p.detach().clone()
            p.add_(self.delta(name).to(device=p.device, dtype=p.dtype))

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        if not self.saved:
            raise EditStateError("edit is not applied")
        params = dict(model.named_parameters())
        for name, w in self.saved.items():
            params[name].copy_(w)  # copy, not subtract: in low precision W + d - d != W
        self.saved.clear()

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors: dict[str, Tensor] = {}
        for name, (left, right) in self.factors.items():
            tensors[f"factors.{name}.left"] = left
            tensors[f"factors.{name}.right"] = right
        for name, d in self.dense.items():
            tensors[f"dense.{name}"] = d
        return tensors, {"base": self.base, "info": self.info}

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> WeightDelta:
        factors: dict[str, list[Tensor]] = {}
        dense: dict[str, Tensor] = {}
        for key, t in tensors.items():
            if key.startswith("factors."):
                name, side = key[len("factors."):].rsplit(".", 1)
                factors.setdefault(name, [None, None])[side == "right"] = t
            elif key.startswith("dense."):
                dense[key[len("dense."):]] = t
        return cls(factors={n: (lr[0], lr[1]) for n, lr in factors.items()}, dense=dense,
                   base=meta.get("base", {}), info=meta.get("info", {}))


@dataclass
class EditStack(Edit):
    """Edits applied in order (sequential editing); restored in reverse, bit-exactly."""

    edits: list[Edit] = field(default_factory=list)
    kind: ClassVar[str] = "stack"
    _applied: int = field(default=0, repr=False)

    @property
    def is_applied(self) -> bool:
        return self._applied > 0

    def push(self, edit: Edit, model: nn.Module | None = None) -> None:
        """Add an edit; if the stack is applied (and ``model`` given), apply it on top."""
        self.edits.append(edit)
        if self._applied:
            if model is None:
                raise EditStateError("the stack is applied: pass the model to push onto it")
            edit.apply(model)
            self._applied += 1

    def apply(self, model: nn.Module) -> None:
        if self._applied:
            raise EditStateError("stack is already applied")
        try:
            for edit in self.edits:
                edit.apply(model)
                self._applied += 1
        except BaseException:
            self.restore(model)
            raise

    def restore(self, model: nn.Module) -> None:
        while self._applied:
            self.edits[self._applied - 1].restore(model)
            self._applied -= 1

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors: dict[str, Tensor] = {}
        metas = []
        for i, edit in enumerate(self.edits):
            t, m = edit.state()
            tensors.update({f"{i}/{k}": v for k, v in t.items()})
            metas.append({"kind": edit.kind, "meta": m})
        return tensors, {"edits": metas}

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> EditStack:
        edits = []
        for i, sub in enumerate(meta["edits"]):
            prefix = f"{i}/"
            mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if sub["kind"] not in _EDIT_KINDS:
                _import_edit_kinds()
            edits.append(_EDIT_KINDS[sub["kind"]].from_state(mine, sub["meta"]))
        return cls(edits=edits)

    def check_base(self, model: nn.Module) -> None:
        if self.edits:
            self.edits[0].check_base(model)


# --------------------------------------------------------------------------- Editor


Requests = EditRequest | Mapping[str, Any] | Sequence[EditRequest | Mapping[str, Any]]


def as_requests(requests: Requests) -> list[EditRequest]:
    """Accept one request or many, as :class:`EditRequest` or plain dicts."""
    from kedit.data import to_requests

    if isinstance(requests, (EditRequest, Mapping)):
        requests = [requests]
    return to_requests(requests)


class Editor(ABC):
    """Computes edits. ``edit`` never changes the model it is given."""

    name: ClassVar[str] = ""
    Hparams: ClassVar[type] = object

    def __init__(self, hparams: Any = None, **overrides: Any) -> None:
        if hparams is None:
            hparams = self.Hparams(**overrides)
        elif overrides:
            hparams = dataclasses.replace(hparams, **overrides)
        self.hparams = hparams

    @abstractmethod
    def edit(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Requests) -> Edit:
        """Compute the edit for ``requests`` (one or a batch); leave ``model`` untouched."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.hparams})"


# Name -> "module:Class". Imported on first use, so importing kedit stays light.
EDITORS: dict[str, str] = {}


def register(name: str, target: str) -> None:
    """Register an editor class by import path, e.g. ``register("rome", "kedit.editors.rome:ROME")``."""
    EDITORS[name] = target


def editor_class(name: str) -> type[Editor]:
    import importlib

    key = name.lower()
    if key not in EDITORS:
        raise KeyError(f"unknown editor {name!r}; registered: {', '.join(sorted(EDITORS))}")
    module, cls = EDITORS[key].split(":")
    return getattr(importlib.import_module(module), cls)


def editor(name: str, config: str | Path | None = None, *, model: nn.Module | None = None,
           model_name: str | None = None, **hparams: Any) -> Editor:
    """``kedit.editor("rome", layers=[5])``: an editor with typed hyperparameters.

    ``config`` chooses the YAML of hyperparameters, parsed with the dataclass's types:

    * ``None``: none; the dataclass defaults hold the papers' values;
    * ``"auto"``: the values tuned for ``model`` that ship with kedit
      (``configs/<editor>/<model name>.yaml``, else ``configs/<editor>/<model_type>.yaml``;
      the papers' values when neither exists). Needs ``model=`` (or ``model_name=``);
    * a shipped config's name (``"llama"``) or the path of a YAML file.

    Keyword arguments override the config.
    """
    from kedit import paths

    cls = editor_class(name)
    if config is not None and str(config) == "auto":
        if model is None and model_name is None:
            raise ValueError('config="auto" picks the tuned values for a model: pass model= (or model_name=)')
        config = paths.tuned_config(name, model, model_name)
    if config is not None:
        from kedit.config import load_hparams

        base = load_hparams(cls.Hparams, paths.config_path(name, config))
        return cls(base, **hparams)
    return cls(**hparams)

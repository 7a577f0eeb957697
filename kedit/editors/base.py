"""The one editing interface: ``Editor.edit(model, tokenizer, requests) -> Edit``.

An :class:`Edit` is an object. ``apply`` changes the model, ``restore`` puts back the exact
bits it changed, ``applied`` does both around a block, and ``save``/``Edit.load`` share it.
Weight editors (ROME, MEMIT, AlphaEdit, MEND, FT, LoRA) return a :class:`WeightDelta`;
memory editors (SERAC) return their own ``Edit`` whose ``apply`` installs a routing hook.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from kedit.data.request import EditRequest
from kedit.identity import EditMismatchError, identity, matches, model_name, tensor_hash, weights_version

# EditMismatchError, model_name and tensor_hash were defined here first: they stay importable from here

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class EditStateError(RuntimeError):
    """``apply`` twice, or ``restore`` before ``apply``."""


class InvalidEditError(ValueError):
    """An edit that must not be applied: non-finite values, a shape that does not fit its
    weight, or metadata that does not follow the schema."""


class EditFileError(InvalidEditError):
    """A kedit edit or editor file that is malformed, corrupt or of an unknown format.
    The message names the file and the field."""


# --------------------------------------------------------------------------- identity


base_identity = identity
"""The identity of the base weights an edit touches (:func:`kedit.identity.identity`)."""


def verify_checksum(tensors: Mapping[str, Tensor], expected: Any, source: str | Path) -> None:
    """Check a file's tensors against the ``sha256`` (:func:`tensor_hash`) its header records.

    Files written before kedit stored checksums have none: they load unverified.
    """
    if expected is None:
        log.debug("%s has no checksum (written by an older kedit): its tensors are not verified", source)
        return
    if not isinstance(expected, str) or tensor_hash(tensors) != expected:
        raise EditFileError(f"{source}: field 'sha256': the tensors do not match the checksum in the "
                            "header; the file is corrupt")


def require(meta: Any, key: str, kind: type | tuple[type, ...], where: str = "meta") -> Any:
    """``meta[key]`` if it is a ``kind``, else :class:`InvalidEditError` naming the field."""
    if not isinstance(meta, Mapping):
        raise InvalidEditError(f"field {where!r} is a {type(meta).__name__}, not an object")
    if key not in meta:
        raise InvalidEditError(f"field '{where}.{key}' is missing")
    value = meta[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        want = " or ".join(k.__name__ for k in kinds)
        raise InvalidEditError(f"field '{where}.{key}' is a {type(value).__name__}, not a {want}")
    return value


def require_strs(meta: Any, key: str, where: str = "meta") -> list[str]:
    """``meta[key]`` if it is a list of strings, else :class:`InvalidEditError` naming the field."""
    value = require(meta, key, list, where)
    bad = [i for i, v in enumerate(value) if not isinstance(v, str)]
    if bad:
        raise InvalidEditError(f"field '{where}.{key}[{bad[0]}]' is a {type(value[bad[0]]).__name__}, not a str")
    return value


def require_base(meta: Any, where: str = "meta") -> dict[str, Any]:
    """A recorded base-model identity: a non-empty name and hash."""
    base = require(meta, "base", dict, where)
    for key in ("name", "hash"):
        if not require(base, key, str, f"{where}.base"):
            raise InvalidEditError(f"field '{where}.base.{key}' is empty")
    return base


# --------------------------------------------------------------------------- Edit


_EDIT_KINDS: dict[str, type[Edit]] = {}


class Edit(ABC):
    """A change to a model that can be applied, restored bit-exactly, saved and loaded."""

    kind: ClassVar[str] = ""
    source: str | None = None
    """The file a loaded edit came from (set by :meth:`load`), for error messages."""

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
        """Write a safetensors file whose header holds the edit's kind, metadata and the
        sha256 of its tensors as JSON."""
        if self.is_applied:
            raise EditStateError("restore the edit before saving it (saved weights are not state)")
        return write_edit_file(self, path)

    @staticmethod
    def load(path: str | Path, model: nn.Module | None = None) -> Edit:
        """Load an edit saved with :meth:`save`. If ``model`` is given, check it is the base.

        The format version, the checksum, the metadata schema and the tensors' finiteness
        are checked; a bad file raises :class:`EditFileError` naming it and the field.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no edit file at {path}")
        header, tensors = _read_edit_file(path)
        try:
            edit = _EDIT_KINDS[header["kind"]].from_state(tensors, header["meta"])
        except EditFileError:
            raise
        except InvalidEditError as err:
            raise EditFileError(f"{path}: {err}") from None
        edit.source = str(path)
        if model is not None:
            edit.check_base(model)
        return edit

    def check_base(self, model: nn.Module) -> None:
        """Raise :class:`EditMismatchError` if ``model`` is not the model this edit was made for."""


def write_edit_file(edit: Edit, path: str | Path) -> Path:
    """Write ``edit``'s state (tensors and metadata) as :meth:`Edit.save` does, applied or not.

    The state never holds the weights an applied edit keeps for its restore; :meth:`Edit.save`
    refuses an applied edit only so that nobody takes the file for a snapshot of the model.
    Checkpoints of a running sequence (:func:`kedit.eval.evaluate`'s ``checkpoint``) save the
    applied stack with this.
    """
    tensors, meta = edit.state()
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    header = {"kedit_format": FORMAT_VERSION, "kind": edit.kind, "meta": meta, "sha256": tensor_hash(tensors)}
    from kedit.atomic import atomic_path

    with atomic_path(path) as tmp:  # a killed save leaves no partial file (kedit.atomic)
        save_file(tensors, str(tmp), metadata={"kedit": json.dumps(header)})
    return Path(path)


def _read_edit_file(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The checked header and the tensors of an edit file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("kedit")
        tensors = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises several types
        raise EditFileError(f"{path} is not a readable safetensors file: {err}") from None
    if raw is None:
        raise EditFileError(f"{path} is a safetensors file but not a kedit edit (no 'kedit' header)")
    try:
        header = json.loads(raw)
        version = require(header, "kedit_format", int, "kedit")
        if version != FORMAT_VERSION:
            raise InvalidEditError(f"field 'kedit.kedit_format' is {version}; this kedit reads format "
                                   f"{FORMAT_VERSION}" + (" (upgrade kedit)" if version > FORMAT_VERSION else ""))
        kind = require(header, "kind", str, "kedit")
        require(header, "meta", dict, "kedit")
    except (json.JSONDecodeError, RecursionError) as err:
        raise EditFileError(f"{path}: corrupt 'kedit' header: {err}") from None
    except InvalidEditError as err:
        raise EditFileError(f"{path}: {err}") from None
    if kind not in _EDIT_KINDS:
        _import_edit_kinds()
    if kind not in _EDIT_KINDS:
        raise EditFileError(f"{path}: field 'kedit.kind': unknown edit kind {kind!r}; known: {sorted(_EDIT_KINDS)}")
    verify_checksum(tensors, header.get("sha256"), path)
    return header, tensors


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
    ``base`` records the model name and a digest of the original values of the touched
    weights (:mod:`kedit.identity`: cheap and computed on the weights' device, so ``apply``
    copies no weight to the host); applying onto other weights raises
    :class:`EditMismatchError`. A delta is checked when it is made (factor shapes, finite
    values) and when it is applied (its shape equals the weight's, no broadcasting); ``apply``
    changes all weights or none.
    """

    factors: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    dense: dict[str, Tensor] = field(default_factory=dict)
    base: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    saved: dict[str, Tensor] = field(default_factory=dict, repr=False)
    originals: Originals | None = field(default=None, repr=False, compare=False)
    """Set while applied through an :class:`EditStack`: the stack's one copy per weight, from
    which ``restore`` rebuilds the weights (``saved`` stays empty)."""
    kind: ClassVar[str] = "weight_delta"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def names(self) -> list[str]:
        return sorted({*self.factors, *self.dense})

    @property
    def is_applied(self) -> bool:
        return bool(self.saved) or self.originals is not None

    def validate(self) -> None:
        """Raise :class:`InvalidEditError` unless the factors are (d_out, r), (d_in, r) and every
        tensor is a finite float tensor."""
        parts = []
        for name, (left, right) in self.factors.items():
            if left.ndim != 2 or right.ndim != 2 or left.shape[1] != right.shape[1]:
                raise InvalidEditError(f"{name}: factors of shapes {tuple(left.shape)} and {tuple(right.shape)} "
                                       "are not (d_out, r) and (d_in, r)")
            parts += [(name, "left factor", left), (name, "right factor", right)]
        parts += [(name, "dense delta", d) for name, d in self.dense.items()]
        for name, part, t in parts:
            if not t.is_floating_point():
                raise InvalidEditError(f"{name}: the {part} has dtype {t.dtype}, not a float type")
            if not torch.isfinite(t).all():
                raise InvalidEditError(f"{name}: the {part} has non-finite values (nan or inf)")

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

    def check_fits(self, model: nn.Module) -> None:
        """The model has every touched weight, each of exactly the delta's shape."""
        where = f"{self.source}: " if self.source else ""
        params = dict(model.named_parameters())
        missing = [n for n in self.names if n not in params]
        if missing:
            raise EditMismatchError(f"{where}edit for {self.base.get('name')!r} touches {missing}, "
                                    f"which {model_name(model)!r} does not have")
        for name in self.names:
            want = tuple(params[name].shape)
            shapes = [tuple(self.dense[name].shape)] if name in self.dense else []
            if name in self.factors:
                left, right = self.factors[name]
                shapes.append((left.shape[0], right.shape[0]))
            bad = [s for s in shapes if s != want]
            if bad:
                raise InvalidEditError(f"{where}the delta of {name} has shape {bad[0]}, but the weight has "
                                       f"shape {want}")

    def check_base(self, model: nn.Module) -> None:
        """The touched weights are the ones the edit was computed on (the digest ``base`` records:
        cheap by default, a full sha256 when made with ``KEDIT_FULL_HASH=1``; see kedit.identity)."""
        params = dict(model.named_parameters())
        if not self.base or any(n not in params for n in self.names):
            self.check_fits(model)  # missing weights, wrong shapes
            return
        # another base model first (its weights' shapes differ too), then the shapes
        same, got = matches(self.base, model, self.names)
        if not same:
            raise EditMismatchError(
                f"this edit was computed on {self.base.get('name')!r} (weights hash "
                f"{self.base.get('hash', '')[:12]}…), but the model given is {model_name(model)!r} "
                f"with hash {got[:12]}… for the edited weights. Apply it to the model (and the "
                f"edit stack) it was made on.")
        self.check_fits(model)

    @torch.no_grad()
    def apply(self, model: nn.Module, check: bool = True, originals: Originals | None = None) -> None:
        """Add the delta to the model's weights, all or none.

        Alone, the edit keeps a copy of each weight it changes. With ``originals`` (an
        :class:`EditStack`'s), it keeps none: the stack holds one copy per weight however many
        edits change it, and ``restore`` rebuilds the weights from it.
        """
        if self.is_applied:
            raise EditStateError("edit is already applied; restore it first")
        if check:
            self.check_base(model)
        else:
            self.check_fits(model)
        params = dict(model.named_parameters())
        if originals is not None:
            originals.apply(self, params)
            return
        try:
            for name in self.names:
                p = params[name]
                self.saved[name] = p.detach().clone()
                self.add_to(p, name)
        except BaseException:  # also Ctrl-C: all weights or none
            if self.saved:
                self.restore(model)
            raise

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        if self.originals is not None:
            self.originals.restore(self, dict(model.named_parameters()))
            return
        if not self.saved:
            raise EditStateError("edit is not applied")
        params = dict(model.named_parameters())
        for name, w in self.saved.items():
            params[name].copy_(w)  # copy, not subtract: in low precision W + d - d != W
        self.saved.clear()

    def add_to(self, p: Tensor, name: str) -> None:
        """``p += delta(name)`` in ``p``'s dtype: the one way this edit changes a weight, so that
        replaying it gives the same bits."""
        p.add_(self.delta(name).to(device=p.device, dtype=p.dtype))

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        if not self.base:
            raise InvalidEditError("an edit without a base identity (WeightDelta.base) cannot be saved: "
                                   "a loaded edit must be able to check the model it is applied to")
        tensors: dict[str, Tensor] = {}
        for name, (left, right) in self.factors.items():
            tensors[f"factors.{name}.left"] = left
            tensors[f"factors.{name}.right"] = right
        for name, d in self.dense.items():
            tensors[f"dense.{name}"] = d
        return tensors, {"base": self.base, "info": self.info}

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> WeightDelta:
        base = require_base(meta)
        info = require(meta, "info", dict) if "info" in meta else {}
        factors: dict[str, list[Tensor | None]] = {}
        dense: dict[str, Tensor] = {}
        for key, t in tensors.items():
            name, _, side = key[len("factors."):].rpartition(".")
            if key.startswith("factors.") and name and side in ("left", "right"):
                factors.setdefault(name, [None, None])[side == "right"] = t
            elif key.startswith("dense.") and len(key) > len("dense."):
                dense[key[len("dense."):]] = t
            else:
                raise InvalidEditError(f"unexpected tensor {key!r} (expected 'factors.<weight>.left', "
                                       "'factors.<weight>.right' or 'dense.<weight>')")
        for name, pair in factors.items():
            for side, t in zip(("left", "right"), pair):
                if t is None:
                    raise InvalidEditError(f"tensor 'factors.{name}.{side}' is missing")
        return cls(factors={n: (lr[0], lr[1]) for n, lr in factors.items()}, dense=dense, base=base, info=info)


class Originals:
    """The original values of the weights that an :class:`EditStack`'s weight edits change: one
    copy per weight, however many edits change it (a copy per applied edit would need 42 MB per
    UltraEdit edit on SmolLM2, 42 GB for 1,000 edits).

    Edits are restored last first. Restoring one rebuilds its weights: the original values, then
    the edits applied before it, added in the order they were applied. That is the same float
    operations on the same values as when they were applied, so the bits are the same.
    """

    def __init__(self) -> None:
        self.values: dict[str, Tensor] = {}
        self.applied: list[WeightDelta] = []

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.values.values())

    @torch.no_grad()
    def apply(self, edit: WeightDelta, params: dict[str, Tensor]) -> None:
        done: list[str] = []
        try:
            for name in edit.names:
                p = params[name]
                if name not in self.values:
                    self.values[name] = p.detach().clone()
                done.append(name)
                edit.add_to(p, name)
        except BaseException:  # also Ctrl-C: all weights or none
            for name in done:
                self.rebuild(params, name)
            raise
        self.applied.append(edit)
        edit.originals = self

    @torch.no_grad()
    def rebuild(self, params: dict[str, Tensor], name: str) -> None:
        """Weight ``name`` as the applied edits left it: the original, plus each applied edit in order."""
        p = params[name]
        p.copy_(self.values[name])
        for edit in self.applied:
            if name in edit.names:
                edit.add_to(p, name)

    @torch.no_grad()
    def restore(self, edit: WeightDelta, params: dict[str, Tensor]) -> None:
        if not self.applied or self.applied[-1] is not edit:
            raise EditStateError("the edits of a stack are restored last first; this one is not the last applied")
        self.applied.pop()
        edit.originals = None
        for name in edit.names:
            self.rebuild(params, name)
        if not self.applied:
            self.values.clear()

    @torch.no_grad()
    def write(self, params: dict[str, Tensor]) -> None:
        """Put the original values back into every weight (the applied edits stay recorded)."""
        for name, w in self.values.items():
            params[name].copy_(w)

    @torch.no_grad()
    def restore_all(self, params: dict[str, Tensor]) -> None:
        self.write(params)
        for edit in self.applied:
            edit.originals = None
        self.applied.clear()
        self.values.clear()

    @contextmanager
    def suspended(self, params: dict[str, Tensor]) -> Iterator[None]:
        """The original weights for a block; the applied edits are added back after it."""
        self.write(params)
        try:
            yield
        finally:
            for name in self.values:
                self.rebuild(params, name)


@dataclass
class EditStack(Edit):
    """Edits applied in order (sequential editing); restored in reverse, bit-exactly.

    Its weight edits share one copy of each weight they change (:class:`Originals`), so the
    memory a stack holds does not grow with the number of edits.
    """

    edits: list[Edit] = field(default_factory=list)
    kind: ClassVar[str] = "stack"
    _applied: int = field(default=0, repr=False)
    _originals: Originals = field(default_factory=Originals, repr=False, compare=False)

    @property
    def is_applied(self) -> bool:
        return self._applied > 0

    def push(self, edit: Edit, model: nn.Module | None = None) -> None:
        """Add an edit; if the stack is applied (and ``model`` given), apply it on top.

        An edit that fails to apply is not added.
        """
        if self._applied:
            if model is None:
                raise EditStateError("the stack is applied: pass the model to push onto it")
            self._apply_one(edit, model)
            self._applied += 1
        self.edits.append(edit)

    def pop(self, model: nn.Module | None = None) -> Edit:
        """Remove the last edit and return it; if the stack is applied, restore that edit first
        (pass the model). Its weights are rebuilt from the stack's copy, bit-exactly."""
        if not self.edits:
            raise IndexError("pop from an empty edit stack")
        if self._applied:
            if model is None:
                raise EditStateError("the stack is applied: pass the model to pop from it")
            self.edits[-1].restore(model)
            self._applied -= 1
        return self.edits.pop()

    def _apply_one(self, edit: Edit, model: nn.Module) -> None:
        if isinstance(edit, WeightDelta):
            edit.apply(model, originals=self._originals)
        else:
            edit.apply(model)

    def apply(self, model: nn.Module) -> None:
        if self._applied:
            raise EditStateError("stack is already applied")
        try:
            for edit in self.edits:
                self._apply_one(edit, model)
                self._applied += 1
        except BaseException:
            self.restore(model)
            raise

    def restore(self, model: nn.Module) -> None:
        """Every edit, last first; the weight edits at once, from the stack's copy of the weights."""
        while self._applied:
            edit = self.edits[self._applied - 1]
            if not (isinstance(edit, WeightDelta) and edit.originals is self._originals):
                edit.restore(model)
            self._applied -= 1
        if self._originals.applied:
            self._originals.restore_all(dict(model.named_parameters()))

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
        subs = require(meta, "edits", list)
        edits = []
        for i, sub in enumerate(subs):
            where = f"meta.edits[{i}]"
            kind = require(sub, "kind", str, where)
            sub_meta = require(sub, "meta", dict, where)
            if kind not in _EDIT_KINDS:
                _import_edit_kinds()
            if kind not in _EDIT_KINDS:
                raise InvalidEditError(f"field '{where}.kind': unknown edit kind {kind!r}")
            prefix = f"{i}/"
            mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            try:
                edits.append(_EDIT_KINDS[kind].from_state(mine, sub_meta))
            except InvalidEditError as err:
                raise InvalidEditError(f"{where}: {err}") from None
        stray = [k for k in tensors if k.split("/", 1)[0] not in {str(i) for i in range(len(subs))}]
        if stray:
            raise InvalidEditError(f"unexpected tensor {stray[0]!r}: the stack has {len(subs)} edits")
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
    """Computes edits. ``edit`` never changes the model it is given.

    Every subclass's ``edit`` runs inside :func:`checked_edit`: requests are validated and
    fit the model's context, a trained editor's base model is checked, and an edit with
    non-finite or malformed tensors raises :class:`InvalidEditError` naming the editor.
    """

    name: ClassVar[str] = ""
    Hparams: ClassVar[type] = object

    def __init__(self, hparams: Any = None, **overrides: Any) -> None:
        if hparams is None:
            hparams = self.Hparams(**overrides)
        elif overrides:
            hparams = dataclasses.replace(hparams, **overrides)
        self.hparams = hparams
        self.base: dict[str, Any] = {}
        """A trained editor's base model (name, hash, hashed weights; see kedit.checkpoint);
        empty: the editor works on any model."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "edit" in cls.__dict__:
            cls.edit = checked_edit(cls.__dict__["edit"])

    @abstractmethod
    def edit(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Requests,
             history: Sequence[Edit] = ()) -> Edit:
        """Compute the edit for ``requests`` (one or a batch); leave ``model`` untouched.

        ``history``: the edits already applied to ``model`` that this edit will stack on, in
        order (an :class:`EditStack` or a list; stacks are flattened). An editor is a pure
        function of its arguments: state that sequential editing needs (AlphaEdit's previous
        keys) is read from the history's edits, never kept in the editor object.
        """

    def check_base(self, model: nn.Module) -> None:
        """A trained editor refuses a model other than its base (:class:`EditMismatchError`).

        The hash is computed once per model and version of the hashed weights
        (:func:`kedit.identity.weights_version`).
        """
        base = getattr(self, "base", None)
        if not base:
            return
        from kedit.checkpoint import check_base_identity

        key = weights_version(model, base.get("weights") or [])
        if key != getattr(self, "_base_checked", None):
            check_base_identity(base, model, what=f"{self.name} editor")
            self._base_checked = key

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.hparams})"


def flatten(history: Edit | Sequence[Edit] | None) -> list[Edit]:
    """The edits of ``history`` in the order they were applied, with stacks expanded."""
    if history is None:
        return []
    if isinstance(history, Edit) and not isinstance(history, EditStack):
        return [history]
    items = history.edits if isinstance(history, EditStack) else history
    return [leaf for item in items for leaf in flatten(item)]


def checked_edit(edit: Callable[..., Edit]) -> Callable[..., Edit]:
    """Wrap an editor's ``edit`` with the checks every edit gets (see :class:`Editor`).

    An ``edit`` written without a ``history`` parameter (an editor with no sequence state)
    is called without it.
    """
    takes_history = "history" in inspect.signature(edit).parameters

    @functools.wraps(edit)
    def checked(self: Editor, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Requests,
                history: Sequence[Edit] = ()) -> Edit:
        from kedit.data.encode import check_context

        reqs = as_requests(requests)
        check_context(model, tokenizer, reqs)
        self.check_base(model)
        try:
            if takes_history:
                return edit(self, model, tokenizer, reqs, history=flatten(history))
            return edit(self, model, tokenizer, reqs)
        except EditFileError:
            raise
        except InvalidEditError as err:
            raise InvalidEditError(f"editor {self.name!r} made an invalid edit on {model_name(model)!r}: "
                                   f"{err}") from None

    return checked


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

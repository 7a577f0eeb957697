"""Editor artifacts: trained editors (MEND, SERAC) as safetensors files, loadable without code.

An editor artifact is one safetensors file (or a folder holding ``editor.safetensors``)
whose header metadata ``"kedit_editor"`` is JSON::

    {"format": 1, "editor": "mend", "hparams": {...}, "base": {"name": ..., "hash": ...,
     "weights": [...]}, "extra": {...}, "sha256": ...}

``load_editor(path)`` reads the header and dispatches to
``editor_class(meta["editor"]).from_artifact(path)``. Tensors are plain safetensors (no
pickle): loading runs no code from the file. The base model's identity (its name and a
digest of the weights the editor was trained on, see :mod:`kedit.identity`) travels with the
editor, and :func:`check_base_identity` refuses a different base model with a clear error
(:class:`~kedit.identity.EditMismatchError`, also importable as ``BaseModelMismatch``).
``sha256`` (:func:`~kedit.identity.tensor_hash` of the tensors) is verified on load;
files written before it existed load unverified. A malformed header, a corrupt or
non-finite tensor raises :class:`~kedit.editors.base.EditFileError` naming the file and field.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kedit.identity import EditMismatchError, identity, matches, model_name, tensor_hash

log = logging.getLogger(__name__)

ARTIFACT_FORMAT = 1
META_KEY = "kedit_editor"
ARTIFACT_FILE = "editor.safetensors"


BaseModelMismatch = EditMismatchError
"""The name this failure had in kedit.checkpoint: the same class, so ``except`` either catches both."""


def artifact_file(path: str | Path) -> Path:
    """The safetensors file of an artifact path (a file, or a folder with ``editor.safetensors``)."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / ARTIFACT_FILE, *sorted(path.glob("*.safetensors"))]
        for c in candidates:
            if c.is_file():
                return c
        raise FileNotFoundError(f"{path} is a folder without an editor artifact ({ARTIFACT_FILE})")
    if not path.is_file():
        raise FileNotFoundError(f"no editor artifact at {path}")
    if path.suffix == ".ckpt":
        raise ValueError(f"{path} is a Lightning training checkpoint, not an editor artifact; export it "
                         f"first: python -m kedit.train export {path} <out>.safetensors")
    return path


def read_artifact_meta(path: str | Path) -> dict[str, Any]:
    """The JSON header of an editor artifact, checked against the schema above."""
    from safetensors import safe_open

    from kedit.editors.base import EditFileError, InvalidEditError

    file = artifact_file(path)
    try:
        with safe_open(str(file), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except Exception as err:  # noqa: BLE001 - safetensors raises several types
        raise EditFileError(f"{file} is not a readable safetensors file: {err}") from None
    if raw is None:
        raise EditFileError(f"{file} is a safetensors file but not a kedit editor artifact "
                            f"(no {META_KEY!r} header); edits are loaded with kedit.Edit.load")
    try:
        meta = json.loads(raw)
        _check_artifact_meta(meta)
    except (json.JSONDecodeError, RecursionError) as err:
        raise EditFileError(f"{file}: corrupt {META_KEY!r} header: {err}") from None
    except InvalidEditError as err:
        raise EditFileError(f"{file}: {err}") from None
    return meta


def _check_artifact_meta(meta: Any) -> None:
    from kedit.editors.base import InvalidEditError, require, require_strs

    where = META_KEY
    if not isinstance(meta, dict):
        raise InvalidEditError(f"header {where!r} is a {type(meta).__name__}, not an object")
    version = require(meta, "format", int, where) if "format" in meta else ARTIFACT_FORMAT
    if version != ARTIFACT_FORMAT:
        raise InvalidEditError(f"field '{where}.format' is {version}; this kedit reads format {ARTIFACT_FORMAT}"
                               + (" (upgrade kedit)" if version > ARTIFACT_FORMAT else ""))
    require(meta, "editor", str, where)
    require(meta, "hparams", dict, where)
    for key in ("base", "extra"):
        if key in meta:
            require(meta, key, dict, where)
    if "sha256" in meta:
        require(meta, "sha256", str, where)
    base = meta.get("base") or {}
    if base:
        require(base, "name", str, f"{where}.base")
        require(base, "hash", str, f"{where}.base")
        require_strs(base, "weights", f"{where}.base")
        if "shapes" in base:
            require(base, "shapes", dict, f"{where}.base")


def load_artifact(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, header) of an editor artifact; its checksum and finiteness are verified."""
    from safetensors.torch import load_file

    from kedit.editors.base import EditFileError, verify_checksum

    meta = read_artifact_meta(path)
    file = artifact_file(path)
    try:
        tensors = load_file(str(file))
    except Exception as err:  # noqa: BLE001 - safetensors raises several types
        raise EditFileError(f"{file} is not a readable safetensors file: {err}") from None
    verify_checksum(tensors, meta.get("sha256"), file)
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise EditFileError(f"{file}: tensor {key!r} has non-finite values (nan or inf)")
    return tensors, meta


def load_editor_artifact(path: str | Path, editor_name: str, hparams_cls: type
                         ) -> tuple[dict[str, Tensor], dict[str, Any], Path, Any]:
    """(tensors, header, file, typed hyperparameters) of an artifact of ``editor_name``'s;
    another editor's artifact, or unknown or mistyped hyperparameters, are an ``EditFileError``."""
    from kedit.config import hparams_from_dict
    from kedit.editors.base import EditFileError

    tensors, meta = load_artifact(path)
    file = artifact_file(path)
    if meta["editor"] != editor_name:
        raise EditFileError(f"{file} holds a {meta['editor']!r} editor, not {editor_name!r}")
    values = dict(meta["hparams"])
    for key, noop in getattr(hparams_cls, "RETIRED", {}).items():  # removed fields, at their no-op value
        if key in values and values.pop(key) != noop:
            raise EditFileError(f"{file}: field '{META_KEY}.hparams.{key}': this hyperparameter was removed; "
                                f"only its no-op value {noop!r} still loads")
    try:
        hparams = hparams_from_dict(hparams_cls, values)
    except ValueError as err:
        raise EditFileError(f"{file}: field '{META_KEY}.hparams': {err}") from None
    return tensors, meta, file, hparams


def save_artifact(
    path: str | Path,
    editor_name: str,
    tensors: Mapping[str, Tensor],
    hparams: Mapping[str, Any],
    base: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write an editor artifact. ``path`` ending in ``.safetensors`` is a file, else a folder."""
    from safetensors.torch import save_file

    path = Path(path)
    file = path if path.suffix == ".safetensors" else path / ARTIFACT_FILE
    file.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    header = {"format": ARTIFACT_FORMAT, "editor": editor_name, "hparams": dict(hparams),
              "base": dict(base or {}), "extra": dict(extra or {}), "sha256": tensor_hash(tensors)}
    from kedit.atomic import atomic_path

    with atomic_path(file) as tmp:  # a killed save leaves no partial file (kedit.atomic)
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(header)})
    log.info("wrote %s editor artifact %s (%.1f MB)", editor_name, file, file.stat().st_size / 2**20)
    return file


def base_model_identity(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, Any]:
    """Name of a base model plus a digest of some of its weights (:func:`kedit.identity.identity`).

    ``names``: the parameters to hash. Default: the token embedding, the first block's
    attention output projection and the final norm (from the Arch table): weights that
    editors do not change, so the identity survives earlier edits (sequential editing).
    """
    if names is None:
        from kedit.models import arch_of

        arch = arch_of(model)
        params = dict(model.named_parameters())
        candidates = (f"{arch.embed}.weight", f"{arch.attn_out_module(0)}.weight", f"{arch.final_norm}.weight")
        names = [n for n in candidates if n in params]
    return {**identity(model, list(names)), "weights": list(names)}


def check_base_identity(expected: Mapping[str, Any] | None, model: nn.Module, what: str = "editor") -> None:
    """Raise :class:`EditMismatchError` unless ``model`` has the weights ``expected`` was made on."""
    if not expected or not expected.get("hash"):
        return
    names = list(expected.get("weights") or [])
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    got_name = model_name(model)
    trained_for = f"this {what} was trained for base model {expected.get('name')!r}"
    if missing:
        raise EditMismatchError(f"{trained_for}, but the model given ({got_name!r}, {type(model).__name__}) has no "
                                f"weight(s) {missing[:3]}. Load it onto {expected.get('name')!r}.")
    for n, shape in (expected.get("shapes") or {}).items():
        if n in params and list(params[n].shape) != list(shape):
            raise EditMismatchError(f"{trained_for}, but {n} of the model given ({got_name!r}) has shape "
                                    f"{list(params[n].shape)}, not {shape}.")
    same, got = matches(expected, model, names)
    if not same:
        raise EditMismatchError(
            f"{trained_for} (weights hash {expected['hash'][:12]}…), but the model given is {got_name!r} whose "
            f"weights hash to {got[:12]}…. A trained editor only works on the exact base model it was trained "
            f"on: load {expected.get('name')!r} (in the same dtype), or train an editor for this model.")


def load_editor(path: str | Path, model: nn.Module | None = None):
    """Load a trained editor artifact as an :class:`~kedit.editors.base.Editor`.

    >>> editor = kedit.load_editor("checkpoints/mend-smollm2-135m-counterfact.safetensors")
    >>> edit = editor.edit(model, tok, {"prompt": "The capital of France is", "target_new": "Rome"})

    If ``model`` is given, it is checked to be the base model the editor was trained on.
    """
    from kedit.editors.base import EditFileError, InvalidEditError, editor_class

    meta = read_artifact_meta(path)
    file = artifact_file(path)
    try:
        cls = editor_class(meta["editor"])
    except KeyError as err:
        raise EditFileError(f"{file}: field '{META_KEY}.editor': {err.args[0]}") from None
    if not hasattr(cls, "from_artifact"):
        raise EditFileError(f"{file}: editor {meta['editor']!r} ({cls.__name__}) cannot be "
                            "loaded from an artifact (no from_artifact)")
    if not meta.get("base"):
        log.warning("%s records no base model: the editor cannot refuse a wrong base model", file)
    try:
        editor = cls.from_artifact(path)
    except EditFileError:
        raise
    except InvalidEditError as err:
        raise EditFileError(f"{file}: {err}") from None
    if not getattr(editor, "base", None):
        editor.base = dict(meta.get("base") or {})  # checked at every edit (Editor.check_base)
    if model is not None:
        editor.check_base(model)
    return editor


def torch_load_safe(path: str | Path) -> dict[str, Any]:
    """``torch.load`` of a Lightning checkpoint without arbitrary code execution."""
    return torch.load(str(path), map_location="cpu", weights_only=True)

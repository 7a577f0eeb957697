"""What model, and which weights: the one place kedit decides whether two weights are the same.

Three questions about weights, three functions (and :func:`config_key` for "which checkpoint",
from the config alone):

* **Which bits exactly?** :func:`tensor_hash`: sha256 over names, dtypes, shapes and bytes.
  Exact, and it copies every tensor to the host: for files (checksums in headers) and for an
  opt-in full check.
* **The same weights as when the edit was made?** :func:`weights_digest` (``"bitsum"``): names,
  dtypes, shapes and, per row, the sum of the values' bit patterns, reduced where the tensor
  lives; only one number per row reaches the host (a 7B model's MLP weight: 4,096 numbers,
  not 90 MB). Any change of one value changes its row's sum; it is a check against mistakes
  (another model, a missing edit of a stack), not against an adversary.
* **Untouched since I last looked?** :func:`weights_version`: the storage and in-place version
  counter of each weight. Free; it changes whenever a weight is written in place or replaced
  through its parameter. Use it to skip repeating a check, never as the check.

A recorded identity (:func:`identity`) is ``{"name", "hash"}`` plus ``"digest": "bitsum"`` for
the cheap digest; without ``"digest"`` the hash is a full sha256 (the only kind older kedit
versions wrote, so their files still verify). :func:`matches` recomputes the kind recorded.
``KEDIT_FULL_HASH=1`` (or ``full=True``) records full sha256 hashes instead.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

BITSUM = "bitsum"
"""The ``digest`` of an identity hashed with :func:`weights_digest`."""


class EditMismatchError(RuntimeError):
    """Weights other than the ones an edit, or a trained editor, was made for: another model,
    another dtype, or a stack applied out of order. The message names both models."""


def model_name(model: nn.Module) -> str:
    """The model's checkpoint name (``config._name_or_path``), else its family, else its class."""
    config = getattr(model, "config", None)
    return str(getattr(config, "_name_or_path", "") or getattr(config, "model_type", "") or type(model).__name__)


def config_key(model: nn.Module) -> str:
    """``<name>-<sha256 of the full config JSON, 12 hex>``: which model, without reading weights
    (for caches of what depends on the architecture and checkpoint, not on later edits)."""
    config = getattr(model, "config", None)
    text = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else ""
    return f"{model_name(model)}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def tensor_hash(tensors: Mapping[str, Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order (exact; copies to the host)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d too
    return h.hexdigest()


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _row_bitsums(t: Tensor) -> Tensor:
    """(rows,) int64: per row (per element for vectors) the sum of the bit patterns, on t's device."""
    bits = t.detach().contiguous().view(_INT_OF_SIZE[t.element_size()])
    rows = bits.reshape(t.shape[0], -1) if t.ndim > 1 else bits.reshape(-1, 1)
    return rows.sum(dim=1, dtype=torch.int64)


def weights_digest(tensors: Mapping[str, Tensor]) -> str:
    """Cheap digest: names, dtypes, shapes and the per-row sums of bit patterns, in name order.

    The sums are computed on the tensors' device; only one int64 per row is copied to the host.
    """
    h = hashlib.sha256(f"{BITSUM}|".encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(_row_bitsums(t).cpu().numpy().tobytes())
    return h.hexdigest()


def full_hash_default() -> bool:
    """Whether identities record a full sha256 by default: ``KEDIT_FULL_HASH`` is 1/true/yes."""
    return os.environ.get("KEDIT_FULL_HASH", "").strip().lower() in ("1", "true", "yes", "on")


def identity(model: nn.Module, names: Sequence[str], full: bool | None = None) -> dict[str, str]:
    """The identity of ``model``'s weights ``names``: the model's name and a hash of their values.

    ``full``: a sha256 of the bytes (exact, host copies) instead of the cheap digest; None:
    :func:`full_hash_default`.
    """
    params = dict(model.named_parameters())
    tensors = {n: params[n] for n in names}
    if full if full is not None else full_hash_default():
        return {"name": model_name(model), "hash": tensor_hash(tensors)}
    return {"name": model_name(model), "hash": weights_digest(tensors), "digest": BITSUM}


def hash_like(expected: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> str:
    """The hash of ``tensors`` computed the way ``expected`` was (its ``digest``; none: sha256)."""
    kind = expected.get("digest")
    if kind is None:
        return tensor_hash(tensors)
    if kind == BITSUM:
        return weights_digest(tensors)
    raise ValueError(f"unknown weight digest {kind!r} (this kedit knows {BITSUM!r} and sha256)")


def matches(expected: Mapping[str, Any], model: nn.Module, names: Sequence[str]) -> tuple[bool, str]:
    """(whether ``model``'s weights ``names`` hash to ``expected["hash"]``, their hash)."""
    params = dict(model.named_parameters())
    got = hash_like(expected, {n: params[n] for n in names})
    return got == expected.get("hash"), got


def require_match(expected: Mapping[str, Any], model: nn.Module, names: Sequence[str], what: str,
                  advice: str = "apply it to the model it was made on") -> None:
    """Raise :class:`EditMismatchError` naming both models unless ``model``'s weights ``names``
    match ``expected`` (:func:`matches`); ``what`` is the thing checked ("this GRACE edit")."""
    same, got = matches(expected, model, names)
    if not same:
        raise EditMismatchError(
            f"{what} was made for {expected.get('name')!r} (weights hash {expected.get('hash', '')[:12]}…) "
            f"but the model given is {model_name(model)!r} (hash {got[:12]}…); {advice}")


def weights_version(model: nn.Module, names: Sequence[str] | None = None) -> tuple:
    """A key that changes when any of ``names`` (default: all parameters) is replaced or written
    in place through its parameter (``p.add_``, ``p.copy_``; not through ``p.data``).

    For skipping a check already done on the same weights, never as the check itself.
    """
    params = dict(model.named_parameters())
    chosen = params if names is None else {n: params[n] for n in names if n in params}
    return id(model), tuple((n, p.data_ptr(), p._version) for n, p in chosen.items())


def state_digest(model: nn.Module, full: bool = False) -> str:
    """A digest of every parameter and buffer (``state_dict``): :func:`weights_digest`, or with
    ``full`` the exact :func:`tensor_hash`."""
    state = model.state_dict(keep_vars=False)
    return tensor_hash(state) if full else weights_digest(state)


def foreign_hooks(model: nn.Module) -> int:
    """Forward (pre-)hooks installed by anything but transformers, which adds its own
    output-capturing hooks lazily and keeps them: an edit's routing hooks, a leaked trace."""
    return sum(1 for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
               if not str(getattr(h, "__module__", "")).startswith("transformers."))


def fingerprint(model: nn.Module) -> tuple[str, int]:
    """(cheap digest of all weights, foreign hooks): after restoring edits, the model is the one
    it was iff this is unchanged (up to the digest's collisions; :func:`state_digest` with
    ``full=True`` is the exact check)."""
    return state_digest(model), foreign_hooks(model)

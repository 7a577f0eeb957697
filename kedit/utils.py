"""Small helpers that several parts of kedit need, once each.

Token padding (:func:`pad_id`), KL divergence (:func:`kl_divergence`), batching (:func:`chunks`),
layer choice (:func:`depth_layer`, :func:`check_layers`), peak memory (:func:`peak_rss_mb`,
:func:`peak_memory_mb`) and the W&B mode (:func:`wandb_mode`). Importing this module imports
torch and nothing else of note (no Lightning, no transformers).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import netrc
import os
import resource
import sys
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


# --------------------------------------------------------------------------- tokens


def pad_id(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS token, else 0.

    Padded positions are masked out (attention mask 0, label -100), so any valid id is
    correct; EOS is what ``transformers``' ``generate`` falls back to (it warns when it does),
    and 0 is only for tokenizers with neither. The tokenizer is not changed.
    """
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


# --------------------------------------------------------------------------- math


def kl_divergence(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p ‖ q) over the last dimension from log-probabilities, in nats, in their dtype
    (upcast before calling for float64 accuracy; differentiable)."""
    return (logp.exp() * (logp - logq)).sum(-1)


# --------------------------------------------------------------------------- batching


def chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """``items`` cut into consecutive slices of ``size`` (at least 1); the last may be shorter.

    Slices keep the type: lists give lists, ``range(n)`` gives ranges, tensors give views.
    """
    size = max(1, int(size))
    return [items[i:i + size] for i in range(0, len(items), size)]


# --------------------------------------------------------------------------- layers


def depth_layer(n_layers: int, fraction: float) -> int:
    """The block at relative depth ``fraction`` (0: the first, 1: the last) of ``n_layers``."""
    return min(n_layers - 1, max(0, round(fraction * n_layers)))


def check_layers(layers: Iterable[int], n_layers: int, what: str = "layers") -> list[int]:
    """Sorted distinct block indices; negative ones count from the end (-1: the last block).

    ``ValueError`` naming ``what`` for an index outside ``[-n_layers, n_layers)``, a non-integer
    or an empty list.
    """
    layers = list(layers)
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not -n_layers <= i < n_layers]
    if bad or not layers:
        problem = f"{bad} out of range" if bad else "empty"
        raise ValueError(f"{what}: {problem}; the model has {n_layers} layers (0..{n_layers - 1}, or -1 for the last)")
    return sorted({i % n_layers for i in layers})


# --------------------------------------------------------------------------- memory


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def peak_memory_mb(device: torch.device | str | None = None) -> float:
    """Peak memory in MiB where ``device``'s tensors live: CUDA's peak allocation on a CUDA device
    (since the last ``torch.cuda.reset_peak_memory_stats``), else :func:`peak_rss_mb`."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library, or not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim(0)``); False where
    there is no glibc. Long CPU runs need it: glibc keeps what PyTorch frees between steps, and
    AlphaEdit's sequential run grew by ~40 MB per edit to 13 GB resident at 475 edits, of which
    one ``malloc_trim`` released 11.5 GB (it was free memory, not a leak)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


# --------------------------------------------------------------------------- W&B


def wandb_key_configured() -> bool:
    """Whether W&B credentials exist: ``WANDB_API_KEY``, or the entry ``wandb login`` writes to
    ~/.netrc (``$NETRC``) for ``$WANDB_BASE_URL``'s host (default api.wandb.ai)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc(os.environ.get("NETRC") or None)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
    return rc.authenticators(host) is not None


def wandb_mode() -> str:
    """``"online"``, ``"offline"`` or ``"disabled"``: ``WANDB_MODE`` when set (``dryrun`` is
    offline), else online when credentials are configured (:func:`wandb_key_configured`), else
    offline (the run can be uploaded later with ``wandb sync``)."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in ("online", "offline", "disabled"):
        return mode
    if mode == "dryrun":
        return "offline"
    return "online" if wandb_key_configured() else "offline"

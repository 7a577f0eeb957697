"""UltraEdit: training-, subject- and memory-free lifelong editing (Gu et al., 2025, arXiv:2505.14679).

A closed-form weight shift per turn from each edited linear module's inputs and output gradients,
with feature statistics kept over the whole edit stream. Per turn (one ``edit`` call over a batch
of requests), for each edited module with input size ``d_in`` and output size ``d_out``:

1. **Cache** (:func:`cache`): one forward and backward of the *current* model (the history
   applied) per micro-batch of requests, with ``L = CE`` averaged over the answer positions ``P``
   (the positions whose logits predict an answer token). At ``p ∈ P``: the key ``k_p`` (the
   module's input, ``d_in``) and ``g_p = ∂L/∂(module output)`` (``d_out``); over the turn
   ``K (n, d_in)``, ``G (n, d_out)``, ``n`` the number of answer tokens.
2. **Lifelong normalisation** (:class:`Moments`): one running mean and standard deviation of
   ``z = [k; g]`` per module *shape* (modules of one shape share it), updated with every
   micro-batch before the solve and never reset:
   ``n' = n + b``, ``μ' = μ + b(μ_b − μ)/n'``, ``M2' = M2 + b·var_b + n·b(μ_b − μ)²/n'``,
   ``σ = sqrt(M2'/(n' − 1))``; then ``[k̂; ĝ] = (z − μ)/(σ + ε)``.
3. **Target output change** (:func:`target_change`): ``d_p = −η ‖k̂_p‖² ĝ_p``, stacked into
   ``D (n, d_out)``.
4. **Ridge solve with the raw keys** (:func:`ridge`): ``S = (KᵀK + I)⁻¹ Kᵀ D``, the minimiser of
   ``Σ_p ‖Sᵀk_p − d_p‖² + ‖S‖²``; the edit is ``ΔW = Sᵀ = left @ rightᵀ`` with ``left = Dᵀ``
   and ``right = (KᵀK + I)⁻¹Kᵀ`` (rank ``n``; stored densely when that is smaller).

Sequence state: the only state across turns is the running statistics. They travel in the edit:
an :class:`UltraEditDelta` carries the statistics *after* its turn (saved and loaded with it),
and the next ``edit`` starts from those of the last UltraEdit edit in ``history``. Without one
(an empty history, or only other editors' edits) the statistics start empty. The editor object
keeps no state: the same model, requests and history give the same edit.

Deviations from the official code (XiaojieGu/UltraEdit), each for a reason:

* A micro-batch with one answer token adds no within-batch variance (``var_b = 0``): the
  official unbiased variance of one row is NaN and would poison the statistics for good.
* The statistics are kept in float64 (keys, gradients and the solve are float32, as the
  official code): a stream of millions of tokens does not drift.
* ``ΔW`` is added in the weight's dtype by :class:`~kedit.editors.base.WeightDelta` (as the
  official code), and restored by copy, never by subtraction.
* The solve is not chunked (chunking only bounds memory; the result is the same).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from kedit.data.encode import encode, model_inputs, target_logits
from kedit.data.request import EditRequest
from kedit.editors.base import Edit, Editor, InvalidEditError, WeightDelta, base_identity, require
from kedit.editors.memit import _packed
from kedit.hooks import trace
from kedit.models.arch import Arch, arch_of
from kedit.utils import check_layers, chunks

log = logging.getLogger(__name__)

EPS = torch.finfo(torch.float32).eps
"""ε of the normalisation, as the official ``RunningMeanStd`` (float32 machine epsilon)."""


@dataclass
class UltraEditHparams:
    """UltraEdit hyperparameters (official defaults: LLaMA-3-8B-Instruct on zsRE)."""

    modules: dict[str, list[int]] = field(default_factory=lambda: {"mlp_in.0": [11, 12, 13, 14, 15],
                                                                   "mlp_in.1": [18, 19, 20, 21, 22, 23, 24]})
    """Edited linear modules: a role per block (``mlp_in``: every MLP input projection, ``mlp_in.<i>``:
    the i-th of them in the Arch's order, e.g. 0 = gate_proj, 1 = up_proj on LLaMA; ``mlp_out``;
    ``attn_out``) -> its blocks (negative: from the end)."""
    lr: float = 1e-6
    """η: the target output change is ``−η ‖k̂‖² ĝ``."""
    micro_batch: int = 10
    """Requests per forward/backward pass; also each update of the running statistics."""


# --------------------------------------------------------------------------- lifelong normalisation


@dataclass(frozen=True)
class Moments:
    """Running mean and scatter of ``z = [k; g]`` over every answer token seen (official
    ``RunningMeanStd``). Immutable: :meth:`update` returns new moments, so the statistics an edit
    carries never change after it is made."""

    count: int
    mean: Tensor  # (d_in + d_out,), float64
    m2: Tensor  # (d_in + d_out,), float64: b·var_b + n·b·δ²/n' summed over updates

    @classmethod
    def empty(cls, dim: int, device: torch.device | str | None = None) -> Moments:
        zeros = torch.zeros(dim, dtype=torch.float64, device=device)
        return cls(0, zeros, zeros.clone())

    def update(self, z: Tensor) -> Moments:
        """Add the ``b`` rows of ``z`` (b, dim) with the official update rule (module docstring, step 2)."""
        z = z.double()
        b = z.shape[0]
        n = self.count + b
        delta = z.mean(0) - self.mean
        var_b = z.var(0) if b > 1 else torch.zeros_like(delta)  # one row: no scatter (official: NaN)
        return Moments(n, self.mean + b * delta / n, self.m2 + b * var_b + self.count * b * delta.square() / n)

    @property
    def std(self) -> Tensor:
        return (self.m2 / max(self.count - 1, 1)).sqrt()

    def to(self, device: torch.device | str) -> Moments:
        return Moments(self.count, self.mean.to(device), self.m2.to(device))

    def normalise(self, z: Tensor) -> Tensor:
        """``(z − μ)/(σ + ε)`` in ``z``'s dtype."""
        return ((z.double() - self.mean) / (self.std + EPS)).to(z.dtype)


# --------------------------------------------------------------------------- the edit


@dataclass
class UltraEditDelta(WeightDelta):
    """A ``WeightDelta`` with the running statistics after its turn, per module shape
    (``"<d_in>x<d_out>"``): where the next UltraEdit edit that stacks on it starts."""

    stats: dict[str, Moments] = field(default_factory=dict)
    kind: ClassVar[str] = "ultraedit"

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors, meta = super().state()
        for shape, m in self.stats.items():
            tensors[f"stats.{shape}.mean"], tensors[f"stats.{shape}.m2"] = m.mean, m.m2
        return tensors, {**meta, "stats": {shape: m.count for shape, m in self.stats.items()}}

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> UltraEditDelta:
        edit = super().from_state({k: v for k, v in tensors.items() if not k.startswith("stats.")}, meta)
        counts = require(meta, "stats", dict)
        stats = {}
        for shape in counts:
            count = require(counts, shape, int, "meta.stats")
            parts = [tensors.get(f"stats.{shape}.{part}") for part in ("mean", "m2")]
            if any(t is None for t in parts) or parts[0].shape != parts[1].shape or count < 0:
                raise InvalidEditError(f"statistics {shape!r}: tensors 'stats.{shape}.mean' and 'stats.{shape}.m2' "
                                       f"must exist with one shape, and the count {count} must be >= 0")
            if not all(torch.isfinite(t).all() for t in parts):
                raise InvalidEditError(f"statistics {shape!r} have non-finite values (nan or inf)")
            stats[shape] = Moments(count, parts[0].double(), parts[1].double())
        stray = [k for k in tensors if k.startswith("stats.") and k.split(".")[1] not in counts]
        if stray:
            raise InvalidEditError(f"unexpected tensor {stray[0]!r}: 'meta.stats' has no count for it")
        return cls(factors=edit.factors, dense=edit.dense, base=edit.base, info=edit.info, stats=stats)


def previous_stats(history: Sequence[Edit], device: torch.device | str) -> dict[str, Moments]:
    """The statistics after the last UltraEdit edit of ``history`` (on ``device``); none before the first."""
    last = next((e.stats for e in reversed(history) if isinstance(e, UltraEditDelta)), {})
    return {shape: m.to(device) for shape, m in last.items()}


# --------------------------------------------------------------------------- the algorithm


def edited_modules(model: nn.Module, modules: dict[str, list[int]]) -> list[str]:
    """The module paths of ``modules`` (role -> blocks; see :attr:`UltraEditHparams.modules`), in
    order: roles as given, blocks ascending."""
    arch = arch_of(model)
    n = arch.num_layers(model)
    names: list[str] = []
    for role, layers in modules.items():
        for layer in check_layers(layers, n, f"UltraEdit modules[{role!r}]"):
            names += _role_modules(arch, model, role, layer)
    twice = sorted({m for m in names if names.count(m) > 1})
    if twice:
        raise ValueError(f"UltraEdit modules {modules}: {twice} named more than once")
    return names


def _role_modules(arch: Arch, model: nn.Module, role: str, layer: int) -> list[str]:
    base, _, index = role.partition(".")
    if base == "mlp_out" and not index:
        return [arch.mlp_out_module(layer)]
    if base == "attn_out" and not index:
        return [arch.attn_out_module(layer)]
    if base == "mlp_in":
        present = arch.mlp_in_modules(layer, model)
        if not index:
            return present
        if index.isdigit() and int(index) < len(present):
            return [present[int(index)]]
        raise ValueError(f"UltraEdit modules: {role!r}: {type(model).__name__} has {len(present)} MLP input "
                         f"projection(s) per block ({', '.join(present)}); use mlp_in.0 .. mlp_in.{len(present) - 1}")
    raise ValueError(f"UltraEdit modules: unknown role {role!r}; use mlp_in, mlp_in.<i>, mlp_out or attn_out")


def cache(model: nn.Module, batch: dict[str, Tensor], names: Sequence[str],
          seq2seq: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Step 1: per module, the keys ``k_p`` and output gradients ``g_p`` (float32) at the answer
    positions ``P`` of one micro-batch, with ``L`` = cross-entropy averaged over ``P``.

    No weight is written and none gets a gradient: a zero leaf added to the modules' outputs
    is what autograd differentiates through.
    """
    zero = torch.zeros((), requires_grad=True, device=batch["input_ids"].device)
    with torch.enable_grad(), trace(model, list(names), inputs=True,
                                    edit_output=lambda _n, y: y + zero.to(y.dtype)) as t:
        logits, targets, mask = target_logits(model(**model_inputs(batch)).logits, batch["labels"], seq2seq)
        loss = F.cross_entropy(logits[mask].float(), targets[mask])
        grads = torch.autograd.grad(loss, [t[n].output for n in names])
    at = mask if seq2seq else F.pad(mask, (0, 1))  # decoder-only: the logits at p predict token p + 1
    K = {n: t[n].input.detach()[at].float() for n in names}
    G = {n: g.detach()[at].float() for n, g in zip(names, grads)}
    return K, G


def target_change(k_hat: Tensor, g_hat: Tensor, lr: float) -> Tensor:
    """Step 3: ``D = −η ‖k̂_p‖² ĝ_p`` per answer token, (n, d_out)."""
    return -lr * k_hat.square().sum(-1, keepdim=True) * g_hat


def ridge(K: Tensor, D: Tensor) -> tuple[Tensor, Tensor]:
    """Step 4: ``S = (KᵀK + I)⁻¹KᵀD``; returns ``(left, right) = (Dᵀ, (KᵀK + I)⁻¹Kᵀ)``, so that
    ``Sᵀ = left @ rightᵀ`` (the (out, in) update)."""
    A = K.T @ K + torch.eye(K.shape[1], dtype=K.dtype, device=K.device)
    return D.T, torch.linalg.solve(A, K.T)


def shape_key(K: Tensor, G: Tensor) -> str:
    """The normaliser a module shares with every module of its shape: ``"<d_in>x<d_out>"``."""
    return f"{K.shape[1]}x{G.shape[1]}"


class UltraEdit(Editor):
    """Closed-form lifelong editing from hidden states and gradients, with lifelong normalisation."""

    name = "ultraedit"
    Hparams = UltraEditHparams

    def edit(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest],
             history: Sequence[Edit] = ()) -> UltraEditDelta:
        """One turn on the model with ``history`` applied: cache, normalise, solve (module docstring)."""
        arch = arch_of(model)
        names = edited_modules(model, self.hparams.modules)
        stats = previous_stats(history, keys_device(model))
        keys, grads, stats = self.turn_features(model, tokenizer, requests, names, stats)
        updates = {}
        for n in names:
            z_hat = stats[shape_key(keys[n], grads[n])].normalise(torch.cat([keys[n], grads[n]], 1))
            d_in = keys[n].shape[1]
            D = target_change(z_hat[:, :d_in], z_hat[:, d_in:], self.hparams.lr)
            updates[f"{n}.weight"] = arch.low_rank_factors(*ridge(keys[n], D))
        n_tokens = keys[names[0]].shape[0]
        info = {"method": self.name, "modules": names, "n_requests": len(requests), "n_tokens": n_tokens,
                "lr": self.hparams.lr}
        packed = _packed(updates, base_identity(model, list(updates)), info)
        log.info("UltraEdit: %d requests, %d answer tokens, %d modules", len(requests), n_tokens, len(names))
        return UltraEditDelta(factors=packed.factors, dense=packed.dense, base=packed.base, info=info, stats=stats)

    def turn_features(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest],
                      names: list[str], stats: dict[str, Moments]
                      ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Moments]]:
        """Steps 1-2 over the micro-batches: ``K`` and ``G`` of the turn per module, and the statistics
        updated with every micro-batch (modules in order) before any solve."""
        seq2seq = arch_of(model).encoder_decoder
        keys: dict[str, list[Tensor]] = {n: [] for n in names}
        grads: dict[str, list[Tensor]] = {n: [] for n in names}
        for part in chunks(requests, self.hparams.micro_batch):
            batch = encode(tokenizer, [r.prompt for r in part], [r.target_new for r in part], seq2seq=seq2seq,
                           device=keys_device(model))
            K, G = cache(model, batch, names, seq2seq)
            for n in names:
                z = torch.cat([K[n], G[n]], 1)
                shape = shape_key(K[n], G[n])
                stats[shape] = stats.get(shape, Moments.empty(z.shape[1], z.device)).update(z)
                keys[n].append(K[n])
                grads[n].append(G[n])
        return {n: torch.cat(k) for n, k in keys.items()}, {n: torch.cat(g) for n, g in grads.items()}, stats


def keys_device(model: nn.Module) -> torch.device:
    """Where the model's inputs (and the turn's keys, gradients and statistics) live."""
    return next(model.parameters()).device

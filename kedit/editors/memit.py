"""MEMIT: Mass-Editing Memory in a Transformer (Meng et al., 2023).

Many requests in one call, spread over a range of MLP layers ``L₁ … L_last``:

1. for each request, a target hidden state ``zᵢ = hᵢ + δᵢ`` at the output of block
   ``L_last`` (the subject's last token), with ``δᵢ`` optimized as in ROME (Eq. 16);
2. for each layer ``l`` in order (earlier layers' updates already in place):
   the keys ``K`` (d_in × n, template-averaged, Eq. 18), the remaining residual
   ``R = (Z - H_cur) / (number of layers left)`` (Eq. 20), and the update (Eq. 14)

       ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹          with C = E[k kᵀ], λ = ``mom2_update_weight``

   which is rank ≤ n. The result is kept low-rank (``left = R``, ``right = (λC + KKᵀ)⁻¹K``)
   when that is smaller than the dense matrix.

The model is left untouched: the layer updates are applied temporarily while later
layers' keys are computed and restored (bit-exactly) before ``edit`` returns.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kedit.data.encode import encode
from kedit.editors.base import Editor, WeightDelta, base_identity, model_name
from kedit.editors.locate import (LocateHparams, context_templates, depth_layer, locate_requests,
                                  optimize_values, ridge, subject_keys, subject_last_index)
from kedit.models.arch import arch_of

log = logging.getLogger(__name__)


@dataclass
class MEMITHparams(LocateHparams):
    """MEMIT hyperparameters (paper defaults for GPT-J)."""

    layers: list[int] | None = None
    """Edited layers; None: 5 consecutive MLPs ending at ~27% of the depth (GPT-J: 3-8 of 28)."""
    templates: list[tuple[int, int]] = field(default_factory=lambda: [(10, 5)])
    """Context templates as (length in tokens, count) pairs (the paper: 5 of 10 tokens)."""
    v_steps: int = 25
    """Maximum optimization steps for δ."""
    clamp_norm_factor: float = 0.75
    """‖δ‖ is clamped to this times the norm of the original hidden state."""
    mom2_update_weight: float | None = None
    """λ: weight of the preserved-key statistics C against the new keys (Eq. 14). None: 15000 · d_in / 16384,
    GPT-J's ratio (E[kᵀC⁻¹k] = d_in, so a fixed λ would realize far less of the update on narrower MLPs)."""


class MEMIT(Editor):
    """Batch edit of many facts over a range of MLP layers."""

    name = "memit"
    Hparams = MEMITHparams

    def __init__(self, hparams: MEMITHparams | None = None, **overrides: Any) -> None:
        super().__init__(hparams, **overrides)
        self._mom2: dict[tuple, Tensor] = {}
        self.stats_seconds = 0.0

    # ------------------------------------------------------------------ configuration

    @staticmethod
    def default_layers(n_layers: int) -> list[int]:
        last = depth_layer(n_layers, 0.27)
        return list(range(max(0, last - 4), last + 1))

    def layers(self, model: nn.Module) -> list[int]:
        n = arch_of(model).num_layers(model)
        layers = sorted(self.hparams.layers) if self.hparams.layers else self.default_layers(n)
        bad = [x for x in layers if not 0 <= x < n]
        if bad:
            raise ValueError(f"{self.name}: layers {bad} out of range for a model with {n} layers")
        return layers

    # ------------------------------------------------------------------ statistics

    def second_moments(self, model: nn.Module, tokenizer, layers: list[int]) -> dict[int, Tensor]:
        """``{layer: C}``, measured (or read from the disk cache) once per model and layer."""
        hp = self.hparams
        key = lambda layer: (id(model), model_name(model), layer, str(hp.corpus)[:200],  # noqa: E731
                             hp.stats_tokens, hp.stats_seq_len)
        missing = [layer for layer in layers if key(layer) not in self._mom2]
        if missing:
            from kedit.stats import second_moments

            t0 = time.perf_counter()
            got = second_moments(model, tokenizer, missing, hp.corpus, n_tokens=hp.stats_tokens,
                                 seq_len=hp.stats_seq_len, cache_dir=hp.stats_cache_dir)
            self.stats_seconds += time.perf_counter() - t0
            for layer, C in got.items():
                self._mom2[key(layer)] = C
        return {layer: self._mom2[key(layer)] for layer in layers}

    # ------------------------------------------------------------------ the update of one layer

    def solve(self, model: nn.Module, layer: int, K: Tensor, R: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
        """Eq. 14: ``ΔW = R Kᵀ (λC + KKᵀ)⁻¹`` as ``(left, right)`` with ``ΔW = left @ rightᵀ``.

        ``K`` (d_in, n) keys, ``R`` (d_out, n) residuals, float64.
        """
        lam = self.hparams.mom2_update_weight
        if lam is None:
            lam = 15000.0 * C.shape[0] / 16384
        A = lam * ridge(C, self.hparams.cov_ridge) + K @ K.T
        right = torch.linalg.solve(A, K)  # (d_in, n); A is symmetric
        return R, right

    def after_edit(self, model: nn.Module, tokenizer, requests, templates, layers: list[int]) -> None:
        """Called with the new edit still applied (AlphaEdit accumulates keys here)."""

    # ------------------------------------------------------------------ edit

    def edit(self, model: nn.Module, tokenizer, requests, history=()) -> WeightDelta:
        hp = self.hparams
        reqs = locate_requests(requests)
        arch = arch_of(model)
        layers = self.layers(model)
        weights = [arch.mlp_out_weight(layer) for layer in layers]
        base = base_identity(model, weights)
        templates = context_templates(model, tokenizer, hp.templates, hp.template_seed)
        covs = self.second_moments(model, tokenizer, layers)
        self.prepare(model, tokenizer, layers, covs)

        if hp.edit_aware:
            return self._edit_aware(model, tokenizer, reqs, templates, layers, covs, weights, base)

        # 1. target hidden states at the last edited layer (Eq. 16), in batches of requests
        # (requests of similar suffix length share a batch: less padding in every step)
        z_layer = layers[-1]
        batches = value_batches(tokenizer, reqs, hp.v_batch_size)
        order = [i for idx in batches for i in idx]
        deltas, inits, steps, nlls = [], [], [0] * len(reqs), [0.0] * len(reqs)
        for idx in _progress(batches, f"{self.name}: values"):
            vals = optimize_values(model, tokenizer, [reqs[i] for i in idx], templates, arch.block(z_layer), hp)
            deltas.append(vals.delta)
            inits.append(vals.init)
            for j, i in enumerate(idx):
                steps[i], nlls[i] = vals.steps[j], vals.nll[j]
        back = torch.tensor(order).argsort()
        z_target = (torch.cat(inits) + torch.cat(deltas))[back].double()  # (n, d), request order

        # 2. spread the residual over the layers, earlier layers first (Eqs. 14-20)
        updates: dict[str, tuple[Tensor, Tensor]] = {}
        applied: list[WeightDelta] = []
        try:
            for i, layer in enumerate(layers):
                keys, z_cur = subject_keys(model, tokenizer, reqs, templates, [layer], z_layer=z_layer)
                K = keys[layer].double().T  # (d_in, n)
                R = (z_target - z_cur.double()).T / (len(layers) - i)  # (d_out, n)
                left, right = self.solve(model, layer, K, R, covs[layer])
                factors = arch.low_rank_factors(left.float(), right.float())
                updates[weights[i]] = factors
                d = WeightDelta(factors={weights[i]: factors})
                d.apply(model, check=False)
                applied.append(d)
            self.after_edit(model, tokenizer, reqs, templates, layers)
        finally:
            for d in reversed(applied):
                d.restore(model)

        info = {"method": self.name, "layers": layers, "n_requests": len(reqs), "v_steps": steps,
                "final_nll": [round(x, 4) for x in nlls]}
        return _packed(updates, base, info)

    def _edit_aware(self, model, tokenizer, reqs, templates, layers, covs, weights, base) -> WeightDelta:
        """One layer: the update's key map first, then the values optimized through it."""
        if len(layers) != 1:
            raise ValueError(f"{self.name}: edit_aware=True needs exactly one layer, got {layers}")
        arch, layer = arch_of(model), layers[0]
        keys, _ = subject_keys(model, tokenizer, reqs, templates, [layer])
        K = keys[layer].double().T
        _, right = self.solve(model, layer, K, torch.zeros(1, K.shape[1], dtype=K.dtype, device=K.device),
                              covs[layer])
        vals = optimize_values(model, tokenizer, reqs, templates, arch.mlp_out_module(layer), self.hparams,
                               edit_right=right.T.float())
        with WeightDelta(factors={weights[0]: arch.low_rank_factors(vals.delta.T, right.float())}).applied(model):
            self.after_edit(model, tokenizer, reqs, templates, layers)
        info = {"method": self.name, "layers": layers, "n_requests": len(reqs), "v_steps": vals.steps,
                "final_nll": [round(x, 4) for x in vals.nll], "edit_aware": True}
        return _packed({weights[0]: arch.low_rank_factors(vals.delta.T.contiguous(), right.float())}, base, info)

    def prepare(self, model: nn.Module, tokenizer, layers: list[int], covs: dict[int, Tensor]) -> None:
        """Per-call setup before the edit (AlphaEdit builds its projections here)."""


def value_batches(tokenizer, requests, size: int) -> list[list[int]]:
    """Indices of the requests whose values are optimized together, ``size`` at a time:
    requests of similar suffix length share a batch (less padding in every step)."""
    order = sorted(range(len(requests)), key=lambda i: _suffix_length(tokenizer, requests[i]))
    return [order[b:b + size] for b in range(0, len(order), size)]


def _suffix_length(tokenizer, request) -> int:
    """Tokens from the subject's last token to the end of prompt + target (the optimized part):
    the sort key that puts requests of similar length in the same batch of values."""
    ids = encode(tokenizer, [request.prompt], [request.target_new])["attention_mask"]
    end = request.prompt.rfind(request.subject) + len(request.subject)
    return int(ids.sum()) - subject_last_index(tokenizer, request.prompt, end)


def _progress(items, desc: str):
    if len(items) < 2:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="batch", disable=None)


def _packed(updates: dict[str, tuple[Tensor, Tensor]], base: dict, info: dict) -> WeightDelta:
    """Low-rank factors where they are smaller than the dense matrix, else dense."""
    factors, dense = {}, {}
    for name, (a, b) in updates.items():
        if a.shape[1] * (a.shape[0] + b.shape[0]) < a.shape[0] * b.shape[0]:
            factors[name] = (a.contiguous(), b.contiguous())
        else:
            dense[name] = a @ b.T
    return WeightDelta(factors=factors, dense=dense, base=base, info=info)

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

Norm-Anchor Scaling (``norm_anchor``, off by default; Liu et al., arXiv:2602.02543): after step 1,
each target is re-aimed so that the MLP output of ``L_last`` it asks for, ``v* = v0 + δ``, has a
fixed norm measured once on the unedited model (:func:`kedit.editors.values.anchor_values`);
AlphaEdit inherits it.

The two steps are public: :meth:`MEMIT.target_states` (step 1) and :meth:`MEMIT.spread`
(step 2), whose update of one layer is :meth:`MEMIT.solve`. The model is left untouched: the
layer updates are applied temporarily while later layers' keys are computed and restored
(bit-exactly) before ``edit`` returns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kedit.data.encode import encode
from kedit.data.request import EditRequest
from kedit.editors.base import Edit, WeightDelta, base_identity
from kedit.editors.locate import (LocateHparams, LocateThenEdit, context_templates, depth_layer, locate_requests,
                                  progress, ridge, subject_keys, subject_last_index)
from kedit.editors.values import NormAnchorHparams, Values, anchor_norm, anchor_values, mlp_outputs, optimize_values
from kedit.models.arch import arch_of
from kedit.utils import chunks

log = logging.getLogger(__name__)

Apply = Callable[[dict[str, tuple[Tensor, Tensor]]], None]
"""Adds a low-rank update to the model until the edit returns (:meth:`LocateThenEdit.applying`)."""

@dataclass
class MEMITHparams(NormAnchorHparams, LocateHparams):
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
    per_template_keys: bool = False
    """Fit the update on each context template's key (one column per request and template, weighted 1/T so a
    request counts once against C) instead of their mean (Eq. 18, the paper): the edit then holds on every
    template's key, the bare prompt's included, as ROME's ``fit_templates``. Not with ``edit_aware``; AlphaEdit
    still stores its edits' mean keys for the history (``K_p``)."""


class MEMIT(LocateThenEdit):
    """Batch edit of many facts over a range of MLP layers."""

    name = "memit"
    Hparams = MEMITHparams

    # ------------------------------------------------------------------ configuration

    @staticmethod
    def default_layers(n_layers: int) -> list[int]:
        last = depth_layer(n_layers, 0.27)
        return list(range(max(0, last - 4), last + 1))

    def preserved(self, model: nn.Module, tokenizer, layers: list[int], history: Sequence[Edit]) -> dict[int, Any]:
        """Per layer, what the update preserves: ``C = E[kkᵀ]`` of the model before ``history``."""
        return self.second_moments(model, tokenizer, layers, history)

    def prior_weight(self, C: Tensor) -> float:
        """λ (``mom2_update_weight``); None: GPT-J's 15000 scaled to the MLP width ``d_in`` of ``C``."""
        lam = self.hparams.mom2_update_weight
        return 15000.0 * C.shape[0] / 16384 if lam is None else lam

    def solve(self, K: Tensor, R: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
        """Eq. 14: ``ΔW = R Kᵀ (λC + KKᵀ)⁻¹`` as ``(left, right)`` with ``ΔW = left @ rightᵀ``.

        ``K`` (d_in, n) keys, ``R`` (d_out, n) residuals, float64.
        """
        A = self.prior_weight(C) * ridge(C, self.hparams.cov_ridge) + K @ K.T
        return R, torch.linalg.solve(A, K)  # (d_in, n); A is symmetric

    # ------------------------------------------------------------------ edit

    def edit(self, model: nn.Module, tokenizer, requests, history=()) -> WeightDelta:
        reqs = locate_requests(requests)
        arch, layers = arch_of(model), self.layers(model)
        base = base_identity(model, [arch.mlp_out_weight(layer) for layer in layers])
        templates = context_templates(model, tokenizer, self.hparams.templates, self.hparams.template_seed)
        preserved = self.preserved(model, tokenizer, layers, history)
        with self.applying(model) as apply:
            if self.hparams.edit_aware:
                updates, info = self._edit_aware(model, tokenizer, reqs, templates, layers, preserved, apply)
            else:
                anchor = self.anchor(model, tokenizer, layers[-1], history)
                z_target, vals = self.target_states(model, tokenizer, reqs, templates, layers[-1], anchor)
                updates = self.spread(model, tokenizer, reqs, templates, layers, z_target, preserved, apply)
                info = {"method": self.name, "layers": layers, "n_requests": len(reqs), "v_steps": vals.steps,
                        "final_nll": [round(x, 4) for x in vals.nll]}
                if anchor is not None:
                    info.update(nas_anchor=anchor, nas_skipped=vals.skipped)
            return self.package(model, tokenizer, reqs, templates, layers, updates, base, info)

    def values(self, model: nn.Module, tokenizer, requests: Sequence[EditRequest], templates: Sequence[str],
               module: str) -> Values:
        """The value step (Eq. 16) of one batch of requests, at the output of block ``module``."""
        return optimize_values(model, tokenizer, requests, templates, module, self.hparams)

    def anchor(self, model: nn.Module, tokenizer, z_layer: int, history: Sequence[Edit]) -> float | None:
        """NAS's anchor norm at ``z_layer`` on the model before ``history`` (None: NAS off)."""
        if not self.hparams.norm_anchor:
            return None
        return anchor_norm(model, tokenizer, z_layer, arch_of(model).block(z_layer), self.hparams, history)

    def target_states(self, model: nn.Module, tokenizer, requests: Sequence[EditRequest], templates: Sequence[str],
                      z_layer: int, anchor: float | None = None) -> tuple[Tensor, Values]:
        """Step 1: the target hidden states ``zᵢ = hᵢ + δᵢ`` (n, d_model) at the output of block
        ``z_layer``, float64, in request order, with the :class:`Values` (``delta`` and ``init``
        left empty). Requests of similar suffix length share a batch (less padding per step).
        With an ``anchor`` (NAS), each ``δᵢ`` is re-aimed by :func:`anchor_values`."""
        module = arch_of(model).block(z_layer)
        batches = value_batches(tokenizer, requests, self.hparams.v_batch_size)
        order = [i for idx in batches for i in idx]
        zs, steps, nlls, skipped = [], [0] * len(requests), [0.0] * len(requests), []
        for idx in progress(batches, f"{self.name}: values", "batch"):
            batch = [requests[i] for i in idx]
            vals = self.values(model, tokenizer, batch, templates, module)
            delta = vals.delta
            if anchor is not None:
                v0 = mlp_outputs(model, tokenizer, batch, z_layer)
                delta, skip = anchor_values(v0, delta, anchor, self.hparams.anchor_skip_factor)
                skipped += [idx[j] for j in skip.nonzero().flatten().tolist()]
            zs.append(vals.init + delta)
            for j, i in enumerate(idx):
                steps[i], nlls[i] = vals.steps[j], vals.nll[j]
        if skipped:
            log.warning("%s: NAS skipped %d of %d requests (‖v*‖ > %g × anchor): they write nothing",
                        self.name, len(skipped), len(requests), self.hparams.anchor_skip_factor)
        back = torch.tensor(order).argsort()
        empty = torch.empty(0)
        return torch.cat(zs)[back].double(), Values(empty, empty, None, steps, nlls, sorted(skipped))

    def spread(self, model: nn.Module, tokenizer, requests: Sequence[EditRequest], templates: Sequence[str],
               layers: list[int], z_target: Tensor, preserved: dict[int, Any], apply: Apply,
               ) -> dict[str, tuple[Tensor, Tensor]]:
        """Step 2 (Eqs. 14-20): the residual ``Z - H`` spread over ``layers``, lowest first; each
        layer's update is applied (``apply``) before the next layer's keys are read."""
        arch, updates = arch_of(model), {}
        for i, layer in enumerate(layers):
            per_template = self.hparams.per_template_keys
            keys, z_cur = subject_keys(model, tokenizer, requests, templates, [layer], z_layer=layers[-1],
                                       per_template=per_template)
            R = (z_target - z_cur.double()).T / (len(layers) - i)  # (d_out, n), Eq. 20
            if per_template:  # columns (request, template), request-major; each weighted 1/√T in K and in R
                n, T, d_in = keys[layer].shape
                K = keys[layer].double().reshape(n * T, d_in).T / T ** 0.5
                R = R.repeat_interleave(T, dim=1) / T ** 0.5
            else:
                K = keys[layer].double().T  # (d_in, n), Eq. 18
            left, right = self.solve(K, R, preserved[layer])
            name = arch.mlp_out_weight(layer)
            updates[name] = arch.low_rank_factors(left.float(), right.float())
            apply({name: updates[name]})
        return updates

    def package(self, model: nn.Module, tokenizer, requests: Sequence[EditRequest], templates: Sequence[str],
                layers: list[int], updates: dict[str, tuple[Tensor, Tensor]], base: dict, info: dict) -> WeightDelta:
        """The edit, made while all of its updates are still applied."""
        return _packed(updates, base, info)

    def _edit_aware(self, model, tokenizer, reqs, templates, layers, preserved, apply) -> tuple[dict, dict]:
        """One layer: the update's key map first, then the values optimized through it."""
        if len(layers) != 1:
            raise ValueError(f"{self.name}: edit_aware=True needs exactly one layer, got {layers}")
        if self.hparams.norm_anchor:
            raise ValueError(f"{self.name}: norm_anchor (NAS) rescales the paper's value step; not with edit_aware=True")
        if self.hparams.per_template_keys:
            raise ValueError(f"{self.name}: per_template_keys fits the update's keys; edit_aware=True fixes them first")
        arch, layer = arch_of(model), layers[0]
        keys, _ = subject_keys(model, tokenizer, reqs, templates, [layer])
        K = keys[layer].double().T
        _, right = self.solve(K, torch.zeros(1, K.shape[1], dtype=K.dtype, device=K.device), preserved[layer])
        vals = optimize_values(model, tokenizer, reqs, templates, arch.mlp_out_module(layer), self.hparams,
                               edit_right=right.T.float())
        name = arch.mlp_out_weight(layer)
        apply({name: arch.low_rank_factors(vals.delta.T, right.float())})
        info = {"method": self.name, "layers": layers, "n_requests": len(reqs), "v_steps": vals.steps,
                "final_nll": [round(x, 4) for x in vals.nll], "edit_aware": True}
        return {name: arch.low_rank_factors(vals.delta.T.contiguous(), right.float())}, info


def value_batches(tokenizer, requests, size: int) -> list[list[int]]:
    """Indices of the requests whose values are optimized together, ``size`` at a time:
    requests of similar suffix length share a batch (less padding in every step)."""
    order = sorted(range(len(requests)), key=lambda i: _suffix_length(tokenizer, requests[i]))
    return chunks(order, size)


def _suffix_length(tokenizer, request) -> int:
    """Tokens from the subject's last token to the end of prompt + target (the optimized part):
    the sort key that puts requests of similar length in the same batch of values."""
    ids = encode(tokenizer, [request.prompt], [request.target_new])["attention_mask"]
    end = request.prompt.rfind(request.subject) + len(request.subject)
    return int(ids.sum()) - subject_last_index(tokenizer, request.prompt, end)


def _packed(updates: dict[str, tuple[Tensor, Tensor]], base: dict, info: dict) -> WeightDelta:
    """Low-rank factors where they are smaller than the dense matrix, else dense."""
    factors, dense = {}, {}
    for name, (a, b) in updates.items():
        if a.shape[1] * (a.shape[0] + b.shape[0]) < a.shape[0] * b.shape[0]:
            factors[name] = (a.contiguous(), b.contiguous())
        else:
            dense[name] = a @ b.T
    return WeightDelta(factors=factors, dense=dense, base=base, info=info)

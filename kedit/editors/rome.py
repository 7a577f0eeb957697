"""ROME: Rank-One Model Editing (Meng et al., 2022), with the r-ROME key fix.

For each request, at one layer ``L`` of the MLP output projection ``W`` (d_out × d_in):

1. ``k*``: the input of ``W`` at the subject's last token, averaged over context templates
   the model generates itself (Eq. 3);
2. ``δ``: optimized so that adding it to ``W``'s output at that token makes the model
   predict ``target_new`` (Eq. 4: NLL + KL essence term + weight decay, norm clamp);
3. the rank-one update ``ΔW = δ (C⁻¹k*)ᵀ / (k*ᵀ C⁻¹ k*)`` (Eq. 2), so that ``ΔW k* = δ``
   while disturbing other keys least under ``C = E[k kᵀ]``.

r-ROME (Gupta et al., 2024): plain ROME computes ``u = C⁻¹k*`` with the template-averaged
key but divides by the key of the bare prompt; that mismatch makes some edits explode and
collapses the model under sequential editing. Here the same key ``k*`` is used for both
(``same_key=True``); ``same_key=False`` reproduces plain ROME.

Norm-Anchor Scaling (``norm_anchor``, off by default; Liu et al., arXiv:2602.02543): ROME's value
``v* = v0 + δ`` (the MLP output it asks for) is rescaled to a norm measured once on the unedited
model, and an edit whose ‖v*‖ exceeds 5× that anchor writes nothing (the official ROME port's factor).

Several requests in one call are edited one after another, each on top of the previous
ones; the result is one ``WeightDelta`` of rank ``n``. The update (Eq. 2) is
:func:`rank_one_right`; the value step (Eq. 4) is :func:`kedit.editors.values.value_loss`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from kedit.data.request import EditRequest
from kedit.editors.base import Edit, WeightDelta, base_identity
from kedit.editors.locate import (LocateHparams, LocateThenEdit, context_templates, depth_layer, locate_requests,
                                  progress, ridge, subject_keys)
from kedit.editors.values import NormAnchorHparams, Values, anchor_norm, anchor_values, optimize_values
from kedit.models.arch import arch_of

log = logging.getLogger(__name__)

@dataclass
class ROMEHparams(NormAnchorHparams, LocateHparams):
    """ROME hyperparameters (paper defaults, GPT-2 XL / GPT-J)."""

    layers: list[int] | None = None
    """The edited layer, as a one-element list; None: the MLP at ~18% of the depth (GPT-J: 5 of 28)."""
    templates: list[tuple[int, int]] = field(default_factory=lambda: [(5, 10), (10, 10)])
    """Context templates as (length in tokens, count) pairs: the paper's 10 of 5 and 10 of 10 tokens
    (MEMIT's 5 of 10 tokens is ~2x faster but generalizes to other subjects more on SmolLM2)."""
    same_key: bool = True
    """r-ROME: use the template-averaged key k* both to compute and to apply the update."""
    fit_templates: bool = False
    """Make the update give δ on every template's key (ΔW k_t = δ for all t, least C-norm, still rank one)
    instead of on their mean k* only: the bare prompt's key is atypical, so the mean-key update
    delivers only part of δ there."""
    fit_ridge: float = 1e-3
    """Ridge on the templates' Gram matrix (relative to its mean diagonal) for ``fit_templates``."""
    anchor_skip_factor: float = 5.0
    """NAS: a value with ‖v*‖ above this times the anchor writes nothing (the official ROME port: 5)."""


class ROME(LocateThenEdit):
    """Rank-one edit of one MLP output projection per request."""

    name = "rome"
    Hparams = ROMEHparams

    # ------------------------------------------------------------------ configuration

    @staticmethod
    def default_layer(n_layers: int) -> int:
        return depth_layer(n_layers, 0.18)

    @staticmethod
    def default_layers(n_layers: int) -> list[int]:
        return [ROME.default_layer(n_layers)]

    def layer(self, model: nn.Module) -> int:
        layers = self.hparams.layers
        if layers and len(layers) != 1:
            raise ValueError(f"ROME edits one layer; got layers={layers} (use MEMIT for several)")
        return self.layers(model)[0]

    # ------------------------------------------------------------------ statistics

    def cov_factor(self, model: nn.Module, tokenizer, layer: int, history: Sequence[Edit] = ()) -> Tensor:
        """Cholesky factor of ``C + ridge`` (float64), ``C`` of the model before ``history``."""
        rel = self.hparams.cov_ridge
        return self.statistic(model, tokenizer, [layer], history, ("cholesky", rel),
                              lambda C: torch.linalg.cholesky(ridge(C, rel)))[layer]

    # ------------------------------------------------------------------ edit

    def edit(self, model: nn.Module, tokenizer, requests, history=()) -> WeightDelta:
        hp = self.hparams
        reqs = locate_requests(requests)
        arch = arch_of(model)
        layer = self.layer(model)
        weight = arch.mlp_out_weight(layer)
        base = base_identity(model, [weight])
        templates = context_templates(model, tokenizer, hp.templates, hp.template_seed)
        chol = self.cov_factor(model, tokenizer, layer, history)
        anchor = None
        if hp.norm_anchor:
            if hp.edit_aware:
                raise ValueError("rome: norm_anchor (NAS) rescales the paper's value step; not with edit_aware=True")
            anchor = anchor_norm(model, tokenizer, layer, arch.mlp_out_module(layer), hp, history)
        lefts, rights, steps, nlls, skipped = [], [], [], [], []
        with self.applying(model) as apply:
            for r in progress(reqs, "ROME", "edit"):
                if lefts:  # later requests see the earlier ones applied (restored below)
                    apply({weight: arch.low_rank_factors(lefts[-1][:, None], rights[-1][:, None])})
                vals, right = self.update(model, tokenizer, r, templates, layer, chol, anchor)
                skipped += [len(lefts)] if vals.skipped else []
                lefts.append(vals.delta[0].float())
                rights.append(right.float())
                steps += vals.steps
                nlls += vals.nll
        left = torch.stack(lefts, dim=1)  # (d_out, n)
        right = torch.stack(rights, dim=1)  # (d_in, n)
        info = {"method": "rome", "layer": layer, "n_requests": len(reqs), "v_steps": steps,
                "final_nll": [round(x, 4) for x in nlls], "same_key": hp.same_key}
        if anchor is not None:
            info.update(nas_anchor=anchor, nas_skipped=skipped)
        return WeightDelta(factors={weight: arch.low_rank_factors(left, right)}, base=base, info=info)

    def update(self, model: nn.Module, tokenizer, request: EditRequest, templates: list[str], layer: int,
               chol: Tensor, anchor: float | None = None) -> tuple[Values, Tensor]:
        """One request's value δ (Eq. 4; with NAS's ``anchor``, rescaled) and the right vector r of
        ``ΔW = δ rᵀ`` (Eq. 2)."""
        hp = self.hparams
        module = arch_of(model).mlp_out_module(layer)
        if hp.edit_aware:  # the update's direction first, then δ through it
            k_star = subject_keys(model, tokenizer, [request], templates, [layer])[0][layer][0].double()
            right = rank_one_right(k_star, chol)
            return optimize_values(model, tokenizer, [request], templates, module, hp,
                                   edit_right=right.float()[None]), right
        vals = optimize_values(model, tokenizer, [request], templates, module, hp, want_keys=True)
        if anchor is not None:  # v0 = vals.init: ROME's δ is added to the MLP output itself
            delta, skip = anchor_values(vals.init, vals.delta, anchor, hp.anchor_skip_factor)
            if skip.any():
                log.warning("rome: NAS skipped the edit of %r (‖v*‖ > %g × anchor): it writes nothing",
                            request.prompt, hp.anchor_skip_factor)
            vals = replace(vals, delta=delta, skipped=[0] if skip.any() else [])
        if hp.fit_templates:
            return vals, fit_keys(vals.template_keys[0].double(), chol, hp.fit_ridge)
        k_star = vals.keys[0].double()  # (d_in,) Eq. 3
        return vals, rank_one_right(k_star, chol, k_star if hp.same_key else vals.bare_keys[0].double())


def rank_one_right(k_star: Tensor, chol: Tensor, k_apply: Tensor | None = None) -> Tensor:
    """ROME's update (Eq. 2) ``ΔW = δ rᵀ`` with ``r = C⁻¹k* / (k_applyᵀ C⁻¹k*)``: ``ΔW k_apply = δ``,
    and the least change ``ΔW`` under ``C = E[kkᵀ]``. ``k_apply``: ``k*`` (r-ROME) or, in plain
    ROME, the bare prompt's key. ``chol``: Cholesky factor of ``C``."""
    u = torch.cholesky_solve(k_star[:, None], chol)[:, 0]  # C⁻¹ k*
    return u / ((k_star if k_apply is None else k_apply) @ u)


def fit_keys(keys: Tensor, chol: Tensor, rel_ridge: float = 0.0) -> Tensor:
    """The right vector ``r`` of least ``rᵀCr`` with ``r·k_t = 1`` for every key (rows of
    ``keys``), i.e. ``C⁻¹K (KᵀC⁻¹K)⁻¹ 1`` (with a relative ridge on the Gram matrix); for a
    single key it is ROME's ``C⁻¹k / (kᵀC⁻¹k)``. ``chol``: Cholesky factor of ``C``."""
    A = torch.cholesky_solve(keys.T, chol)  # C⁻¹K: (d, T)
    G = keys @ A  # KᵀC⁻¹K: (T, T)
    if rel_ridge > 0:
        G = G + rel_ridge * G.diagonal().mean() * torch.eye(len(G), dtype=G.dtype, device=G.device)
    return A @ torch.linalg.solve(G, torch.ones(len(G), dtype=G.dtype, device=G.device))

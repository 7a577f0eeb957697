"""EMMET: Equality-constrained Mass Model Editing in Transformers (Gupta et al., EMNLP Findings 2024).

ROME and MEMIT optimize the same preservation-memorization objective. ROME keeps each new fact
as an equality constraint, one fact at a time; MEMIT relaxes the constraints to least squares
so that it can take a batch. EMMET keeps the equality constraints for a whole batch ("batched
ROME"):

    min ‖Ŵ K₀ − W₀ K₀‖   s.t.   Ŵ kᵢ = vᵢ for every request i

whose solution, per edited layer (:meth:`EMMET.solve`), is

    ΔW = R D⁻¹ Kᵀ C⁻¹,     D = Kᵀ C⁻¹ K  (+ emmet_lambda · I when the batch has more than one request)

with ``K`` (d_in, n) the template-averaged keys, ``R`` the residuals and ``C = λ E[kkᵀ]``
(``mom2_update_weight``) as in MEMIT, whose value step and layer spreading it reuses. With one
request and no ridge it is ROME's rank-one update. The update is kept as ``left = R D⁻¹``,
``right = C⁻¹ K`` (rank ≤ n).

Defaults are the official code's GPT-J values (one layer, ``mom2_update_weight`` 1,
``emmet_lambda`` 0.1). EasyEdit's configs use ``mom2_update_weight`` 10⁴-10⁵: with the ridge on
``D`` that is a different algorithm (a heavily regularized fit, not an equality), since the scale
of ``C`` cancels in ``ΔW`` only without the ridge.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor

from kedit.editors.locate import depth_layer, ridge
from kedit.editors.memit import MEMIT, MEMITHparams

log = logging.getLogger(__name__)


@dataclass
class EMMETHparams(MEMITHparams):
    """EMMET hyperparameters (official code, GPT-J 6B)."""

    layers: list[int] | None = None
    """Edited layers; None: the one MLP at ~18% of the depth (GPT-J: 5 of 28)."""
    templates: list[tuple[int, int]] = field(default_factory=lambda: [(10, 5)])
    """Context templates as (length in tokens, count) pairs."""
    v_lr: float = 0.5
    """Adam learning rate of δ."""
    v_steps: int = 25
    """Maximum optimization steps for δ."""
    clamp_norm_factor: float = 0.75
    """‖δ‖ is clamped to this times the norm of the original hidden state."""
    mom2_update_weight: float | None = 1.0
    """λ: scale of the preserved-key statistics C. Without ``emmet_lambda`` it cancels; with it, a larger λ
    weakens the equality constraints (EasyEdit: 10⁴-10⁵). None: MEMIT's 15000 · d_in / 16384."""
    emmet_lambda: float = 0.1
    """Ridge on ``D = KᵀC⁻¹K`` when a batch has more than one request (against ill-conditioning, e.g. repeated
    subjects); single requests get none, so one request is exactly ROME's update."""
    update_norm_lambda: float = 0.0
    """Added to C's diagonal (times I) before inverting (the official code's ``update_norm_lambda``)."""


class EMMET(MEMIT):
    """Batched ROME: every request of a batch is an equality constraint on the edited weight."""

    name = "emmet"
    Hparams = EMMETHparams

    @staticmethod
    def default_layers(n_layers: int) -> list[int]:
        return [depth_layer(n_layers, 5 / 28)]

    def solve(self, K: Tensor, R: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
        """``ΔW = R D⁻¹ Kᵀ C⁻¹`` with ``D = KᵀC⁻¹K (+ emmet_lambda I)``, as ``(left, right)`` with
        ``ΔW = left @ rightᵀ``: ``left = R D⁻¹`` (d_out, n), ``right = C⁻¹K`` (d_in, n); float64."""
        hp = self.hparams
        A = self.prior_weight(C) * ridge(C, hp.cov_ridge)
        if hp.update_norm_lambda:
            A = A + hp.update_norm_lambda * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        right = torch.linalg.solve(A, K)  # C⁻¹K; A is symmetric
        D = K.T @ right
        if K.shape[1] > 1 and hp.emmet_lambda:
            D = D + hp.emmet_lambda * torch.eye(D.shape[0], dtype=D.dtype, device=D.device)
        try:
            left = torch.linalg.solve(D, R.T).T  # R D⁻¹; D is symmetric
        except torch.linalg.LinAlgError:
            log.warning("EMMET: D = KᵀC⁻¹K is singular (repeated subjects in one batch?); using its pseudo-inverse")
            left = R @ torch.linalg.pinv(D)
        return left, right

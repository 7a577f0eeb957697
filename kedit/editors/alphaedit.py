"""AlphaEdit: null-space constrained knowledge editing (Fang et al., ICLR 2025).

MEMIT's update, projected onto the null space of the preserved-knowledge keys ``K₀`` so
that ``ΔW K₀ ≈ 0``: the outputs on preserved knowledge do not move, and sequential editing
does not collapse the model.

* ``P = Û Ûᵀ``, with ``Û`` the eigenvectors of ``K₀K₀ᵀ ∝ C = E[k kᵀ]`` whose eigenvalues
  are below ``nullspace_threshold`` (the paper's SVD of the covariance statistics);
* per layer (Eq. 12, with the residual ``R`` and keys ``K`` as in MEMIT)

      ΔW = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + α I)⁻¹

  where ``K_p`` are the keys of all previous edits and ``α`` = ``L2``. The update is rank
  ≤ n, kept as ``left = R``, ``right = (P(KKᵀ + K_pK_pᵀ) + αI)⁻¹ P K``.

State across calls: the editor object keeps ``P`` (per model and layer) and the running
sum ``K_p K_pᵀ`` of the keys of every edit it has returned so far, as the paper does for
sequential editing. This assumes each returned edit is applied before the next ``edit``
call. Call :meth:`AlphaEdit.reset` to forget the previous edits (e.g. before independent
single edits), or set ``accumulate_keys=False``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kedit.editors.base import model_name
from kedit.editors.locate import subject_keys
from kedit.editors.memit import MEMIT, MEMITHparams

log = logging.getLogger(__name__)


@dataclass
class AlphaEditHparams(MEMITHparams):
    """AlphaEdit hyperparameters (paper defaults, LLaMA3-8B)."""

    v_lr: float = 0.1
    """Adam learning rate of δ."""
    clamp_norm_factor: float = 4.0
    """‖δ‖ is clamped to this times the norm of the original hidden state."""
    nullspace_threshold: float = 2e-2
    """Eigenvalues of C below this span the null space of the preserved keys."""
    L2: float = 10.0
    """α: ridge on the projected normal equations (Eq. 12)."""
    accumulate_keys: bool = True
    """Add each edit's keys to K_p (sequential editing); False: every call is independent."""


class AlphaEdit(MEMIT):
    """MEMIT projected onto the null space of preserved knowledge."""

    name = "alphaedit"
    Hparams = AlphaEditHparams

    def __init__(self, hparams: AlphaEditHparams | None = None, **overrides) -> None:
        super().__init__(hparams, **overrides)
        self.projections: dict[int, Tensor] = {}
        """P per layer (d_in × d_in), for the model in ``self._owner``."""
        self.previous_keys: dict[int, Tensor] = {}
        """Σ K_p K_pᵀ per layer over the edits returned so far (float64)."""
        self._owner: tuple | None = None

    def reset(self) -> None:
        """Forget the keys of previous edits (and the projections)."""
        self.projections.clear()
        self.previous_keys.clear()
        self._owner = None

    def prepare(self, model: nn.Module, tokenizer, layers: list[int], covs: dict[int, Tensor]) -> None:
        owner = (id(model), model_name(model))
        if self._owner is not None and self._owner != owner:
            log.warning("AlphaEdit: a different model than before; forgetting the previous edits' keys")
            self.reset()
        self._owner = owner
        for layer in layers:
            if layer not in self.projections:
                self.projections[layer] = null_space_projection(covs[layer], self.hparams.nullspace_threshold)
                rank = int(torch.trace(self.projections[layer]).round())
                log.info("AlphaEdit: layer %d null space has dimension %d of %d", layer, rank, covs[layer].shape[0])
            if layer not in self.previous_keys:
                d = covs[layer].shape[0]
                self.previous_keys[layer] = torch.zeros(d, d, dtype=torch.float64, device=covs[layer].device)

    def solve(self, model: nn.Module, layer: int, K: Tensor, R: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
        P = self.projections[layer]
        eye = torch.eye(P.shape[0], dtype=P.dtype, device=P.device)
        A = P @ (K @ K.T + self.previous_keys[layer]) + self.hparams.L2 * eye
        right = torch.linalg.solve(A, P @ K).T  # (n, d_in) -> transposed below
        # ΔW = R (A⁻¹ P K)ᵀ: the paper's (A⁻¹ P K Rᵀ)ᵀ; P and A are not symmetric, keep the order
        return R, right.T

    def after_edit(self, model: nn.Module, tokenizer, requests, templates, layers: list[int]) -> None:
        if not self.hparams.accumulate_keys:
            return
        # the keys of this edit, measured with all its layers applied (as in the paper's code)
        keys, _ = subject_keys(model, tokenizer, requests, templates, layers)
        for layer in layers:
            K = keys[layer].double().T
            self.previous_keys[layer] += K @ K.T


def null_space_projection(C: Tensor, threshold: float) -> Tensor:
    """``P = Û Ûᵀ`` over the eigenvectors of ``C`` with eigenvalue < ``threshold`` (float64)."""
    eigvals, eigvecs = torch.linalg.eigh(C.double())
    U = eigvecs[:, eigvals < threshold]
    if U.shape[1] == 0:
        log.warning("AlphaEdit: no eigenvalue of C below %g (smallest %.3g): the projection is zero, "
                    "no edit can pass; lower the statistics' scale or raise nullspace_threshold",
                    threshold, float(eigvals.min()))
    return U @ U.T

"""MALMEN: MAssive Language Model Editing Network (Tan, Zhang and Fu, ICLR 2024, arXiv:2311.04661).

A MEND-style hypernetwork that edits many facts at once. For each edited linear module ``m``
(input size ``d_in``, output size ``d_out``) and a batch of edits:

1. **Cache** (:func:`edit_features`): one forward and backward of the frozen model per
   micro-batch of edits. At the answer positions ``P`` (the positions whose logits predict an
   answer token): the keys ``K (N, d_in)``, the module's input, and the value gradients
   ``G (N, d_out)``, the gradient of the loss at the module's output. ``N`` = answer tokens.
2. **Hypernetwork** (:class:`MALMENNet`, one per module shape, shared by the modules of that
   shape): ``z = [k; g]``, normalised by running statistics, goes through ``n_blocks`` residual
   blocks ``z <- z + scale_m ⊙ relu(z A B + b) + shift_m`` (``B = 0`` at init: the identity)
   and splits into ``(k̃, g̃)``.
3. **Per-token output change**: ``d_j = −lr_m (k_j · k̃_j) g̃_j`` (what MEND's rank-1 shift
   ``−lr_m g̃_j k̃_jᵀ`` does to the output at its own key), stacked into ``D (N, d_out)``.
4. **Least-squares aggregation** (:func:`ridge_matrix`): one shift for all edits,
   ``S = argmin_S Σ_j ‖Sᵀk_j − d_j‖² + e^{λ'_m} ‖S‖² = (KᵀK + e^{λ'_m} I)⁻¹ KᵀD``, and
   ``ΔW = Sᵀ`` (the (out, in) update) with a learned log-ridge ``λ'_m``. MEND sums the
   per-edit shifts instead, and many edits then cancel each other out.

Meta-training (:mod:`kedit.lightning.malmen`) keeps the language model and the hypernetwork
apart: ``S`` is computed without a graph, the LM's loss gives ``∂L/∂S`` in micro-batches, and
``∂L/∂S`` is carried back through the solve to the hypernetwork (:func:`solve_backward`).

Deviations from the official code (ChenmienTan/malmen), each for a reason:

* The cache loss is the sum over edits of each edit's mean answer NLL (as MEND's
  :func:`~kedit.editors.mend.gradient_inputs`), not the mean over the micro-batch's tokens:
  an edit's ``(k, g)`` do not depend on the other edits of its micro-batch, so DDP with R
  processes of B edits equals one process of R·B edits.
* The input statistics update only while training; a deployed editor's are frozen
  (the official ``cache()`` keeps updating them at every edit, so its inputs drift).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from kedit.data.encode import IGNORE, encode
from kedit.data.request import EditRequest
from kedit.editors.base import WeightDelta, base_identity
from kedit.editors.memit import _packed
from kedit.editors.mend import MEND, RunningNorm, _key, gradient_inputs, token_mask
from kedit.models import arch_of
from kedit.utils import chunks

log = logging.getLogger(__name__)


@dataclass
class MALMENHparams:
    """MALMEN hyperparameters; defaults follow the official configs (GPT-J: the last 6 MLP output projections)."""

    layers: list[int] | None = None
    """Blocks whose weights are edited; None: the last ``num_last_layers`` blocks."""
    num_last_layers: int = 6
    """With ``layers`` unset, edit this many of the last blocks."""
    weights: list[str] = field(default_factory=lambda: ["mlp_out"])
    """Which projections of each block to edit: "mlp_in", "mlp_out", "attn_out"."""
    rank: int = 1920
    """Rank of each residual block's A (d, r) and B (r, d)."""
    n_blocks: int = 2
    """Residual blocks of the hypernetwork."""
    edit_lr: float = 1e-6
    """Initial per-module step size lr_m of the output change d = −lr_m (k·k̃) g̃."""
    init_lam: float = 0.0
    """Initial per-module log-ridge λ' (the ridge is e^λ')."""
    meta_lr: float = 1e-5
    """Adam learning rate of the hypernetwork (lr_m and λ' included)."""
    loc_coef: float = 1.0
    """Weight of the locality loss KL(pre-edit ‖ post-edit) on unrelated prompts."""
    micro_batch: int = 32
    """Edits per forward/backward pass of the language model (cache, losses, editing)."""
    token_chunk: int = 1024
    """Token rows per pass of the hypernetwork (bounds its activation memory)."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- hypernetwork


class MALMENBlock(nn.Module):
    """``z + scale_m ⊙ relu(z A B + b) + shift_m``; ``B = 0``: the identity at initialization."""

    def __init__(self, dim: int, rank: int, n_modes: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(dim, rank))
        self.B = nn.Parameter(torch.zeros(rank, dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.ones(n_modes, dim))
        self.shift = nn.Parameter(torch.zeros(n_modes, dim))

    def forward(self, z: Tensor, mode: int) -> Tensor:
        # clamp, not relu (as the official code): at init z A B + b is exactly 0, where relu's gradient
        # is 0 and clamp's is 1; with relu, B and b would never leave 0
        return z + self.scale[mode] * (z @ self.A @ self.B + self.bias).clamp(min=0) + self.shift[mode]


class MALMENNet(nn.Module):
    """(k, g) of each edited weight's answer tokens -> the per-token output changes ``D`` (steps 2-3).

    ``dims[name] = (d_out, d_in)``. Weights of one shape share the normaliser and the blocks and
    are told apart by their index ("mode") among that shape's weights.
    """

    def __init__(self, hparams: MALMENHparams, dims: dict[str, tuple[int, int]]) -> None:
        super().__init__()
        self.hparams = hparams
        self.names = list(dims)
        self.dims = {n: (int(o), int(i)) for n, (o, i) in dims.items()}
        self.groups: dict[str, list[str]] = {}
        for n in self.names:
            self.groups.setdefault(self._group(n), []).append(n)
        self.norms = nn.ModuleDict({g: RunningNorm(sum(self.dims[m[0]])) for g, m in self.groups.items()})
        self.blocks = nn.ModuleDict({
            g: nn.ModuleList(MALMENBlock(sum(self.dims[m[0]]), hparams.rank, len(m)) for _ in range(hparams.n_blocks))
            for g, m in self.groups.items()})
        self.lr = nn.ParameterDict({_key(n): nn.Parameter(torch.tensor(float(hparams.edit_lr))) for n in self.names})
        self.lam = nn.ParameterDict({_key(n): nn.Parameter(torch.tensor(float(hparams.init_lam))) for n in self.names})

    def _group(self, name: str) -> str:
        d_out, d_in = self.dims[name]
        return f"{d_out}x{d_in}"

    @torch.no_grad()
    def update_stats(self, name: str, K: Tensor, G: Tensor) -> None:
        """Add one weight's token rows to its shape's running statistics (training only)."""
        self.norms[self._group(name)].update(torch.cat([K, G], -1))

    def output_change(self, name: str, K: Tensor, G: Tensor) -> Tensor:
        """``D (N, d_out)``: ``d_j = −lr_m (k_j · k̃_j) g̃_j``, over chunks of ``token_chunk`` rows."""
        group = self._group(name)
        mode, d_in = self.groups[group].index(name), K.shape[1]
        out = []
        for rows in chunks(range(K.shape[0]), self.hparams.token_chunk):
            k, g = K[rows.start:rows.stop], G[rows.start:rows.stop]
            z = self.norms[group](torch.cat([k, g], -1))
            for block in self.blocks[group]:
                z = block(z, mode)
            k_t, g_t = z[:, :d_in], z[:, d_in:]
            out.append(-self.lr[_key(name)] * (k * k_t).sum(-1, keepdim=True) * g_t)
        return torch.cat(out) if out else G.new_zeros(G.shape)

    def ridge(self, name: str) -> Tensor:
        """``e^{λ'_m}``, the ridge of the least-squares aggregation."""
        return self.lam[_key(name)].exp()


# --------------------------------------------------------------------------- least squares


def ridge_matrix(KtK: Tensor, ridge: Tensor | float) -> Tensor:
    """``A = KᵀK + ridge·I`` of step 4: ``S = A⁻¹KᵀD`` minimises ``Σ_j ‖Sᵀk_j − d_j‖² + ridge‖S‖²``.
    ``KᵀK`` is a sum over tokens, so DDP adds it over processes before the solve."""
    return KtK + ridge * torch.eye(KtK.shape[0], dtype=KtK.dtype, device=KtK.device)


def solve_backward(K: Tensor, A: Tensor, S: Tensor, grad_S: Tensor, ridge: Tensor) -> tuple[Tensor, Tensor]:
    """``(∂L/∂D, ∂L/∂λ')`` from ``∂L/∂S`` for ``S = A⁻¹KᵀD``, ``A = KᵀK + e^{λ'} I``:
    ``∂L/∂D = K A⁻¹ ∂L/∂S`` and ``∂L/∂λ' = −e^{λ'} ⟨A⁻¹ ∂L/∂S, S⟩``."""
    Mt = torch.linalg.solve(A, grad_S)
    return K @ Mt, -ridge * (Mt * S).sum()


# --------------------------------------------------------------------------- cache


def answer_rows(batch: dict[str, Tensor], seq2seq: bool) -> Tensor:
    """Which of the real tokens (:func:`~kedit.editors.mend.token_mask`) are answer positions:
    decoder-only, the positions whose logits predict an answer token; seq2seq, the decoder's
    answer tokens."""
    labels = batch["labels"]
    at = labels != IGNORE if seq2seq else F.pad(labels[:, 1:] != IGNORE, (0, 1))
    return at[token_mask(batch, seq2seq)]


def edit_features(model: nn.Module, tokenizer: PreTrainedTokenizerBase, names: Sequence[str], prompts: Sequence[str],
                  targets: Sequence[str], micro_batch: int, device: torch.device | str | None = None
                  ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Step 1: ``K`` and ``G`` (float32) at the answer positions of every edit, in order, for each
    weight in ``names``; one forward and backward per ``micro_batch`` edits. Writes no weight."""
    seq2seq = arch_of(model).encoder_decoder
    keys: dict[str, list[Tensor]] = {n: [] for n in names}
    grads: dict[str, list[Tensor]] = {n: [] for n in names}
    for rows in chunks(range(len(prompts)), micro_batch):
        batch = encode(tokenizer, list(prompts[rows.start:rows.stop]), list(targets[rows.start:rows.stop]),
                       seq2seq=seq2seq, device=device)
        u, d, _ = gradient_inputs(model, names, batch, seq2seq)
        keep = answer_rows(batch, seq2seq)
        for n in names:
            keys[n].append(u[n][keep].float())
            grads[n].append(d[n][keep].float())
    return {n: torch.cat(k) for n, k in keys.items()}, {n: torch.cat(g) for n, g in grads.items()}


# --------------------------------------------------------------------------- editor


class MALMEN(MEND):
    """Batch edits with a trained MALMEN hypernetwork: one :class:`WeightDelta` for all requests.

    ``kedit.load_editor(path)`` gives a trained MALMEN; ``MALMEN()`` alone is untrained (identity
    hypernetwork: per token a gradient-step output change, aggregated by least squares).
    Artifacts, base-model checks and :meth:`save` are MEND's.
    """

    name = "malmen"
    Hparams = MALMENHparams
    Net: ClassVar[type[nn.Module]] = MALMENNet

    def edit(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
             requests: Sequence[EditRequest]) -> WeightDelta:
        """Cache ``K, G`` over micro-batches, then per weight ``ΔW = Dᵀ K (KᵀK + e^{λ'} I)⁻¹`` (module docstring)."""
        net, device = self.ready(model)
        arch = arch_of(model)
        K, G = edit_features(model, tokenizer, net.names, [r.prompt for r in requests],
                             [r.target_new for r in requests], self.hparams.micro_batch, device)
        updates = {}
        with torch.no_grad():
            for name in net.names:
                D = net.output_change(name, K[name], G[name])
                A = ridge_matrix(K[name].T @ K[name], net.ridge(name))
                right = torch.linalg.solve(A, K[name].T)  # (d_in, N): A⁻¹Kᵀ
                updates[name] = arch.low_rank_factors(D.T, right)  # ΔW = Dᵀ (A⁻¹Kᵀ)ᵀ = Sᵀ
        n_tokens = K[net.names[0]].shape[0]
        info = {"editor": self.name, "n_requests": len(requests), "n_tokens": n_tokens}
        log.info("MALMEN: %d requests, %d answer tokens, %d weights", len(requests), n_tokens, len(net.names))
        return _packed(updates, base_identity(model, list(updates)), info)

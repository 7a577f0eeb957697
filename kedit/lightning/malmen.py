"""``MALMENModule``: meta-train MALMEN's hypernetwork with PyTorch Lightning (DDP-ready).

One training step edits the whole batch at once (:mod:`kedit.editors.malmen`), with the
language model and the hypernetwork kept apart, as in the paper:

1. cache ``K, G`` of the batch's edit prompts (micro-batches of ``micro_batch`` edits) and add
   them to the input statistics; without a graph, ``D`` per weight and the one shift
   ``S = (KᵀK + e^{λ'} I)⁻¹ KᵀD``;
2. with ``S`` a leaf and the weights ``W + Sᵀ`` swapped in (``functional_call``; nothing is
   written), per micro-batch: ``L = [NLL(target | paraphrase) + loc_coef · KL(p_W ‖ p_{W+Sᵀ})
   on the unrelated prompt's answer positions] / n``, and ``∂L/∂S`` accumulates;
3. back through the solve: ``∂L/∂D = K A⁻¹ ∂L/∂S`` and ``∂L/∂λ'``; the hypernetwork runs again
   with a graph (chunks of ``token_chunk`` rows) and the step returns the surrogate
   ``⟨∂L/∂D, D⟩ + (∂L/∂λ') λ'``, whose gradient is the meta-gradient ``∂L/∂θ``.

Only the LM's micro-batch and one hypernetwork chunk hold activations at any time.

DDP: the batch of one step is the union of all processes' batches and there is one ``S`` for
it. ``KᵀK``, ``KᵀD``, ``∂L/∂S`` and the loss are summed over processes, ``n`` is the global
number of edits, and each process's surrogate is scaled by the world size R (DDP averages the
gradients), so R processes with B edits each take the step of one process with R·B edits.
The input statistics are summed over processes too (:class:`~kedit.editors.mend.RunningNorm`).

Validation is batch editing: each validation batch is edited at once with its own ``S`` and
scored (edit success, paraphrase success, neighbour top-1 agreement), then discarded.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import MeanMetric

from kedit.data.encode import target_logits, target_logprobs
from kedit.editors.malmen import MALMEN, MALMENHparams, MALMENNet, edit_features, ridge_matrix, solve_backward
from kedit.editors.mend import _key, edited_weights, mean_nll, weight_dims
from kedit.lightning.common import HypernetModule
from kedit.utils import chunks, kl_divergence

log = logging.getLogger(__name__)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sum_over_processes(t: Tensor) -> Tensor:
    """``t`` summed over the DDP processes (in place); ``t`` itself in one process."""
    if _distributed():
        dist.all_reduce(t)
    return t


def answer_kl(pre_logits: Tensor, post_logits: Tensor, labels: Tensor, seq2seq: bool) -> Tensor:
    """Per example: mean over its answer positions of KL(pre ‖ post) between next-token distributions."""
    pre, _, mask = target_logits(pre_logits, labels, seq2seq)
    post, _, _ = target_logits(post_logits, labels, seq2seq)
    kl = kl_divergence(torch.log_softmax(pre.float(), -1), torch.log_softmax(post.float(), -1))
    return (kl * mask).sum(-1) / mask.sum(-1).clamp(min=1)


class MALMENModule(HypernetModule):
    """Meta-trains a MALMEN editor for one base model; see the module docstring."""

    editor_name = "malmen"
    artifact_prefix = "malmen."
    Hparams = MALMENHparams
    Editor = MALMEN

    def __init__(self, model: str = "smollm2-135m", editor: MALMENHparams | None = None,
                 dtype: str = "float32") -> None:
        """
        Args:
            model: Base model: an offline name (smollm2-135m), a HF folder / .gguf path, or a registered name (kedit.models.register; tests: tiny-<family>).
            editor: MALMEN hyperparameters (edited layers, hypernetwork rank, learning rate, micro-batches).
            dtype: Dtype of the frozen base model (float32, bfloat16).
        """
        super().__init__(model, editor, dtype)
        names = edited_weights(self.base, self.cfg)
        self.malmen = MALMENNet(self.cfg, weight_dims(self.base, names))
        self.metrics = torch.nn.ModuleDict({
            k: MeanMetric() for k in ("edit_success", "paraphrase_success", "locality", "gen_nll", "loc_kl")})

    @property
    def net(self) -> MALMENNet:
        return self.malmen

    def configure_optimizers(self):
        return torch.optim.Adam(self.malmen.parameters(), lr=self.cfg.meta_lr)

    # -- the steps of the module docstring
    def _features(self, batch: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return edit_features(self.base, self.tokenizer, self.malmen.names, batch["prompt"], batch["target"],
                             self.cfg.micro_batch, self.device)

    @torch.no_grad()
    def _shifts(self, K: dict[str, Tensor], G: dict[str, Tensor], over_processes: bool
                ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Per weight, ``S = A⁻¹KᵀD`` and ``A = KᵀK + e^{λ'} I``, the sums taken over all processes or this one's."""
        total = sum_over_processes if over_processes else (lambda t: t)
        S, A = {}, {}
        for name in self.malmen.names:
            D = self.malmen.output_change(name, K[name], G[name])
            A[name] = ridge_matrix(total(K[name].T @ K[name]), self.malmen.ridge(name))
            S[name] = torch.linalg.solve(A[name], total(K[name].T @ D))
        return S, A

    def _edited(self, S: dict[str, Tensor]) -> dict[str, Tensor]:
        """The edited weights ``W + Sᵀ`` in storage orientation (differentiable in ``S``)."""
        params = dict(self.base.named_parameters())
        return {n: params[n] + self.arch.as_out_in(s.T).to(params[n].dtype) for n, s in S.items()}

    def _losses(self, batch: dict[str, Any], rows: range, edited: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Per edit of ``rows``: NLL of the target on the paraphrase, and the locality KL."""
        take = lambda key: [batch[key][i] for i in rows]  # noqa: E731
        gen = self._encode(take("equiv"), take("target"))
        nll = mean_nll(self._forward(edited, gen), gen["labels"], self.seq2seq)
        loc = self._encode(take("loc_prompt"), take("loc_answer"))
        with torch.no_grad():
            pre = self._forward(None, loc)
        return nll, answer_kl(pre, self._forward(edited, loc), loc["labels"], self.seq2seq)

    def meta_step(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """Steps 1-3 of the module docstring on one batch: (surrogate, gen NLL, locality KL), the
        last two averaged over the edits of all processes. The surrogate's gradient is the meta-gradient."""
        net, n_local = self.malmen, len(batch["prompt"])
        n = int(sum_over_processes(torch.tensor(float(n_local), device=self.device)).item())
        K, G = self._features(batch)
        if self.training:  # statistics of this batch first (all processes), then D
            for name in net.names:
                net.update_stats(name, K[name], G[name])
        S, A = self._shifts(K, G, over_processes=True)
        S = {name: s.requires_grad_(True) for name, s in S.items()}
        # step 2: ∂L/∂S through the language model, one micro-batch at a time
        grad_S = {name: torch.zeros_like(s) for name, s in S.items()}
        totals = torch.zeros(2, device=self.device)
        for rows in chunks(range(n_local), self.cfg.micro_batch):
            nll, kl = self._losses(batch, rows, self._edited(S))
            loss = (nll.sum() + self.cfg.loc_coef * kl.sum()) / n
            for name, g in zip(S, torch.autograd.grad(loss, list(S.values()))):
                grad_S[name] += g
            totals += torch.stack([nll.detach().sum(), kl.detach().sum()]) / n
        # step 3: back through the solve to the hypernetwork
        world = dist.get_world_size() if _distributed() else 1
        surrogate = torch.zeros((), device=self.device)
        for name in net.names:
            dD, dlam = solve_backward(K[name], A[name], S[name].detach(), sum_over_processes(grad_S[name]),
                                      net.ridge(name).detach())
            D = net.output_change(name, K[name], G[name])
            surrogate = surrogate + world * (dD * D).sum() + dlam * net.lam[_key(name)]
        gen_nll, loc_kl = sum_over_processes(totals)
        return surrogate, gen_nll, loc_kl

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        surrogate, gen_nll, loc_kl = self.meta_step(batch)
        n = len(batch["prompt"])
        self.log_speed()
        self.log("train/loss", gen_nll + self.cfg.loc_coef * loc_kl, batch_size=n, prog_bar=True)
        self.log("train/gen_nll", gen_nll, batch_size=n, prog_bar=True)
        self.log("train/loc_kl", loc_kl, batch_size=n, prog_bar=True)
        self.log("train/lr_mean", torch.stack([p.detach() for p in self.malmen.lr.values()]).mean(), batch_size=n)
        self.log("train/ridge_mean", torch.stack([p.detach().exp() for p in self.malmen.lam.values()]).mean(),
                 batch_size=n)
        return surrogate

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # the cache needs the base model's gradient, also when Lightning validates in inference mode
        with torch.inference_mode(False), torch.enable_grad():
            K, G = self._features(batch)
        S, _ = self._shifts(K, G, over_processes=False)  # each process edits its own validation batch
        with torch.no_grad():
            for rows in chunks(range(len(batch["prompt"])), self.cfg.micro_batch):
                self._score(batch, rows, self._edited(S))

    def _score(self, batch: dict[str, Any], rows: range, edited: dict[str, Tensor]) -> None:
        """Edit success (prompt), paraphrase success and NLL, neighbour agreement and KL of ``rows`` under one edit."""
        take = lambda key: [batch[key][i] for i in rows]  # noqa: E731
        k = len(rows)
        both = self._encode(take("prompt") + take("equiv"), take("target") * 2)
        logits = self._forward(edited, both)
        _, correct, length = target_logprobs(logits, both["labels"], self.seq2seq)
        ok = (correct == length).float()
        self.metrics["edit_success"].update(ok[:k])
        self.metrics["paraphrase_success"].update(ok[k:])
        self.metrics["gen_nll"].update(mean_nll(logits[k:], both["labels"][k:], self.seq2seq))
        loc = self._encode(take("loc_prompt"), take("loc_answer"))
        pre_logits, post_logits = self._forward(None, loc), self._forward(edited, loc)
        self.metrics["loc_kl"].update(answer_kl(pre_logits, post_logits, loc["labels"], self.seq2seq))
        # teacher-forced neighbour agreement: the answer tokens keep their pre-edit argmax
        pre, _, mask = target_logits(pre_logits, loc["labels"], self.seq2seq)
        post, _, _ = target_logits(post_logits, loc["labels"], self.seq2seq)
        agree = ((pre.argmax(-1) == post.argmax(-1)) & mask).sum(-1) / mask.sum(-1).clamp(min=1)
        self.metrics["locality"].update(agree.float())

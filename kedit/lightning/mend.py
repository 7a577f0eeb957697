"""``MENDModule``: train MEND's gradient hypernetwork with PyTorch Lightning (DDP-ready).

Per training example i (edit prompt x_e, target y_e, equivalent prompt x_e', locality prompt x_loc):

1. one forward + backward of the frozen base model on (x_e, y_e) gives (u, δ) at each token;
2. the hypernetwork turns them into ΔW_i (Eq. 5), differentiably;
3. with ``torch.func.functional_call`` and W + ΔW_i swapped in (weights are never written):
   L_i = c_edit · NLL(y_e | x_e', W + ΔW_i) + c_loc · KL(p_W(· | x_loc) ‖ p_{W+ΔW_i}(· | x_loc)).

The KL is the mean over the tokens of every locality prompt of the example: its own, and in
training its ``neighbours`` same-relation neighbours (:class:`~kedit.lightning.data.EditDataModule`).

The loss is the mean over the batch, so DDP's gradient average over R ranks of batch B is
the update of one process with batch R·B. The base model is frozen, outside the optimizer
and outside every checkpoint (only the hypernetwork, its normalizer statistics, the typed
hparams and the base identity are saved).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor
from torchmetrics import MeanMetric

from kedit.data.encode import target_logits, target_logprobs
from kedit.editors.mend import MEND, MENDHparams, MENDNet, edited_weights, gradient_inputs, mean_nll, weight_dims
from kedit.lightning.common import HypernetModule
from kedit.utils import kl_divergence

log = logging.getLogger(__name__)


def locality_kl(pre_logits: Tensor, post_logits: Tensor, mask: Tensor) -> Tensor:
    """Mean over real positions of KL(pre ‖ post) between next-token distributions."""
    kl = kl_divergence(torch.log_softmax(pre_logits.float(), -1), torch.log_softmax(post_logits.float(), -1))
    return (kl * mask).sum() / mask.sum().clamp(min=1)


class MENDModule(HypernetModule):
    """Trains a MEND editor for one base model; see the module docstring for the objective."""

    editor_name = "mend"
    artifact_prefix = "mend."
    Hparams = MENDHparams
    Editor = MEND
    USES_NEIGHBOURS = True  # the locality KL covers them (EditDataModule(neighbours=N))

    def __init__(self, model: str = "smollm2-135m", editor: MENDHparams | None = None,
                 dtype: str = "float32") -> None:
        """
        Args:
            model: Base model: an offline name (smollm2-135m), a HF folder / .gguf path, or a registered name (kedit.models.register; tests: tiny-<family>).
            editor: MEND hyperparameters (edited layers, hypernetwork rank, learning rates, loss weights).
            dtype: Dtype of the frozen base model (float32, bfloat16).
        """
        super().__init__(model, editor, dtype)
        names = edited_weights(self.base, self.cfg)
        self.mend = MENDNet(self.cfg, weight_dims(self.base, names))
        self.metrics = torch.nn.ModuleDict({
            k: MeanMetric() for k in ("edit_success", "paraphrase_success", "locality", "edit_nll", "loc_kl")
        })

    @property
    def net(self) -> MENDNet:
        return self.mend

    # -- optimization
    def configure_optimizers(self):
        alphas = list(self.mend.alpha.parameters())
        ids = {id(p) for p in alphas}
        rest = [p for p in self.mend.parameters() if id(p) not in ids]
        return torch.optim.Adam([{"params": rest, "lr": self.cfg.lr, "name": "hypernetwork"},
                                 {"params": alphas, "lr": self.cfg.lr_lr, "name": "alpha"}])

    def _loc_mask(self, loc: dict[str, Tensor]) -> Tensor:
        from kedit.editors.mend import token_mask

        return token_mask(loc, self.seq2seq)

    def _step(self, batch: dict[str, Any], evaluate: bool) -> dict[str, Tensor]:
        n = len(batch["prompt"])
        edit = self._encode(batch["prompt"], batch["target"])
        u, d, example = gradient_inputs(self.base, self.mend.names, edit, self.seq2seq)
        deltas = self.mend(u, d, example, n)  # differentiable in the hypernetwork
        # each example's locality prompts: its own, then (training) its same-relation neighbours
        nb = [[]] * n if evaluate else [list(zip(p, a)) for p, a in zip(batch.get("nb_prompts", [[]] * n),
                                                                          batch.get("nb_answers", [[]] * n))]
        loc_pairs = [[(batch["loc_prompt"][i], batch["loc_answer"][i])] + nb[i] for i in range(n)]
        start = [0]
        for pairs in loc_pairs:
            start.append(start[-1] + len(pairs))
        loc = self._encode([p for pairs in loc_pairs for p, _ in pairs], [a for pairs in loc_pairs for _, a in pairs])
        with torch.no_grad():
            pre_loc = self._forward(None, loc)
        loc_mask = self._loc_mask(loc)
        params = dict(self.base.named_parameters())
        losses, nlls, kls = [], [], []
        es, ps, locs = [], [], []
        for i in range(n):
            edited = {}
            for name, (left, right) in deltas[i].items():
                left, right = self.arch.low_rank_factors(left, right)
                edited[name] = params[name] + (left @ right.T).to(params[name].dtype)
            prompts = ([batch["prompt"][i]] if self.cfg.edit_on_prompt or evaluate else []) + [batch["equiv"][i]]
            k = len(prompts)
            # one forward per example: its edit/equivalent prompts and its locality prompts
            both = self._encode(prompts + [p for p, _ in loc_pairs[i]],
                                [batch["target"][i]] * k + [a for _, a in loc_pairs[i]])
            logits = self._forward(edited, both)
            eq_logits, eq_labels = logits[:k], both["labels"][:k]
            nll = mean_nll(eq_logits, eq_labels, self.seq2seq).mean()
            width = min(logits.shape[1], pre_loc.shape[1])
            rows = slice(start[i], start[i + 1])
            post_i, pre_i = logits[k:, :width], pre_loc[rows, :width]
            mask_i = loc_mask[rows, :width]
            kl = locality_kl(pre_i, post_i, mask_i)
            losses.append(self.cfg.c_edit * nll + self.cfg.c_loc * kl)
            nlls.append(nll.detach())
            kls.append(kl.detach())
            with torch.no_grad():
                _, correct, length = target_logprobs(eq_logits, eq_labels, self.seq2seq)
                ok = (correct == length).float()
                if evaluate:
                    es.append(ok[0])
                    ps.append(ok[-1])
                    # teacher-forced locality: the loc answer tokens keep their pre-edit argmax
                    pre_l, _, m = target_logits(pre_i, loc["labels"][rows, :width], self.seq2seq)
                    post_l, _, _ = target_logits(post_i, loc["labels"][rows, :width], self.seq2seq)
                    agree = ((pre_l.argmax(-1) == post_l.argmax(-1)) & m).sum() / m.sum().clamp(min=1)
                    locs.append(agree.float())
                else:
                    es.append(ok.mean())
        out = {"loss": torch.stack(losses).mean(), "edit_nll": torch.stack(nlls).mean(),
               "loc_kl": torch.stack(kls).mean(), "edit_success": torch.stack(es)}
        if evaluate:
            out["paraphrase_success"] = torch.stack(ps)
            out["locality"] = torch.stack(locs)
        return out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        out = self._step(batch, evaluate=False)
        self.log_speed()
        n = len(batch["prompt"])
        self.log("train/loss", out["loss"], batch_size=n, prog_bar=True)
        self.log("train/edit_nll", out["edit_nll"], batch_size=n, prog_bar=True)
        self.log("train/loc_kl", out["loc_kl"], batch_size=n, prog_bar=True)
        self.log("train/edit_success", out["edit_success"].mean(), batch_size=n)
        alphas = torch.stack([a.detach() for a in self.mend.alpha.values()])
        self.log("train/alpha_mean", alphas.mean(), batch_size=n)
        return out["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # the edit needs the base model's gradient, also when Lightning validates in inference mode
        with torch.inference_mode(False), torch.enable_grad():
            out = self._step(batch, evaluate=True)
        for key in ("edit_success", "paraphrase_success", "locality"):
            self.metrics[key].update(out[key])
        self.metrics["edit_nll"].update(out["edit_nll"], weight=len(batch["prompt"]))
        self.metrics["loc_kl"].update(out["loc_kl"], weight=len(batch["prompt"]))

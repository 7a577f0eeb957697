"""``MENDModule``: train MEND's gradient hypernetwork with PyTorch Lightning (DDP-ready).

Per training example i (edit prompt x_e, target y_e, equivalent prompt x_e', locality prompt x_loc):

1. one forward + backward of the frozen base model on (x_e, y_e) gives (u, δ) at each token;
2. the hypernetwork turns them into ΔW_i (Eq. 5), differentiably;
3. with ``torch.func.functional_call`` and W + ΔW_i swapped in (weights are never written):
   L_i = c_edit · NLL(y_e | x_e', W + ΔW_i) + c_loc · KL(p_W(· | x_loc) ‖ p_{W+ΔW_i}(· | x_loc)).

The loss is the mean over the batch, so DDP's gradient average over R ranks of batch B is
the update of one process with batch R·B. The base model is frozen, outside the optimizer
and outside every checkpoint (only the hypernetwork, its normalizer statistics, the typed
hparams and the base identity are saved).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor
from torchmetrics import MeanMetric

from kedit.data.encode import encode, model_inputs, target_logits, target_logprobs
from kedit.editors.mend import MEND, MENDHparams, MENDNet, edited_weights, gradient_inputs, mean_nll, weight_dims
from kedit.lightning.common import EditorCheckpointMixin, load_base
from kedit.models import arch_of
from kedit.utils import kl_divergence, peak_memory_mb

log = logging.getLogger(__name__)


def locality_kl(pre_logits: Tensor, post_logits: Tensor, mask: Tensor) -> Tensor:
    """Mean over real positions of KL(pre ‖ post) between next-token distributions."""
    kl = kl_divergence(torch.log_softmax(pre_logits.float(), -1), torch.log_softmax(post_logits.float(), -1))
    return (kl * mask).sum() / mask.sum().clamp(min=1)


class MENDModule(EditorCheckpointMixin, LightningModule):
    """Trains a MEND editor for one base model; see the module docstring for the objective."""

    editor_name = "mend"
    artifact_prefix = "mend."

    def __init__(self, model: str = "smollm2-135m", editor: MENDHparams | None = None,
                 dtype: str = "float32") -> None:
        """
        Args:
            model: Base model: an offline name (smollm2-135m), a HF folder / .gguf path, or a registered name (kedit.models.register; tests: tiny-<family>).
            editor: MEND hyperparameters (edited layers, hypernetwork rank, learning rates, loss weights).
            dtype: Dtype of the frozen base model (float32, bfloat16).
        """
        super().__init__()
        if isinstance(editor, dict):  # from a checkpoint's hparams
            editor = MENDHparams(**editor)
        self.cfg = editor or MENDHparams()
        self.save_hyperparameters({"model": model, "editor": self.cfg.as_dict(), "dtype": dtype})
        self.base, self.tokenizer = load_base(model, dtype)
        self.base.requires_grad_(False).eval()
        self.arch = arch_of(self.base)
        self.seq2seq = self.arch.encoder_decoder
        names = edited_weights(self.base, self.cfg)
        self.mend = MENDNet(self.cfg, weight_dims(self.base, names))
        self._identity: dict[str, Any] | None = None
        self.metrics = torch.nn.ModuleDict({
            k: MeanMetric() for k in ("edit_success", "paraphrase_success", "locality", "edit_nll", "loc_kl")
        })

    # keep the frozen base in eval mode (no dropout) whatever Lightning asks
    def train(self, mode: bool = True):
        super().train(mode)
        self.base.eval()
        return self

    # -- checkpoint content (EditorCheckpointMixin)
    def editor_hparams(self) -> dict[str, Any]:
        return self.cfg.as_dict()

    def base_identity(self) -> dict[str, Any]:
        if self._identity is None:
            from kedit.checkpoint import base_model_identity

            self._identity = base_model_identity(self.base)
            params = dict(self.base.named_parameters())
            self._identity["shapes"] = {n: list(params[n].shape) for n in self.mend.names}
        return self._identity

    def artifact_extra(self) -> dict[str, Any]:
        return {**self.as_editor().artifact_state()[1], "model": self.hparams["model"]}

    def as_editor(self) -> MEND:
        """The current hypernetwork as a :class:`MEND` editor (shares its weights)."""
        return MEND(self.cfg, net=self.mend, base=self.base_identity())

    def export_editor(self, path: str | Path) -> Path:
        """Write the trained MEND as a ``kedit.load_editor`` artifact (:meth:`MEND.save`)."""
        return self.as_editor().save(path, extra={"model": self.hparams["model"]})

    # -- optimization
    def configure_optimizers(self):
        alphas = list(self.mend.alpha.parameters())
        ids = {id(p) for p in alphas}
        rest = [p for p in self.mend.parameters() if id(p) not in ids]
        return torch.optim.Adam([{"params": rest, "lr": self.cfg.lr, "name": "hypernetwork"},
                                 {"params": alphas, "lr": self.cfg.lr_lr, "name": "alpha"}])

    def _encode(self, prompts: list[str], targets: list[str]) -> dict[str, Tensor]:
        return encode(self.tokenizer, prompts, targets, seq2seq=self.seq2seq, device=self.device)

    def _forward(self, params: dict[str, Tensor] | None, batch: dict[str, Tensor]):
        if params is None:
            return self.base(**model_inputs(batch)).logits
        return torch.func.functional_call(self.base, params, (), model_inputs(batch)).logits

    def _loc_mask(self, loc: dict[str, Tensor]) -> Tensor:
        from kedit.editors.mend import token_mask

        return token_mask(loc, self.seq2seq)

    def _step(self, batch: dict[str, Any], evaluate: bool) -> dict[str, Tensor]:
        n = len(batch["prompt"])
        edit = self._encode(batch["prompt"], batch["target"])
        u, d, example = gradient_inputs(self.base, self.mend.names, edit, self.seq2seq)
        deltas = self.mend(u, d, example, n)  # differentiable in the hypernetwork
        loc = self._encode(batch["loc_prompt"], batch["loc_answer"])
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
            # one forward per example: its edit/equivalent prompts and its locality prompt
            both = self._encode(prompts + [batch["loc_prompt"][i]],
                                [batch["target"][i]] * k + [batch["loc_answer"][i]])
            logits = self._forward(edited, both)
            eq_logits, eq_labels = logits[:k], both["labels"][:k]
            nll = mean_nll(eq_logits, eq_labels, self.seq2seq).mean()
            width = min(logits.shape[1], pre_loc.shape[1])
            post_i, pre_i = logits[k:, :width], pre_loc[i:i + 1, :width]
            mask_i = loc_mask[i:i + 1, :width]
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
                    pre_l, _, m = target_logits(pre_i, loc["labels"][i:i + 1, :width], self.seq2seq)
                    post_l, _, _ = target_logits(post_i, loc["labels"][i:i + 1, :width], self.seq2seq)
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

    def on_train_start(self) -> None:
        self._t0, self._step0 = time.perf_counter(), self.global_step

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        out = self._step(batch, evaluate=False)
        steps = self.global_step - getattr(self, "_step0", 0) + 1
        elapsed = time.perf_counter() - getattr(self, "_t0", time.perf_counter())
        self.log("perf/steps_per_s", steps / max(elapsed, 1e-9), batch_size=1)
        self.log("perf/peak_mem_mb", peak_memory_mb(self.device), batch_size=1)
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

    def on_validation_epoch_end(self) -> None:
        for key, metric in self.metrics.items():  # torchmetrics reduce across DDP ranks
            self.log(f"val/{key}", metric.compute(), prog_bar=key in ("edit_success", "locality"))
            metric.reset()

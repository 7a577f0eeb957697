"""``SERACModule``: trains SERAC's scope classifier and counterfactual model (Mitchell et al., 2022).

    python -m kedit.train fit --config configs/serac/smollm2-counterfact.yaml --trainer trainers/cpu.yaml

One step on a batch of B edits from :class:`~kedit.lightning.data.EditDataModule`
(edit prompt, target, a paraphrase ``equiv``, a locality prompt ``loc_prompt``):

* **scope classifier** (binary cross-entropy, positives and negatives weighted equally):
  descriptor z_i against the 3B inputs [prompts; paraphrases; locality prompts]; positives
  are (z_i, prompt_i) and (z_i, equiv_i); every other pair is a negative: the record's own
  locality prompt (a hard negative: same relation, another subject) and the other edits'
  inputs. The embedding classifier scores all 3B x B pairs from 4B encoder passes; the
  cross-encoder scores 5B pairs (positives, the locality prompt, the next edit's inputs).
  Inputs get an answer appended with probability ``answer_augment``, since teacher-forced
  scoring shows the router "prompt + answer".
* **counterfactual model**: NLL of target_i after ``prefix(z_i) + x`` for x in {prompt_i,
  equiv_i}, through a low-rank update ``W + left @ right.T`` of the frozen LM swapped in with
  ``functional_call`` (weights are never written; DDP sees a plain graph).

Checkpoints hold only the trained tensors (classifier layers marked trainable, low-rank
factors); ``export_editor`` writes the artifact that ``kedit.load_editor`` reads.
"""

from __future__ import annotations

import logging
import math
import random
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.func import functional_call

from kedit.data.encode import IGNORE, target_ids
from kedit.editors.serac import SERAC, ScopeClassifier, SERACHparams, cf_prefix, descriptor_of
from kedit.lightning.common import EditorCheckpointMixin, load_base, warn_unused_neighbours
from kedit.models import arch_of
from kedit.utils import pad_id, peak_memory_mb, peak_rss_mb

log = logging.getLogger(__name__)


@dataclass
class SERACTraining:
    """What SERACModule trains and how."""

    train_classifier: bool = True
    """Fine-tune the scope classifier."""
    train_counterfactual: bool = True
    """Fine-tune the counterfactual LM (low-rank update)."""
    classifier_train_layers: int = 3
    """Top encoder layers of the classifier backbone to fine-tune (-1: all but the word embeddings)."""
    lora_rank: int = 8
    """Rank of the counterfactual LM's update per weight."""
    lora_modules: list[str] = field(default_factory=list)
    """Modules within each block that get the update (empty: the Arch's attention output and MLP projections)."""
    lr: float = 5e-5
    """Learning rate of the classifier."""
    cf_lr: float = 1e-3
    """Learning rate of the counterfactual update."""
    cls_coef: float = 1.0
    """Weight of the classifier loss."""
    cf_coef: float = 1.0
    """Weight of the counterfactual NLL."""
    answer_augment: float = 0.5
    """Probability of appending an answer to a classifier input (teacher-forced inputs contain one)."""
    seed: int = 0
    """Seed of the answer augmentation and the low-rank initialization."""
    init_counterfactual_from: str | None = None
    """Start the counterfactual update from a SERAC artifact's (staged training, e.g. with train_counterfactual: false)."""


class LowRankDelta(nn.Module):
    """``W[name] + left[name] @ right[name].T`` for named weights (storage orientation)."""

    def __init__(self, shapes: dict[str, tuple[int, int]], rank: int, seed: int = 0) -> None:
        super().__init__()
        self.names = sorted(shapes)
        self.left, self.right = nn.ParameterDict(), nn.ParameterDict()
        gen = torch.Generator().manual_seed(seed)
        for name in self.names:
            rows, cols = shapes[name]
            key = name.replace(".", "/")
            # LoRA init: the update starts at zero (left = 0), right ~ N(0, 1/cols)
            self.left[key] = nn.Parameter(torch.zeros(rows, rank))
            self.right[key] = nn.Parameter(torch.randn(cols, rank, generator=gen) / math.sqrt(cols))

    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        return {n: (self.left[n.replace(".", "/")], self.right[n.replace(".", "/")]) for n in self.names}

    def edited(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        return {n: params[n] + left @ right.T for n, (left, right) in self.factors().items()}


def _layer_index_of(name: str) -> int | None:
    m = re.search(r"\.layers?\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def freeze_classifier(clf: ScopeClassifier, top_layers: int) -> None:
    """Trainable: the top ``top_layers`` encoder layers (-1: all but word embeddings) and the head."""
    if clf.encoder is None:
        return
    names = [n for n, _ in clf.encoder.named_parameters()]
    layers = [i for i in (_layer_index_of(n) for n in names) if i is not None]
    n_layers = max(layers) + 1 if layers else 0
    for n, p in clf.encoder.named_parameters():
        i = _layer_index_of(n)
        if top_layers < 0:
            p.requires_grad_("word_embeddings" not in n)
        else:
            p.requires_grad_(i is not None and i >= n_layers - top_layers)


class SERACModule(EditorCheckpointMixin, LightningModule):
    """Trains SERAC for one counterfactual LM; see the module docstring for the objective."""

    editor_name = "serac"
    artifact_prefix = "editor."
    export_dtype = torch.float16
    _BASE = "base."

    def __init__(self, editor: SERACHparams | None = None, training: SERACTraining | None = None,
                 dtype: str = "float32") -> None:
        """
        Args:
            editor: SERAC hyperparameters (classifier backbone and kind, counterfactual LM, templates).
            training: What is trained and how (layers, rank, learning rates, loss weights).
            dtype: Dtype of the frozen counterfactual LM (float32, bfloat16).
        """
        super().__init__()
        if isinstance(editor, dict):
            editor = SERACHparams(**editor)
        if isinstance(training, dict):
            training = SERACTraining(**training)
        self.cfg = editor or SERACHparams()
        self.train_cfg = training or SERACTraining()
        if self.cfg.counterfactual == "base":
            raise ValueError("training needs a counterfactual LM name (e.g. smollm2-135m), not 'base'")
        # _class_path: LightningCLI reads it back when resuming with --ckpt_path
        self.save_hyperparameters({"editor": asdict(self.cfg), "training": asdict(self.train_cfg), "dtype": dtype,
                                   "_class_path": f"{type(self).__module__}.{type(self).__qualname__}"})
        self.base, self.tokenizer = load_base(self.cfg.counterfactual, dtype)
        self.base.requires_grad_(False).eval()
        self.editor = nn.Module()
        self.editor.classifier = ScopeClassifier(self.cfg.classifier, self.cfg.classifier_kind,
                                                 self.cfg.classifier_max_length)
        freeze_classifier(self.editor.classifier, self.train_cfg.classifier_train_layers)
        self.editor.classifier.train()  # dropout while fine-tuning, as usual
        if not self.train_cfg.train_classifier:
            self.editor.classifier.requires_grad_(False)
        self.editor.counterfactual = LowRankDelta(self._delta_shapes(), self.train_cfg.lora_rank,
                                                  self.train_cfg.seed)
        if self.train_cfg.init_counterfactual_from:
            self.load_counterfactual_from(self.train_cfg.init_counterfactual_from)
        if not self.train_cfg.train_counterfactual:
            self.editor.counterfactual.requires_grad_(False)
        self._rng = random.Random(self.train_cfg.seed)
        self._identity: dict[str, Any] | None = None

    @torch.no_grad()
    def load_counterfactual_from(self, path: str) -> None:
        """Copy the low-rank counterfactual update of a SERAC artifact into this module."""
        from kedit.checkpoint import check_base_identity, load_artifact

        tensors, meta = load_artifact(path)
        if meta.get("editor") != "serac":
            raise ValueError(f"{path} is a {meta.get('editor')!r} artifact, not a SERAC one")
        check_base_identity(meta.get("base"), self.base, what="SERAC counterfactual update")
        names = meta.get("extra", {}).get("counterfactual_delta", [])
        if sorted(names) != self.editor.counterfactual.names:
            raise ValueError(f"{path}: its counterfactual update covers {len(names)} weights, this config "
                             f"{len(self.editor.counterfactual.names)}; use the same lora_modules")
        for name, (left, right) in self.editor.counterfactual.factors().items():
            for side, p in (("left", left), ("right", right)):
                t = tensors[f"counterfactual.{name}.{side}"]
                if t.shape != p.shape:
                    raise ValueError(f"{path}: counterfactual.{name}.{side} has shape {tuple(t.shape)}, "
                                     f"expected {tuple(p.shape)} (lora_rank?)")
                p.copy_(t.to(p.dtype))
        log.info("counterfactual update initialized from %s (%d weights)", path, len(names))

    def _delta_shapes(self) -> dict[str, tuple[int, int]]:
        arch = arch_of(self.base)
        rel = self.train_cfg.lora_modules or [arch.attn_out, *arch.mlp_in, arch.mlp_out]
        params = dict(self.base.named_parameters())
        shapes = {}
        for layer in range(arch.num_layers(self.base)):
            for m in rel:
                name = f"{arch.block(layer)}.{m}.weight"
                if name in params:
                    shapes[name] = tuple(params[name].shape)
        if not shapes:
            raise ValueError(f"no weights match lora_modules={rel} in {type(self.base).__name__}")
        return shapes

    def train(self, mode: bool = True):
        super().train(mode)
        self.base.eval()
        return self

    # -- checkpoint content (EditorCheckpointMixin): trained tensors only, artifact key names
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        sd = super().state_dict(*args, **kwargs)
        out = {}
        trainable = {f"editor.classifier.{n}" for n, p in self.editor.classifier.named_parameters()
                     if p.requires_grad or not self._frozen_backbone(n)}
        for k, v in sd.items():
            if k.startswith("editor.classifier.") and k not in trainable:
                continue
            m = re.match(r"editor\.counterfactual\.(left|right)\.(.+)$", k)
            if m:
                k = f"editor.counterfactual.{m.group(2).replace('/', '.')}.{m.group(1)}"
            out[k] = v
        return out

    def _frozen_backbone(self, name: str) -> bool:
        return name.startswith("encoder.")

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False):
        renamed = {}
        for k, v in state_dict.items():
            m = re.match(r"editor\.counterfactual\.(.+)\.(left|right)$", k)
            renamed[f"editor.counterfactual.{m.group(2)}.{m.group(1).replace('.', '/')}" if m else k] = v
        result = nn.Module.load_state_dict(self, renamed, strict=False, assign=assign)
        expected = set(self.state_dict())
        missing = [k for k in expected if k not in state_dict]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"SERACModule: checkpoint does not fit: missing {missing[:5]}, "
                               f"unexpected {result.unexpected_keys[:5]}")
        return result

    def editor_hparams(self) -> dict[str, Any]:
        return {**asdict(self.cfg), "trained": True}

    def base_identity(self) -> dict[str, Any]:
        if self._identity is None:
            from kedit.checkpoint import base_model_identity

            self._identity = base_model_identity(self.base, self.editor.counterfactual.names)
        return self._identity

    def artifact_extra(self) -> dict[str, Any]:
        clf = self.editor.classifier
        trainable = [n for n in self.state_dict() if n.startswith("editor.classifier.")]
        return {"classifier_trainable": [n[len("editor.classifier."):] for n in trainable],
                "classifier_frozen_hash": clf.frozen_identity({n[len("editor.classifier."):] for n in trainable}),
                "counterfactual_delta": self.editor.counterfactual.names}

    def as_editor(self) -> SERAC:
        """A SERAC editor with the current classifier and (merged copy of the) counterfactual LM."""
        import copy

        from kedit.editors.serac import merge_low_rank

        ed = SERAC(SERACHparams(**self.editor_hparams()))
        ed.classifier = copy.deepcopy(self.editor.classifier).eval().requires_grad_(False)
        ed.cf_model = copy.deepcopy(self.base).eval()
        ed.cf_tokenizer = self.tokenizer
        ed.cf_delta = {n: (left.detach().clone(), right.detach().clone())
                       for n, (left, right) in self.editor.counterfactual.factors().items()}
        merge_low_rank(ed.cf_model, ed.cf_delta)
        return ed

    # -- optimization
    def configure_optimizers(self):
        groups = []
        clf = [p for p in self.editor.classifier.parameters() if p.requires_grad]
        cf = [p for p in self.editor.counterfactual.parameters() if p.requires_grad]
        if clf:
            groups.append({"params": clf, "lr": self.train_cfg.lr})
        if cf:
            groups.append({"params": cf, "lr": self.train_cfg.cf_lr})
        if not groups:
            raise ValueError("SERACModule: nothing to train (train_classifier and train_counterfactual are false)")
        return torch.optim.AdamW(groups, weight_decay=0.0)

    # -- losses
    def _augment(self, texts: list[str], answers: list[str]) -> list[str]:
        p = self.train_cfg.answer_augment if self.training else 0.0
        return [f"{t} {a}" if self._rng.random() < p else t for t, a in zip(texts, answers)]

    def classifier_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        clf = self.editor.classifier
        n = len(batch["prompt"])
        desc = [descriptor_of(self.cfg, p, t) for p, t in zip(batch["prompt"], batch["target"])]
        prompts = self._augment(batch["prompt"], batch["target"])
        equivs = self._augment(batch["equiv"], batch["target"])
        locs = self._augment(batch["loc_prompt"], batch["loc_answer"])
        if self.cfg.classifier_kind == "embedding":
            e_d = clf.embed(desc)  # (B, d)
            e_x = clf.embed(prompts + equivs + locs)  # (3B, d)
            logits = clf.sim_logits(e_d, e_x)  # (B, 3B)
            labels = torch.zeros_like(logits)
            idx = torch.arange(n, device=logits.device)
            labels[idx, idx] = 1.0
            labels[idx, idx + n] = 1.0
        else:
            nxt = [(i + 1) % n for i in range(n)]
            d = desc * 5
            x = prompts + equivs + locs + [prompts[j] for j in nxt] + [equivs[j] for j in nxt]
            logits = clf.pair_logits(d, x)
            labels = torch.cat([torch.ones(2 * n), torch.zeros(3 * n)]).to(logits)
            if n == 1:  # the "next" edit is the edit itself
                labels[3:] = 1.0
        pos, neg = labels > 0.5, labels < 0.5
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        loss = bce[pos].mean() + (bce[neg].mean() if neg.any() else 0.0)
        with torch.no_grad():
            pred = logits > math.log(self.cfg.threshold / (1 - self.cfg.threshold))
            stats = {"cls_recall": pred[pos].float().mean(),
                     "cls_specificity": (~pred[neg]).float().mean() if neg.any() else torch.tensor(1.0)}
        return loss, stats

    def counterfactual_batch(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """``prefix(z) + x + target`` for x in {prompt, equiv}, labels on the target only."""
        tok = self.tokenizer
        rows, labels = [], []
        for p, t, e in zip(batch["prompt"], batch["target"], batch["equiv"]):
            prefix = tok(cf_prefix(self.cfg, descriptor_of(self.cfg, p, t)))["input_ids"]
            tgt = target_ids(tok, t)
            for x in (p, e):
                body = tok(x)["input_ids"]
                if body and tok.bos_token_id is not None and body[0] == tok.bos_token_id \
                        and tok.bos_token_id != tok.eos_token_id:
                    body = body[1:]  # as the router does: the prefix already starts the sequence
                rows.append(prefix + body + tgt)
                labels.append([IGNORE] * (len(prefix) + len(body)) + tgt)
        pad = pad_id(tok)
        n = max(len(r) for r in rows)
        return {"input_ids": torch.tensor([r + [pad] * (n - len(r)) for r in rows], device=self.device),
                "attention_mask": torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows], device=self.device),
                "labels": torch.tensor([lab + [IGNORE] * (n - len(lab)) for lab in labels], device=self.device)}

    def counterfactual_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        enc = self.counterfactual_batch(batch)
        params = dict(self.base.named_parameters())
        edited = self.editor.counterfactual.edited(params)
        logits = functional_call(self.base, edited, (), {"input_ids": enc["input_ids"],
                                                          "attention_mask": enc["attention_mask"],
                                                          "use_cache": False}).logits
        lg, lab = logits[:, :-1].float(), enc["labels"][:, 1:]
        mask = lab != IGNORE
        nll = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), lab.reshape(-1), ignore_index=IGNORE)
        with torch.no_grad():
            correct = ((lg.argmax(-1) == lab) | ~mask).all(-1).float().mean()
        return nll, {"cf_exact": correct}

    def _step(self, batch: dict[str, Any], split: str) -> Tensor:
        loss = torch.zeros((), device=self.device)
        logs: dict[str, Tensor] = {}
        if self.train_cfg.train_classifier or split == "val":
            cls, stats = self.classifier_loss(batch)
            loss = loss + self.train_cfg.cls_coef * cls
            logs.update(cls_loss=cls, **stats)
        if self.train_cfg.train_counterfactual or split == "val":
            nll, stats = self.counterfactual_loss(batch)
            loss = loss + self.train_cfg.cf_coef * nll
            logs.update(cf_nll=nll, **stats)
        n = len(batch["prompt"])
        for k, v in logs.items():
            self.log(f"{split}/{k}", v, batch_size=n, sync_dist=split == "val", prog_bar=k in ("cls_loss", "cf_nll"))
        self.log(f"{split}/loss", loss, batch_size=n, sync_dist=split == "val")
        return loss

    def on_fit_start(self) -> None:
        import time

        warn_unused_neighbours(self)
        self._fit_start = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_end(self) -> None:
        import time

        secs = time.perf_counter() - getattr(self, "_fit_start", time.perf_counter())
        rss = peak_rss_mb() / 2**10
        gpu = peak_memory_mb("cuda") / 2**10 if torch.cuda.is_available() else 0.0
        log.info("SERAC training: %.1f s for %d steps; peak host RSS %.2f GiB; peak CUDA memory %.2f GiB",
                 secs, self.global_step, rss, gpu)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self._step(batch, "train")
        if self.global_step % 25 == 0:  # plain log lines: progress bars do not reach log files
            log.info("step %d: loss %.4f", self.global_step, float(loss.detach()))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val")

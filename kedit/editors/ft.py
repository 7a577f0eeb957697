"""Fine-tuning baselines: FT-L (constrained, one MLP layer) and FT-M (target-only loss).

FT-L is the constrained fine-tuning baseline of ROME (Meng et al. 2022, Sec. 3/App.; after
Zhu et al. 2020, "Modifying Memories in Transformer Models"): fine-tune the MLP output
projection of one layer on the edit prompt with Adam, and after every step clamp the
weights into ``W0 ± eps`` (an L-infinity constraint). Its loss, as in ROME's code
(``baselines/ft/ft_main.py``) and EasyEdit's ``objective_optimization: prompt_last``, scores
every target token at the *last prompt position*.

FT-M is EasyEdit's variant (Wang et al. 2023, "EasyEdit"; Zhang et al. 2024, "A Comprehensive
Study of Knowledge Editing"): the same layer, no norm constraint, and teacher-forced
cross-entropy on the target tokens with the prompt masked (``objective_optimization: target_new``).

Training never writes the model's weights: the trainable leaf is the change ``delta`` and
the model runs through ``torch.func.functional_call`` with ``W0 + delta`` swapped in and
every other parameter detached. ``edit`` is therefore pure by construction (weights,
``requires_grad`` flags, ``.grad`` and train/eval mode are untouched), and the result is an
ordinary dense :class:`~kedit.editors.base.WeightDelta` in the weight's storage orientation.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from kedit.data import encode
from kedit.data.encode import target_logits
from kedit.data.request import EditRequest
from kedit.editors.base import Editor, WeightDelta, base_identity
from kedit.models.arch import Arch, arch_of
from kedit.utils import check_layers, chunks, depth_layer

log = logging.getLogger(__name__)

# EasyEdit's FT configs for LLaMA-7B edit layer 21 of 32; "auto" keeps that relative depth.
AUTO_DEPTH = 21 / 32

Objective = Literal["target", "prompt_last"]


def resolve_layers(layers: list[int] | str, arch: Arch, model: nn.Module) -> list[int]:
    """``"auto"`` -> one layer at 2/3 depth; ``"all"`` -> every layer; else check the indices."""
    n = arch.num_layers(model)
    if layers == "auto":
        return [depth_layer(n, AUTO_DEPTH)]
    if layers == "all":
        return list(range(n))
    if isinstance(layers, str) or not layers:
        raise ValueError(f"layers must be 'auto', 'all' or a non-empty list of ints, got {layers!r}")
    return check_layers(layers, n)


def frozen_params(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter, detached: no graph (and no ``.grad``) reaches the model's weights."""
    return {name: p.detach() for name, p in model.named_parameters()}


def target_loss(logits: Tensor, batch: dict[str, Tensor], objective: Objective,
                seq2seq: bool) -> tuple[Tensor, Tensor]:
    """Mean over requests of the per-request mean target NLL, and whether each request's
    target tokens are all argmax (under the objective's scoring)."""
    if objective == "target":
        lg, tg, mask = target_logits(logits, batch["labels"], seq2seq)
        nll = F.cross_entropy(lg.float().transpose(1, 2), tg, reduction="none")
        per_req = (nll * mask).sum(-1) / mask.sum(-1)
        solved = ((lg.argmax(-1) == tg) | ~mask).all(-1)
        return per_req.mean(), solved
    if objective == "prompt_last":
        # ROME ft_main.py: logits at the last prompt token score every target token
        rows = torch.arange(logits.shape[0], device=logits.device)
        pos = torch.zeros_like(batch["prompt_len"]) if seq2seq else batch["prompt_len"] - 1
        logp = torch.log_softmax(logits[rows, pos].float(), dim=-1)  # (n_requests, vocab)
        # target tokens of each request, left-aligned and padded with -100
        rows_t = [lab[lab != -100] for lab in batch["labels"]]
        labels = torch.full((len(rows_t), max(len(t) for t in rows_t)), -100, device=logits.device)
        for i, t in enumerate(rows_t):
            labels[i, :len(t)] = t
        mask = labels != -100
        got = logp.gather(1, labels.clamp(min=0))
        per_req = -(got * mask).sum(-1) / mask.sum(-1)
        solved = (logp.argmax(-1) == labels[:, 0])  # only the first token is predicted there
        return per_req.mean(), solved
    raise ValueError(f"unknown objective {objective!r}; use 'target' or 'prompt_last'")


@dataclass
class TrainSpec:
    """What :func:`fit` trains and how (shared by FT-L, FT-M and LoRA)."""

    leaves: list[Tensor]
    """The trainable tensors."""
    weights: Callable[[], dict[str, Tensor]]
    """Builds the swapped-in weights from the leaves (called every step)."""
    num_steps: int
    lr: float
    weight_decay: float
    batch_size: int
    objective: Objective
    early_stop_loss: float | None
    progress: bool
    project: Callable[[], None] | None = None
    """Called under no_grad after every optimizer step (FT-L's norm constraint)."""
    context: Callable[[], AbstractContextManager] = nullcontext
    """Context around every forward (LoRA installs its hooks here)."""


def fit(model: nn.Module, tokenizer: PreTrainedTokenizerBase, reqs: list[EditRequest], spec: TrainSpec,
        name: str) -> dict[str, Any]:
    """Adam on ``spec.leaves`` with the model run through ``functional_call``; returns stats."""
    seq2seq = arch_of(model).encoder_decoder
    device = next(model.parameters()).device
    batches = [encode(tokenizer, [r.prompt for r in chunk], [r.target_new for r in chunk],
                      seq2seq=seq2seq, device=device) for chunk in chunks(reqs, spec.batch_size)]
    frozen = frozen_params(model)
    opt = torch.optim.Adam(spec.leaves, lr=spec.lr, weight_decay=spec.weight_decay)
    steps, loss_avg, solved_all = 0, math.inf, False
    bar = tqdm(range(spec.num_steps), desc=name, disable=not spec.progress, leave=False)
    with torch.enable_grad():
        for step in bar:
            total, solved = 0.0, []
            for batch in batches:
                inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                          "use_cache": False}
                if seq2seq:
                    inputs["labels"] = batch["labels"]
                with spec.context():
                    out = functional_call(model, {**frozen, **spec.weights()}, args=(), kwargs=inputs,
                                          strict=False)
                loss, ok = target_loss(out.logits, batch, spec.objective, seq2seq)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if spec.project is not None:
                    with torch.no_grad():
                        spec.project()
                total += loss.item() * len(ok)
                solved.append(ok)
            steps = step + 1
            loss_avg = total / len(reqs)
            solved_all = bool(torch.cat(solved).all())
            log.debug("%s step %d: loss %.4f, %d/%d requests argmax", name, steps, loss_avg,
                      int(torch.cat(solved).sum()), len(reqs))
            bar.set_postfix(loss=f"{loss_avg:.3f}")
            # ROME's FT stops once the loss is below 1e-2 (losses are before this step's update)
            if spec.early_stop_loss is not None and loss_avg < spec.early_stop_loss:
                break
    bar.close()
    # loss and argmax are those of the last forward pass, i.e. before the last update
    return {"steps": steps, "loss": loss_avg, "all_argmax": solved_all}


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Fork the global RNG (dropout, LoRA init) so editing neither depends on nor disturbs it."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------- FT-L / FT-M


@dataclass
class FTLHparams:
    """FT-L: ROME's constrained fine-tuning baseline (ROME ``hparams/FT/*_constr.json``, EasyEdit FT-L)."""

    layers: list[int] | Literal["auto", "all"] = "auto"
    """Layers whose MLP output projection is tuned; "auto": one at 2/3 depth (EasyEdit LLaMA-7B: 21 of 32)."""
    num_steps: int = 25
    """Adam steps over all requests (ROME/EasyEdit: 25)."""
    lr: float = 5e-4
    """Adam learning rate (ROME/EasyEdit: 5e-4)."""
    weight_decay: float = 0.0
    """Adam weight decay, applied to the change (ROME/EasyEdit: 0)."""
    norm_constraint: float | None = 5e-4
    """L-infinity bound eps: each weight stays within W0 ± eps (ROME/EasyEdit FT-L: 5e-4); null: unconstrained."""
    objective: Literal["target", "prompt_last"] = "prompt_last"
    """Loss: "prompt_last" scores all target tokens at the last prompt position (ROME); "target" is teacher-forced."""
    batch_size: int = 64
    """Requests per optimizer step in a batch edit (ROME: 64)."""
    early_stop_loss: float | None = 1e-2
    """Stop once the mean loss is below this (ROME: 1e-2); null: always run num_steps."""
    progress: bool = False
    """Show a progress bar over the steps."""


@dataclass
class FTMHparams(FTLHparams):
    """FT-M: EasyEdit's fine-tuning with the loss on the target tokens only (prompt masked)."""

    layers: list[int] | Literal["auto", "all"] = "auto"
    """Layers whose MLP output projection is tuned; "auto": one at 2/3 depth (EasyEdit LLaMA-7B: 21 of 32)."""
    norm_constraint: float | None = None
    """L-infinity bound eps on the change of each weight; null: unconstrained (EasyEdit FT-M)."""
    objective: Literal["target", "prompt_last"] = "target"
    """Loss: "target" is teacher-forced NLL of the target tokens with the prompt masked (EasyEdit FT-M)."""


class FTL(Editor):
    """Fine-tune the MLP output projection of chosen layers on the edit, with an L∞ constraint."""

    name = "ft-l"
    Hparams = FTLHparams

    def edit(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: list[EditRequest]) -> WeightDelta:
        hp = self.hparams
        arch = arch_of(model)
        layers = resolve_layers(hp.layers, arch, model)
        names = [arch.mlp_out_weight(layer) for layer in layers]
        params = dict(model.named_parameters())
        w0 = {n: params[n].detach() for n in names}
        base = base_identity(model, names)
        # the leaf is the change, so the constraint W ∈ W0 ± eps is a clamp of delta to ± eps
        delta = {n: torch.zeros_like(w, dtype=torch.float32, requires_grad=True) for n, w in w0.items()}
        eps = hp.norm_constraint

        def weights() -> dict[str, Tensor]:
            return {n: (w0[n].float() + delta[n]).to(w0[n].dtype) for n in names}

        def project() -> None:
            for d in delta.values():
                d.clamp_(-eps, eps)

        spec = TrainSpec(leaves=list(delta.values()), weights=weights, num_steps=hp.num_steps, lr=hp.lr,
                         weight_decay=hp.weight_decay, batch_size=hp.batch_size, objective=hp.objective,
                         early_stop_loss=hp.early_stop_loss, progress=hp.progress,
                         project=project if eps is not None else None)
        stats = fit(model, tokenizer, requests, spec, self.name)
        log.debug("%s: layers %s, %s", self.name, layers, stats)
        return WeightDelta(dense={n: d.detach() for n, d in delta.items()}, base=base,
                           info={"editor": self.name, "layers": layers, "n_requests": len(requests), **stats,
                                 "hparams": dataclasses.asdict(hp)})


class FTM(FTL):
    """FT-M: fine-tune the MLP output projection with the loss on the target tokens only."""

    name = "ft-m"
    Hparams = FTMHparams

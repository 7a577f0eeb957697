"""WISE: a side memory edited in random shards, merged, and chosen by an activation router.

Peng Wang, Zexi Li, Ningyu Zhang et al., "WISE: Rethinking the Knowledge Memory for Lifelong
Model Editing of Large Language Models", NeurIPS 2024 (arXiv:2405.14768); the behaviour follows
EasyEdit's ``easyeditor/models/wise`` (WISE-Merge, the paper's main variant).

The FFN value matrix ``W_v`` (the MLP output projection at ``layer``) is the *main memory*; a
copy ``W_v'`` is the *side memory*. With ``a`` the projection's input (the FFN activations) and
``φ`` the model's hidden activation function, applied to the projection outputs as in the code:

* routing score (Eq. 3, code form): ``Δ(x) = mean_t ‖φ(a W_v) − φ(a W_v')‖₂`` over the tokens
  of ``x`` (:func:`act_distance`);
* editing loss (Eq. 5): ``L = NLL(y_e | x_e) + L_a`` with
  ``L_a = [Δ(x_i) − α]₊ + [β − Δ(x_e)]₊ + [γ − (Δ(x_e) − Δ(x_i))]₊`` (:func:`routing_loss`),
  over the edit under ``templates`` context prefixes and one irrelevant text ``x_i``;
* update (Eq. 7): SGD on ``W_v'`` with the gradient masked to the shard's random subspace
  ``M ~ Bernoulli(ρ)`` (:func:`shard_mask`), then ``W_v'`` clamped into ``W_v ± c``;
* threshold (Alg. 1): ``ε = min`` of the edits' in-scope scores; inference uses ``act_ratio · ε``;
* sharding and merging (Eq. 8): every ``save_freq`` edits the shard is snapshotted and the next
  one starts from ``W_v`` with a new mask; every ``merge_freq`` edits the snapshots are merged
  into the side memory, ``W_v' = W_v + TIES({W^i − W_v})`` (:func:`ties_merge`);
* inference (Eq. 6): per row, the memory with the largest ``Δ`` answers if ``Δ > act_ratio · ε``,
  otherwise the main memory's output passes unchanged (bit-identical to the base model).

Sequence state. The side memory (merged memory, finished shards awaiting a merge, the shard in
progress), the edit count and ``ε`` are a :class:`SideMemory`, a pure fold of the WISE edits
applied before (:meth:`SideMemory.advance`). Each :class:`WISEEdit` carries only what it adds:
the new values of the shard at its mask positions (the mask is regenerated from ``mask_seed``
and the shard index; outside the mask the shard does not change), its in-scope score, whether
it closes the shard, and the merged memory when it triggers a merge. ``apply`` installs one
:class:`Router` per edited weight (a forward hook on the projection, plus a pre-hook on the
model that reads the attention mask), shared by all applied WISE edits; it advances the
router's memory and keeps the values it overwrote, so ``restore`` puts the previous memory back
exactly, and the last restore removes the hooks. ``edit`` folds the WISE edits of ``history``
(or, with no history given, the edits the model's router has applied) from ``W_v``; the editor
object keeps nothing.

Deviations from EasyEdit, each for a reason:

* the mask covers the whole SGD update, weight decay included (EasyEdit decays all entries, so
  a shard of 500 edits shrinks the whole matrix by up to 30%): a shard changes only its subspace,
  which is what Eq. 7 states and what lets an edit store only its mask's values;
* shards awaiting a merge are routed to as well (EasyEdit's WISE-Merge ignores a saved shard
  until the merge, so edits ``1..save_freq`` are not used between the save and the merge);
* the scores average over real tokens (the attention mask), not padding, and rows are routed
  one by one (EasyEdit routes a batch of one); templates are kedit's context templates
  (:func:`kedit.editors.locate.context_templates`: "The/Therefore/Because/I/You" prefixes,
  sampled) rather than EasyEdit's greedy "I/You/Because/Yes/Q:" ones; the irrelevant text
  ``x_i`` is a sentence of the statistics corpus (EasyEdit: an NQ question of the training
  split), chosen by the edit's position;
* the NLL is the mean over target tokens per row; ``ε`` records the score of the pass the early
  stop accepts (EasyEdit's is from the pass before the last step, when no early stop happens).

Not implemented: WISE-Retrieve (EasyEdit's ``retrieve: True``) and memory replay.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from kedit.data.encode import encode, target_logits
from kedit.data.request import EditRequest
from kedit.editors.base import (Edit, Editor, EditMismatchError, EditStateError, InvalidEditError, model_name,
                                require, require_base)
from kedit.editors.locate import context_templates, fill, frozen
from kedit.hooks import Replay
from kedit.identity import identity, require_match
from kedit.models.arch import Arch, arch_of, get_module
from kedit.utils import check_layers, depth_layer

log = logging.getLogger(__name__)

AUTO_DEPTH = 27 / 32
"""EasyEdit edits ``layers[27].mlp.down_proj`` of LLaMA-2-7B's 32 blocks; "auto" keeps that depth."""
ROUTER_ATTR = "_kedit_wise_router"
INFER_MAX_TOKENS = 100
"""At inference, longer sequences score by the max over tokens instead of the mean (EasyEdit;
:attr:`WISEHparams.max_score_tokens`)."""


@dataclass
class WISEHparams:
    """WISE-Merge (EasyEdit ``hparams/WISE/llama-7b.yaml`` and the paper's Table 10)."""

    layer: int | Literal["auto"] = "auto"
    """Block whose MLP output projection gets the side memory; "auto": 27/32 of the depth (EasyEdit LLaMA-2: 27)."""
    mask_ratio: float = 0.2
    """ρ: fraction of the side memory's entries a shard trains (Bernoulli mask, Eq. 7)."""
    alpha: float = 5.0
    """α: margin that the irrelevant text's score stays below (Eq. 5)."""
    beta: float = 20.0
    """β: margin that the edit's score rises above (Eq. 5)."""
    gamma: float = 10.0
    """γ: least gap between the edit's and the irrelevant text's scores (Eq. 5)."""
    lr: float = 1.0
    """SGD learning rate on the side memory."""
    weight_decay: float = 1e-5
    """SGD weight decay (inside the shard's mask; see the module docstring)."""
    n_iter: int = 70
    """Most SGD steps per edit."""
    early_stop_loss: float = 0.02
    """Stop once the loss is at most this and has changed by at most ``early_stop_delta``."""
    early_stop_delta: float = 1e-4
    """See ``early_stop_loss``."""
    norm_constraint: float = 1.0
    """c: the side memory stays within ``W_v ± c`` element-wise."""
    act_ratio: float = 0.88
    """The router's threshold is ``act_ratio`` times the least in-scope score of the edits (ε)."""
    max_score_tokens: int | None = INFER_MAX_TOKENS
    """At inference, inputs longer than this many tokens score by the max over tokens instead of the mean
    (EasyEdit: 100); None: always the mean. The max of a per-token score grows with the length, while ε
    is set on short edit prompts, so long inputs tend to route to the side memory whatever they say."""
    save_freq: int = 500
    """Edits per shard: then the shard is kept for merging and a new one starts from ``W_v``."""
    merge_freq: int = 1000
    """Edits between TIES merges of the kept shards into the side memory (a multiple of save_freq)."""
    density: float = 0.53
    """TIES: fraction of each shard's change kept, by magnitude."""
    merge_keep: float = 0.6
    """TIES weight of the previously merged memory in later merges (the new shards share 1 - this)."""
    templates: list[tuple[int, int]] = field(default_factory=lambda: [(5, 5), (10, 5)])
    """Context prefixes the edit is trained under, as (length in tokens, count) pairs; [] for none."""
    template_seed: int = 0
    """Seed of the context templates."""
    irrelevant_corpus: str | list[str] | None = None
    """Texts x_i of the routing loss: a corpus path (or texts); None: the statistics corpus."""
    irrelevant_pool: int = 100
    """x_i of the n-th WISE edit is text n mod this of the corpus."""
    irrelevant_words: int = 20
    """x_i is cut to this many words."""
    mask_seed: int = 0
    """Seed of the shard masks (shard s uses mask_seed + s)."""

    def __post_init__(self) -> None:
        if self.save_freq < 1 or self.merge_freq % self.save_freq:
            raise ValueError(f"merge_freq ({self.merge_freq}) must be a multiple of save_freq ({self.save_freq})")
        if not 0.0 < self.mask_ratio <= 1.0 or not 0.0 < self.density <= 1.0:
            raise ValueError(f"mask_ratio and density must be in (0, 1], got {self.mask_ratio}, {self.density}")


# --------------------------------------------------------------------------- the equations


@functools.lru_cache(maxsize=4)
def shard_mask(shape: tuple[int, ...], seed: int, shard: int, ratio: float, device: str = "cpu") -> Tensor:
    """Eq. 7's mask of shard ``shard``: i.i.d. Bernoulli(ρ) over the weight's entries (seeded, on the
    CPU so that every device gets the same mask). Memoized: a pure function; do not modify it."""
    g = torch.Generator().manual_seed(seed + shard)
    return (torch.rand(shape, generator=g) < ratio).to(device)


def act_distance(act: Callable[[Tensor], Tensor], main: Tensor, side: Tensor, valid: Tensor,
                 infer: bool = False, max_tokens: int | None = INFER_MAX_TOKENS) -> Tensor:
    """Eq. 3 (code form): per row, the mean over real tokens of ``‖φ(main) − φ(side)‖₂``; at inference
    on sequences longer than ``max_tokens`` tokens (EasyEdit: 100; None: never), the max. ``valid``
    (B, T) marks real tokens."""
    dist = torch.linalg.vector_norm(act(main.float()) - act(side.float()), dim=-1)  # (B, T)
    if infer and max_tokens is not None and dist.shape[1] > max_tokens:
        return dist.masked_fill(~valid, -math.inf).amax(-1)
    return (dist * valid).sum(-1) / valid.sum(-1).clamp(min=1)


def hinge_mean(x: Tensor) -> Tensor:
    """Mean of the positive entries (zero if none), as EasyEdit averages each hinge."""
    pos = x[x > 0]
    return pos.mean() if pos.numel() else x.new_zeros(())


def routing_loss(d_edit: Tensor, d_irr: Tensor, hp: WISEHparams) -> Tensor:
    """Eq. 5: ``[Δ(x_i) − α]₊ + [β − Δ(x_e)]₊ + [γ − (Δ(x_e) − Δ(x_i))]₊``; (n_e,) and (n_i,) scores."""
    return (hinge_mean(d_irr - hp.alpha) + hinge_mean(hp.beta - d_edit)
            + hinge_mean(hp.gamma - (d_edit[None, :] - d_irr[:, None])))


def ties_merge(base: Tensor, memories: Sequence[Tensor], weights: Sequence[float], density: float) -> Tensor:
    """Eq. 8: ``base + TIES({m − base})``: trim each change to its top ``density`` entries by magnitude,
    weight it, elect a sign per entry from the weighted sum, and take the weighted mean of the
    entries that agree with it (EasyEdit ``merge/gta.py``: TIES with ``normalize``)."""
    taus = []
    for m in memories:
        tau = (m - base).float()
        k = int(density * tau.numel())
        keep = torch.zeros(tau.numel(), dtype=torch.bool, device=tau.device)
        keep[tau.abs().flatten().topk(k).indices] = True
        taus.append(tau * keep.view_as(tau))
    tau = torch.stack(taus)  # (k, *shape)
    w = torch.tensor(weights, dtype=tau.dtype, device=tau.device).view(-1, *[1] * base.ndim)
    weighted = tau * w
    sign = (weighted.sum(0) >= 0).to(tau.dtype) * 2 - 1
    agree = weighted.sign() == sign
    divisor = (w * agree).sum(0)
    divisor[divisor.abs() < 1e-8] = 1.0
    return (base.float() + (weighted * agree).sum(0) / divisor).to(base.dtype)


def activation(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """φ: the model's hidden activation function, from its config (``hidden_act`` or GPT-2's
    ``activation_function``)."""
    from transformers.activations import ACT2FN

    config = model.config
    name = getattr(config, "hidden_act", None) or getattr(config, "activation_function", None)
    if name not in ACT2FN:
        raise ValueError(f"WISE scores through the model's activation function; {model_name(model)!r} names "
                         f"{name!r} (config.hidden_act / activation_function), which transformers does not know")
    return ACT2FN[name]


def side_output(arch: Arch, module: nn.Module, a: Tensor, weight: Tensor) -> Tensor:
    """The projection's output on input ``a`` with ``weight`` (storage orientation) in place of its own."""
    return F.linear(a, arch.as_out_in(weight).to(a.dtype), getattr(module, "bias", None))


# --------------------------------------------------------------------------- sequence state


@dataclass
class SideMemory:
    """The side memory after ``n`` WISE edits at one weight: a fold of the edits (see the module docstring)."""

    current: Tensor
    """The shard in progress (storage orientation)."""
    shards: list[Tensor] = field(default_factory=list)
    """Finished shards awaiting the next merge."""
    merged: Tensor | None = None
    """The merged side memory (None before the first merge)."""
    epsilon: float = math.inf
    """ε: the least in-scope score of the edits so far."""
    n: int = 0
    """WISE edits folded in."""

    @property
    def memories(self) -> list[Tensor]:
        """What the router compares with the main memory, in EasyEdit's order of preference on ties."""
        return ([] if self.merged is None else [self.merged]) + [*self.shards, self.current]

    def advance(self, edit: WISEEdit, base: Tensor) -> tuple:
        """Fold ``edit`` in (in place); returns what :meth:`undo` needs to go back exactly."""
        if edit.position != self.n:
            raise EditMismatchError(f"WISE edit #{edit.position} of {edit.weight} stacks on {edit.position} earlier "
                                    f"WISE edits, but {self.n} are applied: apply the edits in their order")
        mask = edit.mask(self.current.device)
        if int(mask.sum()) != edit.values.numel():
            raise InvalidEditError(f"{edit.weight}: the edit has {edit.values.numel()} values but shard "
                                   f"{edit.shard}'s mask has {int(mask.sum())} entries")
        undo = (self.current, self.current[mask], list(self.shards), self.merged, self.epsilon)
        self.current[mask] = edit.values.to(self.current)
        self.epsilon, self.n = min(self.epsilon, edit.score), self.n + 1
        if edit.saves:
            self.shards, self.current = [*self.shards, self.current], base.detach().clone()
        if edit.merged is not None:
            self.merged, self.shards = edit.merged.to(self.current), []
        return undo

    def undo(self, edit: WISEEdit, record: tuple) -> None:
        current, old, self.shards, self.merged, self.epsilon = record
        current[edit.mask(current.device)] = old
        self.current, self.n = current, self.n - 1


# --------------------------------------------------------------------------- the router


class Router:
    """Routes one MLP output projection between the main memory and the side memory (Eq. 6).

    One per edited weight, shared by every applied WISE edit there; kept on the projection
    module as ``_kedit_wise_router`` while edits are applied.
    """

    def __init__(self, model: nn.Module, module_name: str, weight: str) -> None:
        self.arch, self.module = arch_of(model), get_module(model, module_name)
        self.weight = dict(model.named_parameters())[weight]
        self.memory = SideMemory(current=self.weight.detach().clone())
        self.act = activation(model)
        self.edits: list[WISEEdit] = []
        self.undos: list[tuple] = []
        self.attention: Tensor | None = None
        self.active = True
        self.handles = [self.module.register_forward_hook(self.route),
                        model.register_forward_pre_hook(self.read_mask, with_kwargs=True)]
        setattr(self.module, ROUTER_ATTR, self)

    @staticmethod
    def of(model: nn.Module, module_name: str) -> Router | None:
        return getattr(get_module(model, module_name), ROUTER_ATTR, None)

    def push(self, edit: WISEEdit) -> None:
        self.undos.append(self.memory.advance(edit, self.weight))
        self.edits.append(edit)

    def pop(self) -> WISEEdit:
        edit = self.edits.pop()
        self.memory.undo(edit, self.undos.pop())
        return edit

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        delattr(self.module, ROUTER_ATTR)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The projection's own output while the body runs: WISE's training replaces it anyway, and
        scoring every kept memory there would cost one side output per memory per step."""
        active, self.active = self.active, False
        try:
            yield
        finally:
            self.active = active

    def read_mask(self, _model: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self.attention = mask if isinstance(mask, Tensor) and mask.ndim == 2 else None

    def valid(self, a: Tensor) -> Tensor:
        """(B, T): the real tokens of the projection's input (the last T columns of the mask, which
        also covers cached generation)."""
        B, T = a.shape[:2]
        mask = self.attention
        if mask is None or mask.shape[0] != B or mask.shape[1] < T:
            return torch.ones(B, T, dtype=torch.bool, device=a.device)
        return mask[:, -T:].to(device=a.device, dtype=torch.bool)

    @torch.no_grad()
    def scores(self, module: nn.Module, a: Tensor, out: Tensor, max_tokens: int | None) -> tuple[Tensor, Tensor]:
        """Each memory's output on the projection's input ``a`` (K, B, T, d) and its inference score
        against the main memory's output ``out`` (K, B), long inputs scored by ``max_tokens``'s rule."""
        valid = self.valid(a)
        sides = torch.stack([side_output(self.arch, module, a, m) for m in self.memory.memories])
        return sides, torch.stack([act_distance(self.act, out, s, valid, infer=True, max_tokens=max_tokens)
                                   for s in sides])

    @torch.no_grad()
    def route(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        if not self.active:
            return out
        a, last = args[0], self.edits[-1]
        sides, scores = self.scores(module, a, out, last.max_score_tokens)
        top, best = scores.max(0)
        use = top > last.act_ratio * self.memory.epsilon
        if not use.any():
            return out
        chosen = sides[best, torch.arange(a.shape[0], device=a.device)]
        return torch.where(use.view(-1, *[1] * (out.ndim - 1)), chosen, out)


# --------------------------------------------------------------------------- the edit


@dataclass(eq=False)
class WISEEdit(Edit):
    """One WISE edit: the new values of its shard at the shard's mask, and what it changes in the
    side memory's sequence state (its score; a save; a merge). Applied through a :class:`Router`."""

    weight: str
    """The main memory's parameter (the MLP output projection's weight)."""
    module: str
    """Its module."""
    position: int
    """WISE edits at this weight before this one."""
    shard: int
    values: Tensor
    """The shard's new values at its mask positions, (mask.sum(),)."""
    score: float
    """In-scope score Δ(x_e) (the least over the requests); ε is the min over the edits."""
    saves: bool
    """This edit fills the shard (then a new one starts from ``W_v``)."""
    shape: tuple[int, ...]
    mask_seed: int
    mask_ratio: float
    act_ratio: float
    base: dict[str, str]
    """Identity of the main memory (kedit.identity)."""
    merged: Tensor | None = None
    """The merged side memory, when this edit triggers a TIES merge."""
    max_score_tokens: int | None = INFER_MAX_TOKENS
    """The router's rule for long inputs (:attr:`WISEHparams.max_score_tokens`), as act_ratio: the last
    applied edit's value holds."""
    info: dict[str, Any] = field(default_factory=dict)
    kind: ClassVar[str] = "wise"
    _router: Router | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for part, t in (("values", self.values), ("merged memory", self.merged)):
            if t is not None and (not t.is_floating_point() or not torch.isfinite(t).all()):
                raise InvalidEditError(f"{self.weight}: the {part} must be finite floats")
        if self.merged is not None and tuple(self.merged.shape) != tuple(self.shape):
            raise InvalidEditError(f"{self.weight}: merged memory of shape {tuple(self.merged.shape)}, "
                                   f"expected {tuple(self.shape)}")

    @property
    def is_applied(self) -> bool:
        return self._router is not None

    def mask(self, device: torch.device | str = "cpu") -> Tensor:
        return shard_mask(tuple(self.shape), self.mask_seed, self.shard, self.mask_ratio, str(device))

    def check_base(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        if self.weight not in params or tuple(params[self.weight].shape) != tuple(self.shape):
            raise EditMismatchError(f"{self.source or 'this WISE edit'}: made for {self.base.get('name')!r}, whose "
                                    f"{self.weight} has shape {tuple(self.shape)}; {model_name(model)!r} differs")
        require_match(self.base, model, [self.weight], f"this WISE edit (its {self.weight})")

    def apply(self, model: nn.Module) -> None:
        if self._router is not None:
            raise EditStateError("edit is already applied; restore it first")
        self.check_base(model)
        router = Router.of(model, self.module) or Router(model, self.module, self.weight)
        try:
            router.push(self)
        except BaseException:
            if not router.edits:
                router.remove()
            raise
        self._router = router

    def restore(self, model: nn.Module) -> None:
        router = self._router
        if router is None:
            raise EditStateError("edit is not applied")
        if router.edits[-1] is not self:
            raise EditStateError("WISE edits restore in reverse order of applying")
        router.pop()
        if not router.edits:
            router.remove()
        self._router = None

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {"values": self.values} | ({} if self.merged is None else {"merged": self.merged})
        meta = {f: getattr(self, f) for f in ("weight", "module", "position", "shard", "score", "saves",
                                               "mask_seed", "mask_ratio", "act_ratio", "max_score_tokens", "base",
                                               "info")}
        return tensors, {**meta, "shape": list(self.shape)}

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> WISEEdit:
        stray = set(tensors) - {"values", "merged"}
        if "values" not in tensors or stray:
            raise InvalidEditError(f"expected tensors 'values' (and 'merged'), got {sorted(tensors)}")
        fields = {f: require(meta, f, t) for f, t in (
            ("weight", str), ("module", str), ("position", int), ("shard", int), ("score", (int, float)),
            ("saves", bool), ("mask_seed", int), ("mask_ratio", (int, float)), ("act_ratio", (int, float)),
            ("shape", list))}
        fields["shape"] = tuple(fields["shape"])
        if "max_score_tokens" in meta:  # absent from edits saved before the field existed: EasyEdit's 100
            fields["max_score_tokens"] = require(meta, "max_score_tokens", (int, type(None)))
        return cls(**fields, values=tensors["values"], merged=tensors.get("merged"), base=require_base(meta),
                   info=require(meta, "info", dict) if "info" in meta else {})


# --------------------------------------------------------------------------- the editor


@dataclass
class Batch:
    """The rows of one edit step: the requests under each template, then x_i (last row)."""

    inputs: dict[str, Tensor]
    labels: Tensor
    n_templates: int


class WISE(Editor):
    """WISE-Merge: train a side copy of one FFN value matrix in random shards (Alg. 1)."""

    name = "wise"
    Hparams = WISEHparams

    def edit(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: list[EditRequest],
             history: Sequence[Edit] = ()) -> WISEEdit:
        hp, arch = self.hparams, arch_of(model)
        n_layers = arch.num_layers(model)
        layer = depth_layer(n_layers, AUTO_DEPTH) if hp.layer == "auto" else check_layers([hp.layer], n_layers)[0]
        module_name, weight = arch.mlp_out_module(layer), arch.mlp_out_weight(layer)
        W_v = dict(model.named_parameters())[weight].detach()
        memory = self.memory(model, module_name, weight, history)
        shard = memory.n // hp.save_freq
        mask = shard_mask(tuple(W_v.shape), hp.mask_seed, shard, hp.mask_ratio, str(W_v.device))
        batch = self.batch(model, tokenizer, requests, memory.n)
        side, score, steps, loss = self.train(model, module_name, memory.current, W_v, mask, batch, len(requests))
        n = memory.n + 1
        merged = None
        if n % hp.merge_freq == 0:
            merged = self.merge(W_v, [*memory.shards, side], memory.merged)
        log.info("WISE edit %d at %s (shard %d): %d steps, loss %.4f, score %.3f%s", n, weight, shard, steps,
                 loss, score, ", merged" if merged is not None else "")
        return WISEEdit(weight=weight, module=module_name, position=memory.n, shard=shard, values=side[mask],
                        score=score, saves=n % hp.save_freq == 0, shape=tuple(W_v.shape), mask_seed=hp.mask_seed,
                        mask_ratio=hp.mask_ratio, act_ratio=hp.act_ratio, max_score_tokens=hp.max_score_tokens,
                        base=identity(model, [weight]),
                        merged=merged, info={"editor": self.name, "layer": layer, "steps": steps, "loss": loss,
                                             "n_requests": len(requests), "hparams": dataclasses.asdict(hp)})

    def memory(self, model: nn.Module, module_name: str, weight: str, history: Sequence[Edit]) -> SideMemory:
        """The side memory the WISE edits of ``history`` at ``weight`` built; with no WISE edit in the
        history, the one of the edits the model's router has applied (none: a fresh copy of W_v)."""
        past = [e for e in history if isinstance(e, WISEEdit) and e.weight == weight]
        router = Router.of(model, module_name)
        if router is not None and (not past or [id(e) for e in past] == [id(e) for e in router.edits]):
            return router.memory  # the same fold, already computed (read only)
        W_v = dict(model.named_parameters())[weight].detach()
        memory = SideMemory(current=W_v.clone())
        for edit in past:
            memory.advance(edit, W_v)
        return memory

    def batch(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: list[EditRequest],
              position: int) -> Batch:
        """Every request under every context template (``x_e + y_e``), plus x_i as the last row."""
        hp = self.hparams
        templates = context_templates(model, tokenizer, hp.templates, hp.template_seed) if hp.templates else ["{}"]
        prompts = [fill(t, r.prompt) for t in templates for r in requests]
        targets = [r.target_new for _ in templates for r in requests]
        words = irrelevant_text(hp, position).split()
        enc = encode(tokenizer, [*prompts, " ".join(words[:-1])], [*targets, words[-1]],
                     device=next(model.parameters()).device)
        return Batch(inputs={"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]},
                     labels=enc["labels"], n_templates=len(templates))

    def train(self, model: nn.Module, module_name: str, start: Tensor, W_v: Tensor, mask: Tensor, batch: Batch,
              n_requests: int) -> tuple[Tensor, float, int, float]:
        """Alg. 1, lines 2-4: masked SGD on the shard until the early stop; returns the shard, the
        in-scope score ε of the accepted pass (least over the requests), the steps and the loss."""
        hp, arch, act = self.hparams, arch_of(model), activation(model)
        module = get_module(model, module_name)
        side = start.detach().clone()
        lo, hi = W_v - hp.norm_constraint, W_v + hp.norm_constraint
        valid = batch.inputs["attention_mask"].bool()
        outs: dict[str, Tensor] = {}

        def editing(_module: nn.Module, args: tuple, _out: Tensor) -> Tensor:  # EasyEdit's editing mode
            outs["main"] = side_output(arch, module, args[0], W_v)
            outs["side"] = side_output(arch, module, args[0], side)
            return outs["side"]

        previous, step, loss = math.inf, 0, math.inf
        below = Replay(model, arch.blocks_below(model, module_name))  # they do not depend on the side memory
        router = Router.of(model, module_name)  # applied edits' router: its output would be replaced
        handle = module.register_forward_hook(editing)
        try:
            with frozen(model), torch.enable_grad(), router.paused() if router else nullcontext():
                for step in range(1, hp.n_iter + 1):
                    side.requires_grad_(True)
                    with below():
                        logits = model(**batch.inputs, use_cache=False).logits
                    d = act_distance(act, outs["main"], outs["side"], valid)
                    nll, margin = edit_nll(logits[:-1], batch.labels[:-1]), routing_loss(d[:-1], d[-1:], hp)
                    total = nll + margin
                    loss = total.item()
                    log.debug("WISE step %d: nll %.4f, L_a %.4f, Δ(x_e) %.3f, Δ(x_i) %.3f", step, nll.item(),
                              margin.item(), d[:-1].mean().item(), d[-1].item())
                    score = d[:-1].detach().view(batch.n_templates, n_requests).mean(0).min().item()
                    if abs(previous - loss) <= hp.early_stop_delta and loss <= hp.early_stop_loss:
                        break
                    if step == hp.n_iter:
                        break  # as EasyEdit: the last pass is scored, no step after it
                    (grad,) = torch.autograd.grad(total, side)
                    side = self.step(side.detach(), grad, mask, lo, hi)
                    previous = loss
        finally:
            handle.remove()
        return side.detach(), score, step, loss

    def step(self, side: Tensor, grad: Tensor, mask: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        """Eq. 7: SGD on the shard's mask only (weight decay too), then the ``W_v ± c`` box."""
        hp = self.hparams
        update = (grad + hp.weight_decay * side) * mask
        return torch.clamp(side - hp.lr * update, lo, hi)

    def merge(self, W_v: Tensor, shards: list[Tensor], merged: Tensor | None) -> Tensor:
        """Eq. 8: TIES over the shards (equal weights); later merges weigh the merged memory ``merge_keep``."""
        hp = self.hparams
        if merged is None:
            return ties_merge(W_v, shards, [1.0 / len(shards)] * len(shards), hp.density)
        weights = [(1.0 - hp.merge_keep) / len(shards)] * len(shards) + [hp.merge_keep]
        return ties_merge(W_v, [*shards, merged], weights, hp.density)


def edit_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean over rows of the mean target-token NLL (the edit rows only)."""
    lg, tg, mask = target_logits(logits, labels)
    nll = F.cross_entropy(lg.float().transpose(1, 2), tg, reduction="none")
    return ((nll * mask).sum(-1) / mask.sum(-1)).mean()


def irrelevant_text(hp: WISEHparams, position: int) -> str:
    """x_i of the WISE edit at ``position``: text ``position mod irrelevant_pool`` of the corpus, cut
    to ``irrelevant_words`` words (at least two: a prompt and its answer)."""
    from kedit.stats import default_corpus, iter_texts

    corpus = default_corpus() if hp.irrelevant_corpus is None else hp.irrelevant_corpus
    texts = [t for t in itertools.islice(iter_texts(corpus), hp.irrelevant_pool) if len(t.split()) >= 2]
    if not texts:
        raise ValueError(f"WISE's irrelevant corpus {corpus!r} has no text of two words or more")
    return " ".join(texts[position % len(texts)].split()[:max(2, hp.irrelevant_words)])

"""GRACE: a discrete key-value adaptor at one layer (Hartvigsen et al., NeurIPS 2023).

"Aging with GRACE: Lifelong Model Editing with Discrete Key-Value Adaptors", arXiv:2211.11031.
The base weights never change. The MLP output projection ``f_l`` of block ``layer`` is wrapped
with a codebook of entries ``(k_i (d_in,), v_i (d_out,), ε_i, y_i)``: key, value, deferral radius
and label (the target's token ids).

* Inference (:func:`route`): for a layer input ``h_t``, ``i* = argmin_i ‖h_t − k_i‖₂`` (fp32);
  the layer outputs ``v_{i*}`` if ``‖h_t − k_{i*}‖ ≤ ε_{i*}``, else ``f_l(h_t)`` (it defers).
* Editing one request ``(x, y)`` (:meth:`GRACE.edit_one`): the query ``q = h_{t*}`` is the layer
  input at the last prompt token. Codebook maintenance (:func:`maintain`), ``d = ‖q − k_{i*}‖``:

  - empty codebook, or ``d > ε_init + ε_{i*}``: **add** ``(q, v_new, ε_init, y)``;
  - overlap and ``y ≠ y_{i*}``: add, then **split**: ``ε_{i*} ← d/2 − 1e-5``, ``ε_new ← d/2``;
  - overlap and ``y = y_{i*}``: **expand** if ``d > ε_{i*}``: ``ε_{i*} ← d`` (``coverage``;
    ``moving_average`` also moves ``k_{i*} ← (k_{i*} + q)/2``); no new entry, ``v_{i*}`` is retrained.

  Then the chosen value is trained (:meth:`GRACE.train_value`): ``n_iter`` Adam steps (``edit_lr``)
  on the LM loss of ``x + y`` through the frozen model, with the value as the layer's output at ``t*``.
  ``v_new`` is ``U[0, 1)^{d_out}`` (``cold``) or ``f_l(q)`` (``warm``).

Where kedit deviates from the official code (/work/shared/papers/grace.md, pitfalls):

* Every position is its own query (pitfall 1: the official ``t*`` is stale state on the adaptor).
  Each token whose layer input lies inside its nearest entry's radius is replaced by that value:
  EasyEdit's ``replace_last`` applied per token. A prompt's last token is replaced as at edit
  time, in teacher-forced (prompt + target) and in generation passes alike; the layer's input
  does not depend on its own replaced outputs, so the decision is causal and batch-independent.
  The official ``replace_prompt`` (T5 encoder positions ``[0, t*)``) has no decoder-only meaning.
* Labels are compared as exact token sequences (pitfall 4: the official mean of label ids collides).
* The cold value is drawn from a generator seeded with ``seed``: the editor is a pure function.
* A batch of requests becomes one edit, made one request after another (a stream of single edits).
  While a value is trained, the layer routes through the codebook being edited (history plus the
  requests before it), in place of the applied adaptor's.

Sequence state. A :class:`GRACEEdit` holds the entries it added (referenced as ``(uid, index)``,
``uid`` a random id of the edit) and ``overrides``: the new state of earlier edits' entries that
its maintenance changed (a split radius, an expanded or moved key, a retrained value). The codebook an edit is computed against is
replayed from the GRACE edits in ``history`` (:meth:`Codebook.replay`). Applied edits join the
one :class:`Adaptor` of their layer: a forward hook serving the union of their codebooks (nearest
key across all entries, as GRACE does). Joining swaps the overrides in and keeps the entries they
replace; leaving (in reverse order) puts those back, so undoing the last edit restores the earlier
radii, and the hook is removed when the last edit leaves. The editor object keeps no state.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from kedit.data.encode import encode, target_ids, target_nll
from kedit.data.request import EditRequest
from kedit.editors.base import (
    Edit,
    Editor,
    EditStateError,
    InvalidEditError,
    require,
    require_base,
)
from kedit.hooks import Replay, run_until, trace
from kedit.identity import EditMismatchError, identity, model_name, require_match
from kedit.models.arch import arch_of
from kedit.utils import check_layers, depth_layer

log = logging.getLogger(__name__)

Ref = tuple[str, int]
"""An entry's reference: (uid of the GRACE edit that added it, its index there)."""

SPLIT_MARGIN = 1e-5
"""The official split leaves the old radius this much under d/2, so the new key wins the tie."""


@dataclass
class GRACEHparams:
    """GRACE hyperparameters (official ``grace.yaml``; EasyEdit's where the official has none)."""

    layer: int | None = None
    """Block whose MLP output projection is wrapped; None: 27/32 of the depth (EasyEdit, LLaMA-2-7B)."""
    eps_init: float = 1.0
    """ε_init: the deferral radius of a new key."""
    edit_lr: float = 1.0
    """Adam learning rate of the value."""
    n_iter: int = 100
    """Adam steps per edited request."""
    val_init: Literal["cold", "warm"] = "cold"
    """A new value: U[0, 1) (cold) or the layer's output at the query (warm)."""
    eps_expand: Literal["coverage", "moving_average"] = "coverage"
    """Same-label overlap: grow the radius to the query (coverage), or also move the key halfway."""
    seed: int = 0
    """Seed of the cold values' generator."""

    def __post_init__(self) -> None:
        if self.eps_init <= 0 or self.n_iter < 1 or self.edit_lr <= 0:
            raise ValueError(f"GRACE needs eps_init > 0, n_iter >= 1 and edit_lr > 0; got eps_init="
                             f"{self.eps_init}, n_iter={self.n_iter}, edit_lr={self.edit_lr}")


@dataclass(frozen=True)
class Entry:
    """One codebook entry; replaced, never mutated (an edit compares entries by identity)."""

    key: Tensor  # (d_in,) fp32
    value: Tensor  # (d_out,) fp32
    radius: float
    label: tuple[int, ...]


# --------------------------------------------------------------------------- codebook


class Codebook:
    """Entries by reference, in the order they were added; GRACE edits join and leave it."""

    def __init__(self) -> None:
        self.entries: dict[Ref, Entry] = {}
        self._tables: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}

    @classmethod
    def replay(cls, edits: Iterable[GRACEEdit]) -> Codebook:
        """The codebook the applied ``edits`` (in order) make."""
        book = cls()
        for edit in edits:
            book.join(edit)
        return book

    def join(self, edit: GRACEEdit) -> dict[Ref, Entry]:
        """Add ``edit``'s entries and swap its overrides in; returns the entries they replaced."""
        missing = [ref for ref in edit.overrides if ref not in self.entries]
        if missing:
            raise EditMismatchError(f"this GRACE edit changes entry {missing[0][1]} of GRACE edit {missing[0][0]}, "
                                    "which is not applied at its layer: apply the edits in the order they were made")
        saved = {ref: self.entries[ref] for ref in edit.overrides}
        self.entries.update(edit.overrides)
        self.entries.update(edit.own())
        self._tables.clear()
        return saved

    def leave(self, edit: GRACEEdit, saved: dict[Ref, Entry]) -> None:
        """Undo :meth:`join`: drop ``edit``'s entries, put back the ones its overrides replaced."""
        for ref in edit.own():
            del self.entries[ref]
        self.entries.update(saved)
        self._tables.clear()

    def put(self, ref: Ref, entry: Entry) -> None:
        self.entries[ref] = entry
        self._tables.clear()

    def tables(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(keys (M, d_in) fp32, values (M, d_out) fp32, radii (M,) fp64) on ``device``."""
        if device not in self._tables:
            entries = list(self.entries.values())
            self._tables[device] = (torch.stack([e.key for e in entries]).to(device),
                                    torch.stack([e.value for e in entries]).to(device),
                                    torch.tensor([e.radius for e in entries], dtype=torch.float64, device=device))
        return self._tables[device]

    def nearest(self, q: Tensor) -> tuple[float, Ref]:
        """(‖q − k_{i*}‖, reference of i*) for one query (d_in,)."""
        keys = self.tables(q.device)[0]
        dist, i = nearest_keys(q[None], keys)
        return float(dist[0]), list(self.entries)[int(i[0])]


def nearest_keys(q: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
    """For queries (N, d_in): (‖q − k_{i*}‖ (N,), i* (N,)), fp32. The argmin uses cdist's fast
    matrix-product form; the distance to the chosen key is then computed directly (no
    ‖q‖² + ‖k‖² − 2qk cancellation: a key's own query is at distance exactly 0)."""
    q = q.float()
    nearest = torch.cdist(q, keys).argmin(-1)
    return (q - keys[nearest]).norm(dim=-1), nearest


def route(h: Tensor, out: Tensor, keys: Tensor, values: Tensor, radii: Tensor) -> Tensor:
    """The GRACE layer, per position: ``out_t ← v_{i*}`` where ``‖h_t − k_{i*}‖ ≤ ε_{i*}``."""
    if not len(keys):
        return out
    q = h.reshape(-1, h.shape[-1])
    dist, nearest = nearest_keys(q, keys)
    hit = dist.double() <= radii[nearest]
    if not hit.any():
        return out  # deferred everywhere: the layer's own output, bit for bit
    flat = torch.where(hit[:, None], values[nearest].to(out.dtype), out.reshape(-1, out.shape[-1]))
    return flat.reshape(out.shape)


def maintain(book: Codebook, new_ref: Ref, q: Tensor, value: Tensor, label: tuple[int, ...],
             hp: GRACEHparams) -> Ref:
    """Codebook maintenance for one query (the official iteration 0): add, split or expand.
    Returns the entry whose value is then trained."""
    new = Entry(q, value, hp.eps_init, label)
    if not book.entries:
        book.put(new_ref, new)
        return new_ref
    d, near = book.nearest(q)
    old = book.entries[near]
    if d > hp.eps_init + old.radius:  # the balls do not overlap
        book.put(new_ref, new)
        return new_ref
    if label != old.label:  # conflict: split both radii
        book.put(new_ref, dataclasses.replace(new, radius=d / 2))
        book.put(near, dataclasses.replace(old, radius=d / 2 - SPLIT_MARGIN))
        return new_ref
    if d > old.radius:  # same label, outside: expand
        key = 0.5 * old.key + 0.5 * q if hp.eps_expand == "moving_average" else old.key
        book.put(near, dataclasses.replace(old, key=key, radius=d))
    return near


# --------------------------------------------------------------------------- the applied adaptor


class Adaptor:
    """The one forward hook of a wrapped layer: the union of the applied GRACE edits' codebooks."""

    ATTR: ClassVar[str] = "_kedit_grace_adaptor"

    def __init__(self, module: nn.Module) -> None:
        self.book = Codebook()
        self.joined: list[tuple[GRACEEdit, dict[Ref, Entry]]] = []
        self.module = module
        self.handle = module.register_forward_hook(self.hook)
        module.__dict__[self.ATTR] = self

    @classmethod
    def on(cls, module: nn.Module) -> Adaptor:
        return module.__dict__.get(cls.ATTR) or cls(module)

    def hook(self, _module: nn.Module, inputs: tuple, out: Tensor) -> Tensor:
        h = inputs[0]
        return route(h, out, *self.book.tables(h.device))

    def push(self, edit: GRACEEdit) -> None:
        try:
            self.joined.append((edit, self.book.join(edit)))
        finally:
            self.close_if_empty()

    def pop(self, edit: GRACEEdit) -> None:
        if not self.joined or self.joined[-1][0] is not edit:
            raise EditStateError("GRACE edits at one layer must be restored in reverse order of apply")
        self.book.leave(*self.joined.pop())
        self.close_if_empty()

    def close_if_empty(self) -> None:
        """The hook goes with the last edit (or with a first edit that failed to join)."""
        if not self.joined:
            self.handle.remove()
            self.module.__dict__.pop(self.ATTR, None)


# --------------------------------------------------------------------------- the edit


@dataclass
class GRACEEdit(Edit):
    """The entries one GRACE edit added at ``module``, and its changes to earlier edits' entries."""

    module: str
    entries: list[Entry] = field(default_factory=list)
    overrides: dict[Ref, Entry] = field(default_factory=dict)
    """Earlier entries' new state (split radius, expanded key, retrained value)."""
    base: dict[str, str] = field(default_factory=dict)
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)
    kind: ClassVar[str] = "grace"
    _module: nn.Module | None = field(default=None, repr=False)

    def own(self) -> dict[Ref, Entry]:
        return {(self.uid, i): e for i, e in enumerate(self.entries)}

    @property
    def is_applied(self) -> bool:
        return self._module is not None

    def check_base(self, model: nn.Module) -> None:
        if not self.base:
            return
        require_match(self.base, model, identity_names(model, self.module), "this GRACE edit",
                      "apply it to the model (and the edit stack) it was made on")

    def apply(self, model: nn.Module, check: bool = True) -> None:
        if self._module is not None:
            raise EditStateError("GRACE edit is already applied; restore it first")
        if check:
            self.check_base(model)
        module = model.get_submodule(self.module)
        Adaptor.on(module).push(self)
        self._module = module

    def restore(self, model: nn.Module) -> None:
        if self._module is None:
            raise EditStateError("GRACE edit is not applied")
        self._module.__dict__[Adaptor.ATTR].pop(self)
        self._module = None

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        refs = list(self.overrides)
        tensors = {**pack(self.entries, ""), **pack([self.overrides[r] for r in refs], "overrides.")}
        meta = {"module": self.module, "uid": self.uid, "base": self.base,
                "labels": [list(e.label) for e in self.entries],
                "overrides": [[uid, i, list(self.overrides[(uid, i)].label)] for uid, i in refs]}
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> GRACEEdit:
        labels = [labels_of(lab, f"meta.labels[{i}]") for i, lab in enumerate(require(meta, "labels", list))]
        refs, override_labels = [], []
        for i, row in enumerate(require(meta, "overrides", list)):
            if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str) and isinstance(row[1], int)):
                raise InvalidEditError(f"field 'meta.overrides[{i}]' is not [uid, index, label ids]")
            refs.append((row[0], row[1]))
            override_labels.append(labels_of(row[2], f"meta.overrides[{i}][2]"))
        entries = unpack(tensors, "", labels)
        overrides = unpack(tensors, "overrides.", override_labels)
        stray = set(tensors) - {f"{p}{t}" for p in ("", "overrides.") for t in ("keys", "values", "radii")}
        if stray:
            raise InvalidEditError(f"unexpected tensor {min(stray)!r}")
        return cls(module=require(meta, "module", str), entries=entries, overrides=dict(zip(refs, overrides)),
                   base=require_base(meta), uid=require(meta, "uid", str))


def pack(entries: Sequence[Entry], prefix: str) -> dict[str, Tensor]:
    if not entries:
        return {}
    return {f"{prefix}keys": torch.stack([e.key for e in entries]),
            f"{prefix}values": torch.stack([e.value for e in entries]),
            f"{prefix}radii": torch.tensor([e.radius for e in entries], dtype=torch.float64)}


def unpack(tensors: dict[str, Tensor], prefix: str, labels: list[tuple[int, ...]]) -> list[Entry]:
    """The entries of :func:`pack`'s tensors, checked against the labels' count."""
    names = [f"{prefix}{t}" for t in ("keys", "values", "radii")]
    if not labels and not any(n in tensors for n in names):
        return []
    for name, ndim in zip(names, (2, 2, 1)):
        t = tensors.get(name)
        if t is None:
            raise InvalidEditError(f"tensor {name!r} is missing")
        if t.ndim != ndim or len(t) != len(labels) or not t.is_floating_point() or not torch.isfinite(t).all():
            raise InvalidEditError(f"tensor {name!r} ({tuple(t.shape)}, {t.dtype}) is not a finite float tensor "
                                   f"of {ndim} dims with {len(labels)} rows (one per label)")
    keys, values, radii = (tensors[n] for n in names)
    return [Entry(k.float(), v.float(), float(r), lab) for k, v, r, lab in zip(keys, values, radii.tolist(), labels)]


def labels_of(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(t, int) for t in value):
        raise InvalidEditError(f"field {where!r} is not a non-empty list of token ids")
    return tuple(value)


def identity_names(model: nn.Module, module: str) -> list[str]:
    """The weights a GRACE edit's base identity hashes: the first block's MLP output (the keys
    depend on the blocks below), the wrapped layer's weight and the final norm (its outputs)."""
    arch = arch_of(model)
    params = dict(model.named_parameters())
    names = [arch.mlp_out_weight(0), f"{module}.weight", f"{arch.final_norm}.weight"]
    return [n for n in dict.fromkeys(names) if n in params]


# --------------------------------------------------------------------------- the editor


class GRACE(Editor):
    """GRACE: codebook maintenance and one trained value per request; weights untouched."""

    name = "grace"
    Hparams = GRACEHparams

    def layer(self, model: nn.Module) -> int:
        n = arch_of(model).num_layers(model)
        layer = self.hparams.layer
        return depth_layer(n, 27 / 32) if layer is None else check_layers([layer], n, "GRACE layer")[0]

    def edit(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest],
             history: Sequence[Edit] = ()) -> GRACEEdit:
        arch = arch_of(model)
        if arch.encoder_decoder:
            raise ValueError(f"GRACE in kedit edits decoder-only models; {model_name(model)!r} is encoder-decoder")
        name = arch.mlp_out_module(self.layer(model))
        book = Codebook.replay(e for e in history if isinstance(e, GRACEEdit) and e.module == name)
        before = dict(book.entries)
        edit = GRACEEdit(module=name)
        generator = torch.Generator().manual_seed(self.hparams.seed)
        for request in requests:
            self.edit_one(model, tokenizer, name, book, request, (edit.uid, len(edit.entries)), generator)
            edit.entries = [e for (uid, _), e in book.entries.items() if uid == edit.uid]
        edit.overrides = {ref: e for ref, e in book.entries.items() if ref in before and e is not before[ref]}
        edit.base = identity(model, identity_names(model, name))
        log.info("GRACE: %d new entries, %d changed, %d in the codebook at %s", len(edit.entries),
                 len(edit.overrides), len(book.entries), name)
        return edit

    def edit_one(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, name: str, book: Codebook,
                 request: EditRequest, new_ref: Ref, generator: torch.Generator) -> None:
        """Maintain ``book`` for one request's query and train the value it chose (in ``book``)."""
        module = model.get_submodule(name)
        device = next(module.parameters()).device
        batch = encode(tokenizer, [request.prompt], [request.target_new], device=device)
        t_star = int(batch["prompt_len"][0]) - 1  # the last prompt token
        with torch.no_grad(), trace(model, name, inputs=True, outputs=False, stop=name, detach=True) as seen:
            run_until(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            h = seen[name].input[0, t_star]
            if self.hparams.val_init == "warm":
                value = module.forward(h).float()  # f_l(q): forward skips the hooks
            else:
                value = torch.rand(module_dims(model, name)[1], generator=generator).to(device)
        label = tuple(target_ids(tokenizer, request.target_new))
        ref = maintain(book, new_ref, h.float(), value, label, self.hparams)
        book.put(ref, dataclasses.replace(book.entries[ref], value=self.train_value(model, batch, name, book,
                                                                                    ref, t_star)))

    def train_value(self, model: nn.Module, batch: dict[str, Tensor], name: str, book: Codebook,
                    ref: Ref, t_star: int) -> Tensor:
        """``n_iter`` Adam steps on the LM loss of prompt + target, the value at ``t*``; only the
        value gets gradients (``autograd.grad``: the model's ``.grad`` stay untouched)."""
        v = book.entries[ref].value.clone().requires_grad_(True)
        opt = torch.optim.Adam([v], lr=self.hparams.edit_lr)
        below = Replay(model, arch_of(model).blocks_below(model, name))  # they do not depend on v
        with injected(model.get_submodule(name), book, v, t_star):
            for _ in range(self.hparams.n_iter):
                with below():
                    loss = target_nll(model, batch)
                (v.grad,) = torch.autograd.grad(loss, [v])
                opt.step()
        log.debug("GRACE: value trained to loss %.4f", float(loss.detach()))
        return v.detach()


def module_dims(model: nn.Module, name: str) -> tuple[int, int]:
    """(d_in, d_out) of the wrapped projection."""
    weight = model.get_submodule(name).weight
    return tuple(arch_of(model).as_out_in(weight).shape[::-1])


@contextmanager
def injected(module: nn.Module, book: Codebook, value: Tensor, t_star: int) -> Iterator[None]:
    """While training: the layer routes through ``book`` (the codebook being edited, which replaces
    the applied adaptor's output) and outputs ``value`` at ``t*``."""

    def hook(mod: nn.Module, inputs: tuple, _out: Tensor) -> Tensor:
        h = inputs[0]
        out = route(h, mod.forward(h), *book.tables(h.device)).clone()
        out[:, t_star] = value.to(out.dtype)
        return out

    handle = module.register_forward_hook(hook)  # after the adaptor's hook: its output is replaced
    try:
        yield
    finally:
        handle.remove()

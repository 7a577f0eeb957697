"""The value step of ROME (Eq. 4) and MEMIT (Eq. 16): one vector ``δ`` per request, added at the
subject's last token (to the output of ``mlp_out`` for ROME, of a whole block for MEMIT), so that
the model predicts ``target_new``.

Three parts, each readable on its own:

* :func:`value_loss`: the objective, as in the papers: target NLL over the context templates,
  the KL "essence" term on ``"{subject} is a"`` and weight decay; :func:`clamp_norm` bounds
  ``‖δ‖`` after each step;
* :func:`optimize_values`: Adam on that objective, with per-request early stop;
* :func:`anchor_values` (Norm-Anchor Scaling, optional, after the optimization): the value is
  rescaled to a fixed norm measured once on the unedited model (:func:`anchor_norm`);
* the runners, which compute the logits of the rows for a given ``δ``:
  :class:`FullForward` (the reference: every row, the whole sequence, every step) and
  :class:`CachedSuffix` (the same logits, faster). ``tests/test_rome.py`` checks they agree.

Speed (:class:`CachedSuffix`). Nothing before the subject's last token depends on ``δ``: one
no-grad pass over those prefixes fills a KV cache, and each step runs only the few suffix tokens
(subject's last token, rest of the prompt, target) against it. Prefixes are left-padded so that
every suffix starts at the same column; suffixes are right-aligned (masked padding in between)
so that the vocabulary projection runs only on the last few columns, where the targets are. The
blocks below ``δ`` do not depend on it either: after the first step their output at the suffix
tokens is replayed (:func:`kedit.hooks.skip`). A request whose target is reached leaves the batch
(its rows and its prefix cache rows are dropped). Model weights are frozen (no weight gradients)
and the templates are batched into one forward.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
import logging
import math
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from kedit.atomic import read_cache, write_cache
from kedit.data.encode import IGNORE, encode, target_logprobs
from kedit.data.request import EditRequest
from kedit.editors.base import Edit
from kedit.editors.locate import (LocateHparams, Row, _cache_kwarg, _out_cache, frozen, progress, rewrite_rows,
                                  subject_last_index, unapplied)
from kedit.hooks import run_until, skip, trace
from kedit.models.arch import arch_of
from kedit.utils import kl_divergence, pad_id

log = logging.getLogger(__name__)

VALUE_FIELDS = ("v_lr", "v_steps", "v_stop_nll", "v_stop_argmax", "v_stop_prob", "v_weight_decay", "clamp_norm_factor",
                "kl_factor", "prefix_cache")
"""The hyperparameters the value step reads (with the templates): a cache of values keys on them."""


@dataclass
class Values:
    """Result of :func:`optimize_values`, one row per request."""

    delta: Tensor
    """(n, d): the optimized δ."""
    init: Tensor
    """(n, d): the original value at the subject's last token of the bare prompt."""
    template_keys: list[Tensor] | None
    """Per request, (templates, d_in): the input of ``mlp_out`` at the patch layer (ROME) at the
    subject's last token of each template, ``templates[0]`` (the bare prompt) first; else None."""
    steps: list[int]
    nll: list[float]
    skipped: list[int] = field(default_factory=list)
    """Requests whose write Norm-Anchor Scaling skipped (:func:`anchor_values`)."""

    @property
    def keys(self) -> Tensor | None:
        """(n, d_in): the template-averaged keys k* (ROME Eq. 3)."""
        return None if self.template_keys is None else torch.stack([k.mean(0) for k in self.template_keys])

    @property
    def bare_keys(self) -> Tensor | None:
        """(n, d_in): the bare prompt's keys (plain ROME's key)."""
        return None if self.template_keys is None else torch.stack([k[0] for k in self.template_keys])


# --------------------------------------------------------------------------- the objective


@dataclass
class RowTable:
    """The rows the runner computed in a step (a subset of the layout's rows)."""

    request: Tensor
    """(rows,): the request of each row."""
    rewrite: Tensor
    """(rows,) bool: a template filled with the prompt and the target (the NLL term)."""
    kl: Tensor
    """(rows,) bool: ``"{subject} is a"`` (the KL term)."""
    at: Tensor
    """(rows,): the subject's last token, as a column of the logits."""
    labels: Tensor
    """(rows, columns): target token ids where the NLL is read, else IGNORE."""
    templates: Tensor
    """(n,): rewrite rows per request (Nᵢ)."""


def value_loss(logits: Tensor, rows: RowTable, delta: Tensor, v_norm: Tensor, kl_init: Tensor,
               active: Tensor, hp: LocateHparams) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ROME Eq. 4 / MEMIT Eq. 16, for each request i (its templates xⱼ, prompt pᵢ, target o*ᵢ):

        L(δᵢ) = 1/Nᵢ Σⱼ -log P_δ(o*ᵢ | xⱼ ⊕ pᵢ) / |o*ᵢ|                   (target NLL per token)
              + kl_factor · KL(P_δ(· | "Sᵢ is a") ‖ P(· | "Sᵢ is a"))       (essence drift)
              + v_weight_decay · ‖δᵢ‖ / ‖vᵢ‖²                                (vᵢ: the original value)

    Returns the loss (n,) of the ``active`` requests (zero for those already stopped), the NLL
    term (n,), per request the number of rows whose target is not the argmax at every target
    token, and per request the least per-token target probability over its rows (the stop rules)."""
    n = len(delta)
    logp, correct, length = target_logprobs(logits[rows.rewrite], rows.labels[rows.rewrite])
    req = rows.request[rows.rewrite]
    nll = torch.zeros(n, device=delta.device).index_add(0, req, -logp / length.clamp(min=1)) / rows.templates
    missed = torch.zeros(n, device=delta.device).index_add(0, req, (correct < length).float())
    row_p = torch.exp(logp.detach() / length.clamp(min=1))
    least = torch.ones(n, device=delta.device).scatter_reduce(0, req, row_p, "amin")
    loss = nll
    if rows.kl.any():
        kl_logp = kl_logprobs(logits, rows)
        kl_row = kl_divergence(kl_logp, kl_init[rows.request[rows.kl]])  # KL(P_δ ‖ P)
        loss = loss + hp.kl_factor * torch.zeros(n, device=delta.device).index_add(0, rows.request[rows.kl], kl_row)
    loss = loss + hp.v_weight_decay * delta.norm(dim=-1) / v_norm ** 2
    return loss * active, nll, missed, least


def kl_logprobs(logits: Tensor, rows: RowTable) -> Tensor:
    """log P(· | "{subject} is a") at the subject's last token, one row per KL row."""
    return torch.log_softmax(logits[rows.kl, rows.at[rows.kl]].float(), dim=-1)


@torch.no_grad()
def clamp_norm(delta: Tensor, max_norm: Tensor) -> None:
    """``‖δᵢ‖ ≤ max_normᵢ``, in place (ROME: ``clamp_norm_factor`` times the original value's norm)."""
    norm = delta.norm(dim=-1)
    scale = torch.where(norm > max_norm, max_norm / norm.clamp(min=1e-12), torch.ones_like(norm))
    delta.mul_(scale[:, None])


# --------------------------------------------------------------------------- the optimization


def optimize_values(model: nn.Module, tokenizer, requests: Sequence[EditRequest], templates: Sequence[str],
                    module: str, hp: LocateHparams, want_keys: bool = False,
                    edit_right: Tensor | None = None) -> Values:
    """Optimize one δ per request, added to the output of ``module`` at the subject's last
    token of every template and of the KL prompt. ``templates[0]`` must be ``"{}"``.

    Edit-aware mode (``edit_right``, (n, d_in), ``module`` an ``mlp_out``): instead of adding
    δ at the subject's token only, add the exact effect of the final update
    ``ΔW = δᵀ edit_right`` on every position, ``Σᵢ δᵢ (edit_rightᵢ · x)``, so the optimized
    values account for the update's side effects on other tokens (and other requests)."""
    device = next(model.parameters()).device
    rows = rewrite_rows(requests, templates, kl=hp.kl_factor > 0)
    layout = Layout(tokenizer, requests, rows, device, use_prefix=hp.prefix_cache)
    runner_class = CachedSuffix if hp.prefix_cache else FullForward
    with frozen(model):
        runner = runner_class(model, layout, module, want_keys=want_keys, edit_right=edit_right)
        return _descend(runner, layout, len(requests), arch_of(model).mlp_dims(model, 0)[1], hp)


def _descend(runner: FullForward, layout: Layout, n: int, width: int, hp: LocateHparams) -> Values:
    """Adam on :func:`value_loss`; a request stops once its NLL is below ``v_stop_nll`` (or its
    target is the argmax everywhere, ``v_stop_argmax``, or has a per-token probability of at least
    ``v_stop_prob`` on every template) and keeps its δ from then on."""
    device = layout.request.device
    delta = torch.zeros(n, width, device=device, requires_grad=True)  # d_model: mlp_out and blocks output it
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    steps, last_nll = [hp.v_steps] * n, torch.zeros(n)
    kl_init = v_norm = None
    for step in range(hp.v_steps + 1):
        logits = runner(delta)
        rows = layout.table(runner.rows)
        if kl_init is None and rows.kl.any():  # δ = 0 at the first step, which sees every row
            kl_init = torch.zeros(n, logits.shape[-1], device=device)
            kl_init[rows.request[rows.kl]] = kl_logprobs(logits, rows).detach()
        if v_norm is None:
            v_norm = runner.init[layout.is_bare].norm(dim=-1)
        active = ~done
        loss, nll, missed, least = value_loss(logits, rows, delta, v_norm, kl_init, active, hp)
        last_nll[active.cpu()] = nll.detach().cpu()[active.cpu()]
        reached = nll.detach() < hp.v_stop_nll
        if hp.v_stop_argmax:
            reached |= missed == 0
        if hp.v_stop_prob > 0:
            reached |= least >= hp.v_stop_prob
        newly = reached & active
        for i in newly.nonzero().flatten().tolist():
            steps[i] = step
        done |= newly
        if bool(done.all()) or step == hp.v_steps:
            break
        opt.zero_grad()
        loss.sum().backward()
        keep_delta = delta.detach()[done].clone()
        opt.step()
        with torch.no_grad():
            if done.any():
                delta[done] = keep_delta
        clamp_norm(delta, hp.clamp_norm_factor * v_norm)
        if bool(newly.any()):
            runner.drop(done)
    per_template = None
    if runner.keys is not None:  # rows hold each request's templates in order, the bare prompt first
        per_template = [runner.keys[layout.is_rewrite & (layout.request == i)] for i in range(n)]
    log.debug("value optimization: steps %s, final nll %s", steps, last_nll.tolist())
    return Values(delta.detach(), runner.init[layout.is_bare], per_template, steps, last_nll.tolist())


# --------------------------------------------------------------------------- Norm-Anchor Scaling

ANCHOR_TRIM = 0.95
"""NAS's anchor: the mean of the lowest 95% of the pilot norms (the official ``vstar_stats``)."""


@dataclass
class NormAnchorHparams:
    """Norm-Anchor Scaling (Liu et al., arXiv:2602.02543), a switch of the locate-then-edit editors."""

    norm_anchor: bool = False
    """NAS: rescale each value v* = v0 + δ (v0: the edited MLP's output) to a fixed anchor norm measured
    once on the unedited model, bounding the growth of the edited weights over long edit sequences
    (off: the host papers' behaviour)."""
    anchor_samples: int = 1000
    """NAS: pilot requests whose mean ‖v*‖ is the anchor (random, seed 0, from ``anchor_requests``)."""
    anchor_requests: str = "counterfact"
    """NAS: the named dataset (or path) of the pilot requests (the paper: CounterFact)."""
    anchor_skip_factor: float = 2.0
    """NAS: a value with ‖v*‖ above this times the anchor is an outlier and its edit writes nothing."""


def anchor_values(v0: Tensor, delta: Tensor, anchor: float, skip_factor: float) -> tuple[Tensor, Tensor]:
    """NAS, after the δ optimization: the MLP output the edit asks for, ``v* = v0 + δ``, is set to
    the anchor norm ``a`` (``v* ← a v*/‖v*‖``, also when it is shorter); if ``‖v*‖ > skip_factor·a``
    the edit writes nothing (``v* ← v0``). The new target is ``z = (h − v0) + v* = h + (v* − v0)``.

    ``v0``, ``delta``: (n, d). Returns the new ``δ = v* − v0`` (n, d) and the skipped mask (n,)."""
    v_star = v0 + delta
    norm = v_star.norm(dim=-1, keepdim=True)
    skipped = norm[:, 0] > skip_factor * anchor
    anchored = anchor * v_star / norm.clamp(min=1e-12) - v0
    return torch.where(skipped[:, None], torch.zeros_like(delta), anchored), skipped


@torch.no_grad()
def mlp_outputs(model: nn.Module, tokenizer, requests: Sequence[EditRequest], layer: int) -> Tensor:
    """NAS's ``v0``: the output of ``layer``'s MLP at the subject's last token of the bare prompt, (n, d)."""
    name = arch_of(model).mlp_out_module(layer)
    rows = rewrite_rows(requests, ["{}"], kl=False)
    device = next(model.parameters()).device
    at = torch.tensor([subject_last_index(tokenizer, r.text, r.subject_end) for r in rows], device=device)
    batch = encode(tokenizer, [r.text[:r.subject_end] for r in rows], device=device)  # cut after the subject
    with frozen(model), trace(model, [name], stop=name, detach=True) as rec:
        run_until(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return rec[name].output[torch.arange(len(rows), device=device), at].float()


def trimmed_mean(norms: Tensor, keep: float = ANCHOR_TRIM) -> float:
    """The mean of ``norms`` without the largest ``floor((1 - keep) · n)`` values."""
    drop = math.floor((1 - keep) * len(norms))
    return float(norms.sort().values[:len(norms) - drop].mean())


def estimate_anchor(model: nn.Module, tokenizer, requests: Sequence[EditRequest], module: str, layer: int,
                    hp: LocateHparams) -> float:
    """NAS's anchor: the trimmed mean of ``‖v0 + δ‖`` over pilot ``requests``, each ``δ`` optimized
    at ``module`` on the bare prompt only (no context templates), KL prompt as set in ``hp``."""
    norms = []
    for b in progress(list(range(0, len(requests), hp.v_batch_size)), "NAS anchor", "batch"):
        batch = requests[b:b + hp.v_batch_size]
        vals = optimize_values(model, tokenizer, batch, ["{}"], module, hp)
        norms.append((mlp_outputs(model, tokenizer, batch, layer) + vals.delta).norm(dim=-1))
    return trimmed_mean(torch.cat(norms))


_ANCHORS: dict[str, float] = {}


def anchor_norm(model: nn.Module, tokenizer, layer: int, module: str, hp: LocateHparams,
                history: Sequence[Edit] = ()) -> float:
    """NAS's anchor for ``layer`` of the model as it was before ``history`` (never an edited model:
    pitfall 1 of the notes), memoized and cached on disk (``<stats cache>/anchors``), keyed by the
    weights' digest, the layer and module, the value settings and the pilot requests."""
    from kedit.data import load_requests
    from kedit.identity import config_key, state_digest
    from kedit.stats import stats_dir

    with unapplied(model, history):
        settings = {"model": config_key(model), "weights": state_digest(model), "layer": layer, "module": module,
                    "samples": hp.anchor_samples, "requests": str(hp.anchor_requests),
                    **{f: getattr(hp, f) for f in VALUE_FIELDS}}
        key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:24]
        if key in _ANCHORS:
            return _ANCHORS[key]
        path = stats_dir(hp.stats_cache_dir) / "anchors" / f"{key}.json"
        cached = read_cache(path, lambda p: float(json.loads(p.read_text())["anchor"]), "NAS anchor")
        if cached is None:
            pool = load_requests(hp.anchor_requests)
            pilot = random.Random(0).sample(pool, min(hp.anchor_samples, len(pool)))
            if len(pilot) < hp.anchor_samples:
                log.warning("NAS: %d pilot requests in %s, fewer than anchor_samples=%d",
                            len(pilot), hp.anchor_requests, hp.anchor_samples)
            log.info("NAS: estimating the anchor at layer %d from %d pilot requests (once per model and "
                     "layer; cached in %s)", layer, len(pilot), path.parent)
            cached = estimate_anchor(model, tokenizer, pilot, module, layer, hp)
            log.info("NAS: anchor %.4g at layer %d from %d pilot requests", cached, layer, len(pilot))
            write_cache(path, lambda tmp: tmp.write_text(json.dumps({"anchor": cached, **settings}, default=str)),
                        "NAS anchor")
        _ANCHORS[key] = cached
        return cached


# --------------------------------------------------------------------------- rows


class Layout:
    """The rows as token tensors, split at the subject's last token (``use_prefix``; else at 0):
    left-padded prefixes, right-aligned suffixes (masked padding in between), so that every
    row's targets sit in the last ``keep`` columns."""

    def __init__(self, tokenizer, requests: Sequence[EditRequest], rows: list[Row], device, use_prefix: bool = True):
        seqs = _token_rows(tokenizer, requests, rows)
        subject = [subject_last_index(tokenizer, r.text, r.subject_end) for r in rows]
        split = subject if use_prefix else [0] * len(rows)
        pad = pad_id(tokenizer)
        P = max(split)
        S = max(len(ids) - s for (ids, _), s in zip(seqs, split))
        pre_ids, pre_mask, suf_ids, suf_mask, suf_lab, suf_pos = [], [], [], [], [], []
        for (ids, lab), s in zip(seqs, split):
            pre_ids.append([pad] * (P - s) + ids[:s])
            pre_mask.append([0] * (P - s) + [1] * s)
            k = len(ids) - s
            suf_ids.append([pad] * (S - k) + ids[s:])
            suf_mask.append([0] * (S - k) + [1] * k)
            suf_lab.append([IGNORE] * (S - k) + lab[s:])
            suf_pos.append([s] * (S - k) + list(range(s, s + k)))
        at = [S - (len(ids) - s) + (a - s) for (ids, _), a, s in zip(seqs, subject, split)]
        # the leftmost column whose logits are used: a target's predicting position or a KL token
        first = S - 1
        for j, (row, lab) in enumerate(zip(rows, suf_lab)):
            cols = [c for c, x in enumerate(lab) if x != IGNORE]
            if cols:
                first = min(first, cols[0] - 1)
            if row.kind == "kl":
                first = min(first, at[j])
        t = lambda x: torch.tensor(x, device=device)
        self.prefix_len = P
        self.keep = S - max(first, 0)
        """Number of last suffix columns whose logits the loss reads."""
        self.pre_ids, self.pre_mask = t(pre_ids), t(pre_mask)
        self.pre_pos = (self.pre_mask.cumsum(-1) - 1).clamp(min=0)
        self.suf_ids, self.suf_labels, self.suf_pos = t(suf_ids), t(suf_lab), t(suf_pos)
        self.mask = torch.cat([self.pre_mask, t(suf_mask)], dim=1) if P else t(suf_mask)
        self.request = t([r.request for r in rows])
        self.is_rewrite = t([r.kind == "rewrite" for r in rows])
        self.is_kl = t([r.kind == "kl" for r in rows])
        self.is_bare = t([r.kind == "rewrite" and r.template == 0 for r in rows])
        self.at = t(at)  # subject's last token within the suffix
        self.templates = torch.zeros(len(requests), device=device).index_add_(
            0, self.request[self.is_rewrite], torch.ones(int(self.is_rewrite.sum()), device=device))
        """(n,): rewrite rows per request."""

    def table(self, sel: Tensor) -> RowTable:
        """The rows ``sel``, with columns counted within the last ``keep``."""
        return RowTable(self.request[sel], self.is_rewrite[sel], self.is_kl[sel],
                        self.at[sel] - (self.suf_ids.shape[1] - self.keep), self.suf_labels[sel][:, -self.keep:],
                        self.templates)


def _token_rows(tokenizer, requests: Sequence[EditRequest], rows: list[Row]) -> list[tuple[list[int], list[int]]]:
    """(token ids, labels) of each row: a template with its target, or a KL prompt (no labels)."""
    rw = [i for i, r in enumerate(rows) if r.kind == "rewrite"]
    enc_rw = encode(tokenizer, [rows[i].text for i in rw], [requests[rows[i].request].target_new for i in rw])
    kl = [i for i, r in enumerate(rows) if r.kind == "kl"]
    enc_kl = encode(tokenizer, [rows[i].text for i in kl]) if kl else None
    seqs: list[tuple[list[int], list[int]]] = [None] * len(rows)  # type: ignore[list-item]
    for j, i in enumerate(rw):
        m = int(enc_rw["attention_mask"][j].sum())
        seqs[i] = (enc_rw["input_ids"][j, :m].tolist(), enc_rw["labels"][j, :m].tolist())
    for j, i in enumerate(kl):
        m = int(enc_kl["attention_mask"][j].sum())
        seqs[i] = (enc_kl["input_ids"][j, :m].tolist(), [IGNORE] * m)
    return seqs


# --------------------------------------------------------------------------- runners


class FullForward:
    """The reference runner: the logits of every row, whole sequences, every step.

    ``runner(delta)`` returns ``(rows, keep, vocab)``; after the first call ``init`` holds the
    original value at each row's subject token and ``keys`` (``want_keys``) the input of
    ``module`` there."""

    def __init__(self, model: nn.Module, layout: Layout, module: str, want_keys: bool = False,
                 edit_right: Tensor | None = None) -> None:
        self.model, self.layout, self.module = model, layout, module
        self.want_keys, self.edit_right = want_keys, edit_right
        self.rows = torch.arange(len(layout.request), device=layout.request.device)
        """The rows computed by the next call."""
        self.init: Tensor | None = None
        self.keys: Tensor | None = None

    def __call__(self, delta: Tensor) -> Tensor:
        L = self.layout
        with self.shifted(delta):
            logits = self.model(input_ids=L.suf_ids, attention_mask=L.mask, position_ids=L.suf_pos,
                                use_cache=False).logits
        return logits[:, -L.keep:]

    def drop(self, done: Tensor) -> None:
        """Requests ``done`` need no more logits (the reference computes them anyway)."""

    @contextmanager
    def shifted(self, delta: Tensor) -> Iterator[None]:
        """``module``'s output with δ: added at the subject's last token, or (edit-aware) the
        effect ``(x · edit_right) δ`` of the final update on every token."""
        L, rows, first = self.layout, self.rows, self.init is None
        ar = torch.arange(len(rows), device=rows.device)
        at = L.at[rows]
        read_input = (self.want_keys and first) or self.edit_right is not None

        def shift(_name: str, y: Tensor) -> Tensor:
            if self.init is None:
                self.init = y[ar, at].detach().float()
            if self.edit_right is not None:
                x = rec[self.module].input.float()
                return y + ((x @ self.edit_right.T) @ delta).to(y.dtype)
            add = torch.zeros_like(y)
            add[ar, at] = delta[L.request[rows]].to(y.dtype)
            return y + add

        with trace(self.model, [self.module], inputs=read_input, outputs=False, edit_output=shift) as rec:
            yield
        if self.want_keys and first:
            self.keys = rec[self.module].input[ar, at].detach().float()


class CachedSuffix(FullForward):
    """The fast runner: the suffixes against a KV cache of the prefixes, the blocks below δ
    replayed after the first step, and the rows of finished requests dropped."""

    def __init__(self, model: nn.Module, layout: Layout, module: str, want_keys: bool = False,
                 edit_right: Tensor | None = None) -> None:
        super().__init__(model, layout, module, want_keys, edit_right)
        self.can_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.prefix = self.cache = None
        if layout.prefix_len > 0:
            extra = {"logits_to_keep": 1} if self.can_keep else {}
            with torch.no_grad():
                out = model(input_ids=layout.pre_ids, attention_mask=layout.pre_mask, position_ids=layout.pre_pos,
                            use_cache=True, **extra)
            self.prefix = self.cache = _out_cache(out)
        below = _last_constant_block(model, module)
        self.below = [arch_of(model).block(i) for i in range(below + 1)] if below is not None else []
        """Blocks whose output does not depend on δ, lowest first."""
        self.replay: Tensor | None = None
        """The output of ``below[-1]`` for every row (recorded in the first step)."""

    def __call__(self, delta: Tensor) -> Tensor:
        L, sel = self.layout, self.rows
        kwargs = {"logits_to_keep": L.keep} if self.can_keep else {}
        if self.cache is not None:
            kwargs[_cache_kwarg(self.model)] = copy.deepcopy(self.cache)
        record = self.below and self.init is None
        with contextlib.ExitStack() as stack:
            if self.replay is not None:
                stack.enter_context(skip(self.model, self.below, self.replay[sel]))
            elif record:
                rec = stack.enter_context(trace(self.model, self.below[-1:], detach=True))
            stack.enter_context(self.shifted(delta))
            logits = self.model(input_ids=L.suf_ids[sel], attention_mask=L.mask[sel], position_ids=L.suf_pos[sel],
                                use_cache=self.cache is not None, **kwargs).logits
        if record and not rec[self.below[-1]].in_tuple:  # replay returns a plain tensor
            self.replay = rec[self.below[-1]].output
        return logits[:, -L.keep:]

    def drop(self, done: Tensor) -> None:
        """Drop the rows of finished requests (and their prefix cache rows)."""
        sel = (~done[self.layout.request]).nonzero().flatten()
        if self.prefix is not None:
            if not hasattr(self.prefix, "batch_select_indices"):
                return  # no cache row selection: keep computing every row
            cache = copy.deepcopy(self.prefix)
            cache.batch_select_indices(sel)
            self.cache = cache
        self.rows = sel


def _last_constant_block(model: nn.Module, module: str) -> int | None:
    """The highest block whose output does not depend on a δ added at ``module``: the block
    ``module`` is (MEMIT), or the one below the block holding it (ROME). None: no such block."""
    arch = arch_of(model)
    for layer in range(arch.num_layers(model)):
        name = arch.block(layer)
        if module == name:
            return layer
        if module.startswith(name + "."):
            return layer - 1 if layer > 0 else None
    return None

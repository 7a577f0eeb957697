"""``evaluate(model, tok, editor, requests, mode=...)``: the same evaluation for every editor.

The runner knows only the editing interface: ``Editor.edit`` returns an ``Edit`` with
``apply`` / ``restore`` / ``applied``, and sequential edits go on an ``EditStack``. It never
asks which method made an edit.

Modes
-----
single      each request alone: edit, evaluate, restore (checked bit-exact).
batch       chunks of ``batch_size`` requests (default: all) as one edit each.
sequential  steps of ``batch_size`` requests (default 1), each edit computed on the model
            edited by the steps before; every request is evaluated at the end, and at
            checkpoints a retention curve and a perplexity curve are recorded.

Pre-edit scores are measured on the unedited model for every request and reported next
to post-edit ones.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, is_dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from kedit.data.request import EditRequest
from kedit.editors.base import Edit, Editor, EditStack
from kedit.eval import metrics as M
from kedit.eval.resume import Checkpoint, requests_digest
from kedit.eval.results import METRICS, Results
from kedit.eval.scorer import Ref, Scorer
from kedit.eval.scoring import model_device
from kedit.identity import fingerprint, full_hash_default, state_digest
from kedit.utils import chunks, peak_rss_mb, release_free_memory

log = logging.getLogger(__name__)

MODES = ("single", "batch", "sequential")


@dataclass
class EvalConfig:
    """What to measure and how much compute to spend on it."""

    batch_size: int = 32
    """Prompts per forward pass / generate call."""
    generation: bool = True
    """Also measure generation-based success (greedy decoding) beside teacher forcing."""
    gen_extra_tokens: int = 3
    """Tokens generated beyond the answer's own token length for generation-based success."""
    fluency: bool = True
    """Measure ROME's n-gram entropy of greedy generations from the generation prompts."""
    fluency_new_tokens: int = 64
    """Tokens generated per generation prompt for fluency."""
    max_generation_prompts: int | None = None
    """Use at most this many distinct generation prompts per request (None: all)."""
    perplexity: bool = True
    """Measure perplexity on held text before and after editing."""
    ppl_path: str | None = None
    """Held text for perplexity (JSONL with a 'text' field, or plain text); None: the packaged
    Wikipedia sample (:data:`kedit.paths.HELD_TEXT`, disjoint from the statistics corpus)."""
    ppl_docs: int = 4
    """Documents of held text used for perplexity."""
    ppl_tokens: int = 256
    """Tokens per document used for perplexity."""
    ppl_every: int = 1
    """Single and batch modes: measure the post-edit perplexity after the 1st, (1+k)th, (1+2k)th...
    edit only (k = ``ppl_every``; 1: after every edit). On a CPU it is the largest part of a single-mode
    run's scoring. The post-edit perplexity pools the edits measured; the others' records hold NaN."""
    curve_every: int = 0
    """Sequential mode: record the retention/perplexity curve every this many edited requests (0: ~10 points)."""
    curve_at: list[int] | None = None
    """Sequential mode: record the curve after these numbers of edited requests instead (the first step
    boundary at or past each; and at the end); ``curve_every`` is then ignored."""
    curve_full: bool = False
    """Sequential mode: curve points also score the paraphrases and the neighborhood (locality) of the
    requests edited so far, against pre-edit references measured before the first edit (and fluency,
    if on); else the edit prompts only. The references stay in memory: one next-token distribution
    per neighborhood prompt of every request (zsRE: one; CounterFact: ten)."""
    curve_generation: bool = True
    """Sequential mode: include generation-based success in the retention curve."""
    eval_group: int = 16
    """Requests scored together (pre-edit references of a group are held in memory)."""
    checkpoint_every: int = 0
    """Sequential mode with a ``checkpoint`` folder: also save the run every this many edited
    requests (at step boundaries); 0: at the curve points only."""
    check_restore: bool = True
    """Check after each restore that the model is bit-exactly what it was (its fingerprint,
    :func:`kedit.identity.fingerprint`), and compare a digest of all weights at the start and
    the end: the cheap per-row digest, or a full sha256 with ``KEDIT_FULL_HASH=1``."""

    def __post_init__(self) -> None:
        if self.ppl_every < 1:
            raise ValueError(f"EvalConfig.ppl_every must be >= 1 (1: after every edit), got {self.ppl_every}")


CURVE_FULL = ("paraphrase/es", "paraphrase/acc", "paraphrase/gen", "neighborhood/ns", "neighborhood/agree",
              "neighborhood/kl")
"""The curve's metrics beyond the edit prompt's with ``curve_full`` (those a request has)."""


class RestoreError(RuntimeError):
    """The model is not bit-exactly the original after an edit was restored."""


# --------------------------------------------------------------------------- evaluate


def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    editor: Editor,
    requests: Any,
    mode: str = "single",
    batch_size: int | None = None,
    config: EvalConfig | None = None,
    progress: bool = True,
    on_result: Callable[[int, dict[str, Any]], None] | None = None,
    reuse_pre: Results | None = None,
    on_curve: Callable[[dict[str, Any]], None] | None = None,
    checkpoint: str | Path | None = None,
    **overrides: Any,
) -> Results:
    """Edit and evaluate ``requests`` in ``mode``; the model is returned unedited (checked).

    ``batch_size``: requests per edit in ``batch`` (default all) and ``sequential`` (default
    1) modes. ``config`` / keyword ``overrides`` set :class:`EvalConfig` fields.
    ``on_result(index, record)`` is called as each request's scores are ready.
    ``reuse_pre``: the results of an earlier run on the same model, requests and config;
    its pre-edit scores are taken instead of measured again (only the pre-edit references
    for KL / agreement are recomputed). Comparing several editors, this halves the work.
    ``on_curve(point)``: sequential mode, called with each retention/perplexity curve point as
    it is measured (to save partial results of long runs); a resumed run first calls it with
    each point restored from the checkpoint, in order, so it sees the whole curve either way.
    ``checkpoint``: sequential mode, a folder where the run is saved at its curve points (and
    every ``checkpoint_every`` requests) and from which a run with the same requests, editor
    and settings resumes (:mod:`kedit.eval.resume`); its files are removed when the run ends.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    cfg = replace(config or EvalConfig(), **overrides)
    reqs = _as_requests(requests)
    if not reqs:
        raise ValueError("no requests to evaluate")
    step = _step(mode, batch_size, len(reqs))
    if checkpoint is not None and mode != "sequential":
        raise ValueError(f"checkpoint: only sequential runs are checkpointed (mode={mode!r})")
    reused = _check_reuse(reuse_pre, reqs, cfg)
    was_training = model.training
    model.eval()
    start_hash = state_digest(model, full=full_hash_default()) if cfg.check_restore else None
    bar = tqdm(total=len(reqs), desc=f"{mode} {type(editor).__name__}", unit="req", disable=not progress)
    run = _Run(model, tokenizer, editor, reqs, cfg, reused, bar, on_result, on_curve)
    if checkpoint is not None:
        run.checkpoint = Checkpoint(checkpoint, {
            "requests": requests_digest(reqs), "n_requests": len(reqs), "step": step,
            "editor": type(editor).__name__, "hparams": _jsonable(getattr(editor, "hparams", None)),
            "config": {k: v for k, v in asdict(cfg).items() if k not in _NOT_SCORING}})
    try:
        ppl_post = {"single": run.single, "batch": run.batch, "sequential": run.sequential}[mode](step)
    finally:
        run.bar.close()
        if was_training:
            model.train()
    if cfg.check_restore and state_digest(model, full=full_hash_default()) != start_hash:
        raise RestoreError("the model's weights differ from the start of the evaluation (sha256)")
    results = run.results(mode, step, ppl_post)
    if run.checkpoint is not None:
        run.checkpoint.clear()
    return results


def _step(mode: str, batch_size: int | None, n: int) -> int:
    """Requests per edit: single 1, batch all, sequential 1, unless ``batch_size`` says otherwise."""
    step = {"single": 1, "batch": n, "sequential": 1}[mode] if batch_size is None else batch_size
    if step < 1:
        raise ValueError(f"batch_size must be >= 1, got {step}")
    if mode == "single" and step != 1:
        log.info("single mode edits one request at a time; batch_size=%d ignored", step)
        step = 1
    return step


# --------------------------------------------------------------------------- the run


class _Run:
    """One evaluation: the model, editor, requests and settings, and the records measured so far.

    Each mode returns the post-edit perplexity of held text as (summed NLL, tokens)."""

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, editor: Editor,
                 requests: list[EditRequest], cfg: EvalConfig, reused: Results | None, bar: tqdm,
                 on_result: Callable[[int, dict[str, Any]], None] | None,
                 on_curve: Callable[[dict[str, Any]], None] | None):
        self.model, self.tok, self.editor, self.reqs, self.cfg = model, tokenizer, editor, requests, cfg
        self.reused, self.bar, self.on_result, self.on_curve = reused, bar, on_result, on_curve
        self.scorer = Scorer(model, tokenizer, cfg)
        self.timer = _Timer(model_device(model))
        self.start_print = fingerprint(model) if cfg.check_restore else None
        self.t_start = time.perf_counter()
        self.records: list[dict[str, Any]] = [
            {"index": i, "case_id": r.case_id, "prompt": r.prompt, "target_new": r.target_new,
             "target_true": r.target_true} for i, r in enumerate(requests)]
        self.curves: list[dict[str, Any]] = []
        self.checkpoint: Checkpoint | None = None
        self.resumed_at, self.resumed_seconds = 0, 0.0
        if reused is not None and reused.meta.get("ppl_pre_tokens") is not None:
            self.ppl_pre = (reused.meta["ppl_pre_nll"], reused.meta["ppl_pre_tokens"])
        else:
            self.ppl_pre = self.scorer.perplexity()

    # ----------------------------------------------------------------------- modes

    def single(self, step: int) -> tuple[float, int]:
        """Each request alone: edit, score, restore. Pre-edit passes run over ``eval_group`` requests."""
        ppls = []
        for group in chunks(range(len(self.reqs)), self.cfg.eval_group):
            pre, refs = self._pre(group)
            for i, a, ref in zip(group, pre, refs):
                edit = self._edit([i])
                (b,), ppl = self._post(edit, [i], [ref], [i], with_ppl=i % self.cfg.ppl_every == 0)
                self._done(i, a, b, ppl)
                ppls.append(ppl)
        return _pooled(ppls)

    def batch(self, step: int) -> tuple[float, int]:
        """Chunks of ``step`` requests, one edit each, scored in sub-groups of ``eval_group``
        (pre-edit references of a sub-group only are held in memory)."""
        ppls = []
        for k, chunk in enumerate(chunks(range(len(self.reqs)), step)):
            edit = self._edit(chunk)
            scored = []
            subs = chunks(chunk, self.cfg.eval_group)
            for sub in subs:
                pre, refs = self._pre(sub)
                post, ppl = self._post(edit, sub, refs, chunk,
                                       with_ppl=sub is subs[-1] and k % self.cfg.ppl_every == 0)
                scored += zip(sub, pre, post)
            for i, a, b in scored:
                self._done(i, a, b, ppl)
            ppls.append(ppl)
        return _pooled(ppls)

    def sequential(self, step: int) -> tuple[float, int]:
        """Steps of ``step`` requests, each edit computed on the model edited by the steps before
        (``history``); curve points at checkpoints; every request scored on the whole stack."""
        n = len(self.reqs)
        points = _curve_checkpoints(n, step, self.cfg.curve_every, self.cfg.curve_at)
        stack, done = self._resume()  # first: a checkpoint of another run is refused before the long pre-edit pass
        # with full curves: every request's pre-edit scores and references now, on the unedited model, in one pass
        pre_all, refs = self._pre(list(range(n))) if self.cfg.curve_full else (None, None)
        if not done:
            self._curve_point(0, min(points), refs)
        every = self.cfg.checkpoint_every
        seen: list[dict[str, float]] = []
        try:
            if stack.edits:
                stack.apply(self.model)  # each edit checks its base weights: another model is refused
            for chunk in chunks(range(done, n), step):
                edit = self._edit(chunk, history=stack)
                if stack.is_applied:
                    stack.push(edit, self.model)
                else:
                    stack.push(edit)
                    stack.apply(self.model)
                release_free_memory()  # else glibc keeps each step's freed memory: RSS grows by GBs over long runs
                end = chunk[-1] + 1
                if end in points:
                    ppl_post, seen = self._curve_point(end, min(points), refs)  # the last one is at n
                if self.checkpoint is not None and end < n and (end in points or (every and end % every == 0)):
                    self.checkpoint.save(stack, end, time.perf_counter() - self.t_start, self.timer.seconds,
                                         self.timer.cuda_peaks,
                                         [{k: r.get(k) for k in ("edit_seconds", "edit_cpu_seconds", "edit_step")}
                                          for r in self.records[:end]],
                                         self.curves, self.timer.cpu_seconds)
        finally:
            stack.restore(self.model)
        self._check("after restoring the sequential edit stack")
        # the last curve point scored every request on the whole stack, as the final scoring does
        last = seen if refs is not None and self.cfg.curve_generation and len(seen) >= n else None
        for group in chunks(range(n), self.cfg.eval_group):
            if pre_all is not None:
                pre, group_refs = [pre_all[i] for i in group], [refs[i] for i in group]
            else:
                pre, group_refs = self._pre(group)
            if last is not None:
                post = [last[i] for i in group]
            else:
                with stack.applied(self.model):
                    post, _ = self.scorer.score([self.reqs[i] for i in group], group_refs)
                self._check(f"after restoring the stack (final scoring of requests {group[0]}..{group[-1]})")
            for i, a, b in zip(group, pre, post):
                self._done(i, a, b, ppl_post)
        return ppl_post

    def _resume(self) -> tuple[EditStack, int]:
        """The stack (not applied) and the requests it edited: from the checkpoint, if one was
        saved, with the edit times and the curve so far; else empty."""
        saved = None if self.checkpoint is None else self.checkpoint.load()
        if saved is None:
            return EditStack(), 0
        self.timer.seconds, self.timer.cuda_peaks = list(saved.edit_seconds), list(saved.cuda_peaks)
        self.timer.cpu_seconds = list(saved.edit_cpu_seconds)
        for record, fields in zip(self.records, saved.records):
            record.update(fields)
        self.curves = list(saved.curves)
        if self.on_curve is not None:
            for point in self.curves:  # measured by the stopped run: replayed so the caller sees the whole curve
                self.on_curve(point)
        self.resumed_at, self.resumed_seconds = saved.done, saved.seconds
        self.t_start -= saved.seconds
        self.bar.update(saved.done)
        return saved.stack, saved.done

    # ----------------------------------------------------------------------- steps

    def _edit(self, ids: list[int], history: EditStack | None = None) -> Edit:
        """The edit of requests ``ids``; without ``history`` the model is unedited, and checked to stay so."""
        reqs = [self.reqs[i] for i in ids]
        edit, dt = self.timer.edit(self.editor, self.model, self.tok, reqs, () if history is None else history)
        if history is None:
            self._check("after Editor.edit (edit() must not change the model)")
        for i in ids:
            self.records[i].update(edit_seconds=dt / len(ids), edit_cpu_seconds=self.timer.cpu_seconds[-1] / len(ids),
                                   edit_step=len(self.timer.seconds) - 1)
        self.bar.update(len(ids))
        self.bar.set_postfix(edit_s=f"{dt:.2f}")
        return edit

    def _pre(self, ids: list[int]) -> tuple[list[dict[str, float]], list[Ref]]:
        """Pre-edit scores and references: measured, or taken from ``reuse_pre`` (references measured)."""
        reqs = [self.reqs[i] for i in ids]
        if self.reused is None:
            return self.scorer.score(reqs)
        pre = [{k: float("nan") if v is None else v for k, v in self.reused.per_request[i]["pre"].items()
                if k != "general/ppl"} for i in ids]
        return pre, self.scorer.refs(reqs)

    def _post(self, edit: Edit, ids: list[int], refs: list[Ref], edited: list[int],
              with_ppl: bool) -> tuple[list[dict[str, float]], tuple[float, int] | None]:
        """Scores of ``ids`` (and the perplexity) with ``edit`` (of the ``edited`` requests) applied."""
        with edit.applied(self.model):
            post, _ = self.scorer.score([self.reqs[i] for i in ids], refs)
            ppl = self.scorer.perplexity() if with_ppl else None
        self._check(f"after restoring the edit of request(s) {edited[0]}..{edited[-1]}")
        return post, ppl

    def _curve_point(self, n_edits: int, first_k: int,
                     refs: list[Ref] | None = None) -> tuple[tuple[float, int], list[dict[str, float]]]:
        """Rewrite scores (with pre-edit ``refs``, all scores) of the requests edited so far and of
        the first ``first_k``, the perplexity and the mean edit time so far, on the model as it is
        now; returns the perplexity's (NLL, tokens) and the scores of the requests scored."""
        gen = self.cfg.curve_generation and self.cfg.generation
        count = max(n_edits, first_k)
        seen, _ = self.scorer.score(self.reqs[:count], None if refs is None else refs[:count], light=refs is None,
                                    generation=gen)
        point: dict[str, Any] = {"n_edits": n_edits}
        rewrite = ("rewrite/es", "rewrite/acc", "rewrite/gen")
        for key in rewrite + (() if refs is None else CURVE_FULL):
            if n_edits:
                point[f"seen:{key}"] = M.nanmean([m.get(key, float("nan")) for m in seen[:n_edits]])
            if key in rewrite:
                point[f"first{first_k}:{key}"] = M.nanmean([m.get(key, float("nan")) for m in seen[:first_k]])
        ppl = self.scorer.perplexity()
        point["general/ppl"] = M.perplexity(*ppl)
        if self.timer.seconds:
            point["edit_seconds_mean"] = sum(self.timer.seconds) / len(self.timer.seconds)
        self.curves.append(point)
        if self.on_curve is not None:
            self.on_curve(point)
        if n_edits:
            log.info("sequential: %d edits: %s", n_edits, point)
        return ppl, seen

    def _done(self, i: int, pre: dict[str, float], post: dict[str, float],
              ppl_post: tuple[float, int] | None) -> None:
        """Record request ``i``'s scores; ``ppl_post`` None: perplexity not measured after its edit."""
        pre["general/ppl"] = M.perplexity(*self.ppl_pre)
        post["general/ppl"] = float("nan") if ppl_post is None else M.perplexity(*ppl_post)
        self.records[i].update(pre=pre, post=post)
        if self.on_result is not None:
            self.on_result(i, self.records[i])

    def _check(self, where: str) -> None:
        if self.cfg.check_restore and fingerprint(self.model) != self.start_print:
            raise RestoreError(f"the model is not bit-exactly restored {where}")

    # ----------------------------------------------------------------------- results

    def results(self, mode: str, step: int, ppl_post: tuple[float, int]) -> Results:
        seconds, model = self.timer.seconds, self.model
        meta = {
            "mode": mode,
            "batch_size": step,
            "n_requests": len(self.reqs),
            "n_edits": len(seconds),
            "editor": repr(self.editor),
            "editor_name": type(self.editor).__name__,
            "hparams": _jsonable(getattr(self.editor, "hparams", None)),
            "model": getattr(getattr(model, "config", None), "_name_or_path", type(model).__name__),
            "device": str(model_device(model)),
            "dtype": str(next(model.parameters()).dtype),
            "edit_seconds": seconds,
            "edit_seconds_mean": sum(seconds) / len(seconds) if seconds else None,
            "edit_seconds_median": statistics.median(seconds) if seconds else None,
            "edit_cpu_seconds": self.timer.cpu_seconds,
            "edit_cpu_seconds_mean": _mean_known(self.timer.cpu_seconds),
            "edit_seconds_per_request": sum(seconds) / len(self.reqs) if seconds else None,
            "edit_seconds_total": sum(seconds),
            "eval_seconds": time.perf_counter() - self.t_start,
            "resumed_at": self.resumed_at,
            "resumed_seconds": self.resumed_seconds,
            "peak_rss_mb": peak_rss_mb(),
            "cuda_peak_mb": max(self.timer.cuda_peaks) if self.timer.cuda_peaks else None,
            "config": asdict(self.cfg),
            "restore_checked": self.cfg.check_restore,
            "pre_reused": self.reused is not None,
            "ppl_pre_nll": self.ppl_pre[0],
            "ppl_pre_tokens": self.ppl_pre[1],
            "metrics": METRICS,
        }
        return Results(summary=_summarize(self.records, self.ppl_pre, ppl_post), per_request=self.records,
                       curves=self.curves, meta=meta)


# --------------------------------------------------------------------------- helpers


class _Timer:
    """Edit time and peak memory of each ``Editor.edit`` call."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds: list[float] = []
        self.cpu_seconds: list[float | None] = []  # None: an edit made before a resume by a run that did not record it
        self.cuda_peaks: list[float] = []

    def edit(self, editor: Editor, model: nn.Module, tok: PreTrainedTokenizerBase,
             requests: list[EditRequest], history: Sequence[Edit] = ()) -> tuple[Edit, float]:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0, c0 = time.perf_counter(), time.process_time()
        edit = editor.edit(model, tok, requests, history=history)
        if self.cuda:
            torch.cuda.synchronize()
            self.cuda_peaks.append(torch.cuda.max_memory_allocated() / 2**20)
        dt = time.perf_counter() - t0
        self.seconds.append(dt)
        # CPU seconds of the process (all threads): unlike wall time, not inflated by a paused
        # process or by other jobs on the machine
        self.cpu_seconds.append(time.process_time() - c0)
        return edit, dt


def _mean_known(values: Sequence[float | None]) -> float | None:
    """The mean of the values that are not None (None if none is)."""
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _as_requests(requests: Any) -> list[EditRequest]:
    if isinstance(requests, EditRequest):
        return [requests]
    if isinstance(requests, list) and all(isinstance(r, EditRequest) for r in requests):
        return requests
    from kedit.editors.base import as_requests

    return as_requests(requests)


def _pooled(ppls: list[tuple[float, int] | None]) -> tuple[float, int]:
    """Perplexities measured after several edits, pooled: summed NLL and summed tokens (None: not measured)."""
    got = [p for p in ppls if p is not None]
    return sum(p[0] for p in got), sum(p[1] for p in got)


def _curve_checkpoints(n: int, step: int, every: int, at: Sequence[int] | None = None) -> set[int]:
    """Edited-request counts after which the curve is measured: multiples of ``every`` (or the
    counts ``at``), at step boundaries, and the end."""
    ends = list(range(step, n, step)) + [n]
    if at:
        return {min(e for e in ends if e >= a) for a in at if a <= n} | {n}
    if every <= 0:
        every = max(step, math.ceil(n / 10))
    points, next_mark = set(), every
    for e in ends:
        if e >= next_mark:
            points.add(e)
            while next_mark <= e:
                next_mark += every
    points.add(n)
    return points


# EvalConfig fields that change no score (a reuse or a resume may differ in them)
_NOT_SCORING = ("curve_every", "curve_generation", "eval_group", "check_restore", "checkpoint_every", "ppl_every")

# EvalConfig switches whose scores a run may skip while reusing pre-edit scores that include them
_OPTIONAL_SCORES = {"fluency": "fluency/", "perplexity": "general/ppl"}


def _check_reuse(reuse: Results | None, reqs: list[EditRequest], cfg: EvalConfig) -> Results | None:
    if reuse is None:
        return None
    recs = reuse.per_request
    if len(recs) != len(reqs) or any(r.get("prompt") != q.prompt or r.get("target_new") != q.target_new
                                     or "pre" not in r for r, q in zip(recs, reqs)):
        raise ValueError("reuse_pre: those results are for other requests (or incomplete)")
    theirs = dict(reuse.meta.get("config", {}))
    mine = asdict(cfg)
    scoring = [k for k in mine if k not in _NOT_SCORING]
    # a measurement they made and this run skips (fluency, perplexity) is dropped, not a mismatch
    skipped = {k: prefix for k, prefix in _OPTIONAL_SCORES.items() if theirs.get(k) is True and mine[k] is False}
    diff = [k for k in scoring if k in theirs and theirs[k] != mine[k] and k not in skipped]
    if diff:
        raise ValueError(f"reuse_pre: those results were measured with other settings: {diff}")
    if not skipped:
        return reuse
    prefixes = tuple(skipped.values())
    dropped_meta = ("ppl_pre_nll", "ppl_pre_tokens") if "perplexity" in skipped else ()
    return replace(reuse,
                   per_request=[{**r, "pre": {k: v for k, v in r["pre"].items() if not k.startswith(prefixes)}}
                                for r in recs],
                   meta={k: v for k, v in reuse.meta.items() if k not in dropped_meta})


def _summarize(records: list[dict[str, Any]], ppl_pre: tuple[float, int], ppl_post: tuple[float, int]) -> dict:
    summary: dict[str, dict[str, float]] = {"pre": {}, "post": {}, "n": {}}
    keys = list(dict.fromkeys(k for r in records for side in ("pre", "post") for k in r.get(side, {})))
    for key in keys:
        if key == "general/ppl":
            continue
        for side in ("pre", "post"):
            metric = M.Rate()
            metric.update([r[side].get(key, float("nan")) for r in records if side in r])
            summary[side][key] = float(metric.compute())
            if side == "post":
                summary["n"][key] = int(metric.count)
    for side, (nll, count) in (("pre", ppl_pre), ("post", ppl_post)):
        ppl = M.Perplexity()
        ppl.update(nll if count else 0.0, count)
        summary[side]["general/ppl"] = float(ppl.compute())
    return summary


def _jsonable(obj: Any) -> Any:
    if obj is None:
        return None
    if is_dataclass(obj):
        obj = asdict(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)

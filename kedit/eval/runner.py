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

import hashlib
import logging
import math
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from kedit import paths
from kedit.data.request import EditRequest
from kedit.editors.base import Edit, Editor, EditStack
from kedit.eval import metrics as M
from kedit.eval.results import METRICS, Results
from kedit.eval.scoring import answer_budget, corpus_nll, generate, load_texts, model_device, score_targets

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
    curve_every: int = 0
    """Sequential mode: record the retention/perplexity curve every this many edited requests (0: ~10 points)."""
    curve_generation: bool = True
    """Sequential mode: include generation-based success in the retention curve."""
    eval_group: int = 16
    """Requests scored together (pre-edit references of a group are held in memory)."""
    check_restore: bool = True
    """Check after each restore that the model is bit-exactly what it was (fingerprint), and
    compare a full sha256 of the weights at the start and the end."""


# --------------------------------------------------------------------------- model integrity


def state_hash(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (names, dtypes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict(keep_vars=False).items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _bits(t: Tensor) -> Tensor:
    size = t.element_size()
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
    return t.detach().contiguous().view(view)


def fingerprint(model: nn.Module) -> tuple:
    """A fast summary of the weights' bit patterns and of the installed hooks.

    Any change of weights restored by copying would almost surely change it; it is a cheap
    per-request check, with :func:`state_hash` as the exact one at the ends of a run.
    """
    sums = tuple(int(_bits(t).sum(dtype=torch.int64)) for _, t in sorted(model.state_dict().items()))
    # transformers installs its own output-capturing hooks lazily (output_hidden_states=True)
    # and keeps them: count only hooks from elsewhere (an edit's routing hooks)
    hooks = sum(1 for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
                if not str(getattr(h, "__module__", "")).startswith("transformers."))
    return sums, hooks


class RestoreError(RuntimeError):
    """The model is not bit-exactly the original after an edit was restored."""


# --------------------------------------------------------------------------- scoring requests


@dataclass
class _Ref:
    """Pre-edit reference of one request: next-token log-probs and argmax tokens on its
    neighborhood prompts."""

    next_logp: Tensor
    top1: list[Tensor]


def _nanmean(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


class _Scorer:
    """Scores groups of requests on the model as it is now."""

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: EvalConfig):
        self.model, self.tok, self.cfg = model, tokenizer, cfg
        self.texts: list[str] = []
        if cfg.perplexity:
            self.texts = load_texts(paths.held_text(cfg.ppl_path), cfg.ppl_docs)

    def perplexity(self) -> tuple[float, int]:
        if not self.texts:
            return float("nan"), 0
        return corpus_nll(self.model, self.tok, self.texts, self.cfg.ppl_tokens)

    def score(self, requests: Sequence[EditRequest], refs: list[_Ref] | None = None,
              light: bool = False, generation: bool | None = None) -> tuple[list[dict[str, float]], list[_Ref]]:
        """Per-request metrics. ``refs`` are the pre-edit references (None: this is the pre-edit
        pass, whose own distributions become the references). ``light``: only the rewrite metrics
        (for curves). ``generation`` overrides ``EvalConfig.generation``."""
        cfg = self.cfg
        use_gen = cfg.generation if generation is None else generation
        pairs: list[tuple[str, str]] = []   # teacher-forced (prompt, target)
        slots: list[dict[str, Any]] = []    # per request: indices into pairs / gens
        gens: list[tuple[str, str]] = []    # generation (prompt, expected)

        def add(prompt: str, target: str | None) -> int | None:
            if target is None:
                return None
            pairs.append((prompt, target))
            return len(pairs) - 1

        def add_gen(prompt: str, target: str) -> int | None:
            if not use_gen:
                return None
            gens.append((prompt, target))
            return len(gens) - 1

        for r in requests:
            s: dict[str, Any] = {"rewrite": [], "paraphrase": [], "neighborhood": [], "portability": []}
            prompts = [("rewrite", r.prompt)] + ([] if light else [("paraphrase", p) for p in r.paraphrase_prompts])
            for split, p in prompts:
                s[split].append({"new": add(p, r.target_new), "true": add(p, r.target_true),
                                 "gen": add_gen(p, r.target_new)})
            if not light:
                for probe in r.neighborhood:
                    s["neighborhood"].append({"true": add(probe.prompt, probe.answer),
                                              "new": add(probe.prompt, r.target_new),
                                              "gen": add_gen(probe.prompt, probe.answer)})
                for probe in r.portability:
                    s["portability"].append({"new": add(probe.prompt, probe.answer),
                                             "gen": add_gen(probe.prompt, probe.answer)})
            slots.append(s)

        # the neighbourhood prompts' next-token distributions come from their "true" pairs' forward
        next_of = [] if light else [item["true"] for s in slots for item in s["neighborhood"]]
        sc = score_targets(self.model, self.tok, [p for p, _ in pairs], [t for _, t in pairs], cfg.batch_size,
                           next_of=next_of)
        budgets = [answer_budget(self.tok, t, cfg.gen_extra_tokens) for _, t in gens]
        texts = generate(self.model, self.tok, [p for p, _ in gens], budgets, cfg.batch_size) if gens else []
        gen_ok = [float(M.generation_match(c, t)) for c, (_, t) in zip(texts, gens)]

        next_logp = sc.next_logp

        out, new_refs, offset = [], [], 0
        for r, s in zip(requests, slots):
            m: dict[str, float] = {}
            for split in ("rewrite", "paraphrase"):
                es, acc, exact, gen, p_new = [], [], [], [], []
                for item in s[split]:
                    i, j = item["new"], item["true"]
                    a, e = M.token_accuracy(sc.correct[i], sc.length[i])
                    acc.append(float(a))
                    exact.append(float(e))
                    p_new.append(math.exp(-float(M.mean_nll(sc.logp[i], sc.length[i]))))
                    if j is not None:
                        es.append(float(M.prob_greater(sc.logp[i], sc.length[i], sc.logp[j], sc.length[j])))
                    if item["gen"] is not None:
                        gen.append(gen_ok[item["gen"]])
                if s[split]:
                    m[f"{split}/es"] = _nanmean(es)
                    m[f"{split}/acc"] = _nanmean(acc)
                    m[f"{split}/exact"] = _nanmean(exact)
                    m[f"{split}/gen"] = _nanmean(gen)
                    if split == "rewrite":
                        m["rewrite/p_new"] = _nanmean(p_new)
            n_nb = len(s["neighborhood"])
            if n_nb:
                logp_now = next_logp[offset:offset + n_nb]
                top1_now = [sc.top1[item["true"]] for item in s["neighborhood"]]
                ref = refs[len(new_refs)] if refs is not None else _Ref(logp_now, top1_now)
                ns, acc, agree, gen = [], [], [], []
                for k, item in enumerate(s["neighborhood"]):
                    i, j = item["true"], item["new"]
                    ns.append(float(M.prob_greater(sc.logp[i], sc.length[i], sc.logp[j], sc.length[j])))
                    acc.append(float(M.token_accuracy(sc.correct[i], sc.length[i])[0]))
                    pre_top1, post_top1 = ref.top1[k], top1_now[k]
                    agree.append(float(M.top1_agreement(pre_top1, post_top1, torch.ones_like(pre_top1, dtype=torch.bool))))
                    if item["gen"] is not None:
                        gen.append(gen_ok[item["gen"]])
                m["neighborhood/ns"] = _nanmean(ns)
                m["neighborhood/acc"] = _nanmean(acc)
                m["neighborhood/agree"] = _nanmean(agree)
                m["neighborhood/kl"] = float(M.kl_divergence(ref.next_logp, logp_now).mean())
                m["neighborhood/gen"] = _nanmean(gen)
                offset += n_nb
            else:
                ref = refs[len(new_refs)] if refs is not None else _Ref(torch.zeros(0), [])
            new_refs.append(ref)
            if s["portability"]:
                acc, exact, gen = [], [], []
                for item in s["portability"]:
                    a, e = M.token_accuracy(sc.correct[item["new"]], sc.length[item["new"]])
                    acc.append(float(a))
                    exact.append(float(e))
                    if item["gen"] is not None:
                        gen.append(gen_ok[item["gen"]])
                m["portability/acc"] = _nanmean(acc)
                m["portability/exact"] = _nanmean(exact)
                m["portability/gen"] = _nanmean(gen)
            out.append(m)

        if cfg.fluency and not light:
            self._fluency(requests, out)
        return out, new_refs

    def refs(self, requests: Sequence[EditRequest]) -> list[_Ref]:
        """Only the pre-edit references (neighborhood distributions and argmax tokens)."""
        prompts = [probe.prompt for r in requests for probe in r.neighborhood]
        answers = [probe.answer for r in requests for probe in r.neighborhood]
        if not prompts:
            return [_Ref(torch.zeros(0), []) for _ in requests]
        sc = score_targets(self.model, self.tok, prompts, answers, self.cfg.batch_size, next_of=range(len(prompts)))
        logp = sc.next_logp
        out, k = [], 0
        for r in requests:
            n = len(r.neighborhood)
            out.append(_Ref(logp[k:k + n], sc.top1[k:k + n]) if n else _Ref(torch.zeros(0), []))
            k += n
        return out

    def _fluency(self, requests: Sequence[EditRequest], out: list[dict[str, float]]) -> None:
        # greedy decoding is deterministic: generate each distinct prompt once, keep duplicates' weight
        per_request = []
        for r in requests:
            prompts = r.generation_prompts
            if self.cfg.max_generation_prompts is not None:
                prompts = list(dict.fromkeys(prompts))[:self.cfg.max_generation_prompts]
            per_request.append(prompts)
        unique = list(dict.fromkeys(p for ps in per_request for p in ps))
        if not unique:
            return
        conts = generate(self.model, self.tok, unique, self.cfg.fluency_new_tokens, self.cfg.batch_size)
        # like ROME, the entropy is of the whole text: prompt and continuation
        entropy = {p: M.ngram_entropy(p + c) for p, c in zip(unique, conts)}
        for prompts, m in zip(per_request, out):
            if prompts:
                m["fluency/ngram_entropy"] = _nanmean([entropy[p] for p in prompts])


# --------------------------------------------------------------------------- runner


def _peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 / 1024 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


class _Timer:
    """Edit time and peak memory of each ``Editor.edit`` call."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds: list[float] = []
        self.cuda_peaks: list[float] = []

    def edit(self, editor: Editor, model: nn.Module, tok: PreTrainedTokenizerBase,
             requests: list[EditRequest], history: Sequence[Edit] = ()) -> tuple[Edit, float]:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        edit = editor.edit(model, tok, requests, history=history)
        if self.cuda:
            torch.cuda.synchronize()
            self.cuda_peaks.append(torch.cuda.max_memory_allocated() / 2**20)
        dt = time.perf_counter() - t0
        self.seconds.append(dt)
        return edit, dt


def _as_requests(requests: Any) -> list[EditRequest]:
    if isinstance(requests, EditRequest):
        return [requests]
    if isinstance(requests, list) and all(isinstance(r, EditRequest) for r in requests):
        return requests
    from kedit.editors.base import as_requests

    return as_requests(requests)


def _chunks(items: list, size: int) -> list[list]:
    size = max(1, size)
    return [items[i:i + size] for i in range(0, len(items), size)]


def _curve_checkpoints(n: int, step: int, every: int) -> set[int]:
    """Edited-request counts after which the curve is measured: multiples of ``every``, at
    step boundaries, and the end."""
    ends = list(range(step, n, step)) + [n]
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
    it is measured (to save partial results of long runs).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    cfg = config or EvalConfig()
    if overrides:
        from dataclasses import replace

        cfg = replace(cfg, **overrides)
    reqs = _as_requests(requests)
    if not reqs:
        raise ValueError("no requests to evaluate")
    step = {"single": 1, "batch": len(reqs), "sequential": 1}[mode] if batch_size is None else batch_size
    if step < 1:
        raise ValueError(f"batch_size must be >= 1, got {step}")
    if mode == "single" and step != 1:
        log.info("single mode edits one request at a time; batch_size=%d ignored", step)
        step = 1

    was_training = model.training
    model.eval()
    device = model_device(model)
    scorer = _Scorer(model, tokenizer, cfg)
    timer = _Timer(device)
    start_hash = state_hash(model) if cfg.check_restore else None
    start_print = fingerprint(model) if cfg.check_restore else None
    records: list[dict[str, Any]] = [{"index": i, "case_id": r.case_id, "prompt": r.prompt,
                                      "target_new": r.target_new, "target_true": r.target_true}
                                     for i, r in enumerate(reqs)]
    curves: list[dict[str, Any]] = []
    t_start = time.perf_counter()

    def check(where: str) -> None:
        if cfg.check_restore and fingerprint(model) != start_print:
            raise RestoreError(f"the model is not bit-exactly restored {where}")

    def done(i: int) -> None:
        if on_result is not None:
            on_result(i, records[i])

    reused = _check_reuse(reuse_pre, reqs, cfg)

    def pre_pass(group: list[int]) -> tuple[list[dict[str, float]], list[_Ref]]:
        if reused is None:
            return scorer.score([reqs[i] for i in group])
        pre = [{k: float("nan") if v is None else v for k, v in reused.per_request[i]["pre"].items()
                if k != "general/ppl"} for i in group]
        return pre, scorer.refs([reqs[i] for i in group])

    if reused is not None and reused.meta.get("ppl_pre_tokens") is not None:
        ppl_pre = (reused.meta["ppl_pre_nll"], reused.meta["ppl_pre_tokens"])
    else:
        ppl_pre = scorer.perplexity()
    bar = tqdm(total=len(reqs), desc=f"{mode} {type(editor).__name__}", unit="req", disable=not progress)
    try:
        if mode in ("single", "batch"):
            post_ppl: list[tuple[float, int]] = []
            # single: pre-edit passes batched over eval_group requests, then one edit each;
            # batch: one edit per chunk, scored in eval_group sub-groups (bounded reference memory)
            outer = cfg.eval_group if mode == "single" else step
            for block in _chunks(list(range(len(reqs))), outer):
                if mode == "single":
                    pre, refs = pre_pass(block)
                    units = [([i], [pre[k]], [refs[k]]) for k, i in enumerate(block)]
                else:
                    units = [(block, None, None)]
                for chunk, pre, refs in units:
                    edit, dt = timer.edit(editor, model, tokenizer, [reqs[i] for i in chunk])
                    check("after Editor.edit (edit() must not change the model)")
                    subs = [chunk] if pre is not None else _chunks(chunk, cfg.eval_group)
                    for k, sub in enumerate(subs):
                        if pre is None:
                            sub_pre, sub_refs = pre_pass(sub)
                        else:
                            sub_pre, sub_refs = pre, refs
                        with edit.applied(model):
                            post, _ = scorer.score([reqs[i] for i in sub], sub_refs)
                            if k == len(subs) - 1:
                                ppl = scorer.perplexity()
                        check(f"after restoring the edit of request(s) {chunk[0]}..{chunk[-1]}")
                        for i, a, b in zip(sub, sub_pre, post):
                            records[i].update(pre=a, post=b, edit_seconds=dt / len(chunk), edit_step=len(post_ppl))
                    post_ppl.append(ppl)
                    for i in chunk:
                        records[i]["post"]["general/ppl"] = M.perplexity(*ppl)
                        records[i]["pre"]["general/ppl"] = M.perplexity(*ppl_pre)
                        done(i)
                    bar.update(len(chunk))
                    bar.set_postfix(edit_s=f"{dt:.2f}")
            ppl_post = (sum(p[0] for p in post_ppl), sum(p[1] for p in post_ppl))
        else:
            ppl_post = _sequential(model, tokenizer, editor, reqs, step, scorer, timer, records, curves, cfg,
                                   bar, check, ppl_pre, done, pre_pass, on_curve)
    finally:
        bar.close()
        if was_training:
            model.train()
    if cfg.check_restore and state_hash(model) != start_hash:
        raise RestoreError("the model's weights differ from the start of the evaluation (sha256)")

    summary = _summarize(records, ppl_pre, ppl_post)
    meta = {
        "mode": mode,
        "batch_size": step,
        "n_requests": len(reqs),
        "n_edits": len(timer.seconds),
        "editor": repr(editor),
        "editor_name": type(editor).__name__,
        "hparams": _jsonable(getattr(editor, "hparams", None)),
        "model": getattr(getattr(model, "config", None), "_name_or_path", type(model).__name__),
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype),
        "edit_seconds": timer.seconds,
        "edit_seconds_mean": sum(timer.seconds) / len(timer.seconds) if timer.seconds else None,
        "edit_seconds_per_request": sum(timer.seconds) / len(reqs) if timer.seconds else None,
        "edit_seconds_total": sum(timer.seconds),
        "eval_seconds": time.perf_counter() - t_start,
        "peak_rss_mb": _peak_rss_mb(),
        "cuda_peak_mb": max(timer.cuda_peaks) if timer.cuda_peaks else None,
        "config": asdict(cfg),
        "restore_checked": cfg.check_restore,
        "pre_reused": reused is not None,
        "ppl_pre_nll": ppl_pre[0],
        "ppl_pre_tokens": ppl_pre[1],
        "metrics": METRICS,
    }
    return Results(summary=summary, per_request=records, curves=curves, meta=meta)


def _sequential(model, tokenizer, editor, reqs, step, scorer, timer, records, curves, cfg, bar, check,
                ppl_pre, done, pre_pass, on_curve=None) -> tuple[float, int]:
    n = len(reqs)
    points = _curve_checkpoints(n, step, cfg.curve_every)
    first_k = min(points)
    stack = EditStack()
    gen = cfg.curve_generation and cfg.generation

    def curve_point(n_edits: int) -> dict[str, Any]:
        seen, _ = scorer.score(reqs[:n_edits], light=True, generation=gen) if n_edits else ([], [])
        first, _ = scorer.score(reqs[:first_k], light=True, generation=gen)
        point: dict[str, Any] = {"n_edits": n_edits}
        for key in ("rewrite/es", "rewrite/acc", "rewrite/gen"):
            if n_edits:
                point[f"seen:{key}"] = _nanmean([m.get(key, float("nan")) for m in seen])
            point[f"first{first_k}:{key}"] = _nanmean([m.get(key, float("nan")) for m in first])
        point["general/ppl"] = M.perplexity(*scorer.perplexity())
        return point

    def record(point: dict[str, Any]) -> None:
        curves.append(point)
        if on_curve is not None:
            on_curve(point)

    record(curve_point(0))
    try:
        done_n = 0
        for chunk in _chunks(list(range(n)), step):
            edit, dt = timer.edit(editor, model, tokenizer, [reqs[i] for i in chunk], history=stack)
            if stack.is_applied:
                stack.push(edit, model)
            else:
                stack.push(edit)
                stack.apply(model)
            for i in chunk:
                records[i].update(edit_seconds=dt / len(chunk), edit_step=len(stack.edits) - 1)
            done_n += len(chunk)
            if done_n in points:
                record(curve_point(done_n))
                log.info("sequential: %d edits: %s", done_n, curves[-1])
            bar.update(len(chunk))
            bar.set_postfix(edit_s=f"{dt:.2f}")
        ppl_post = scorer.perplexity()
    finally:
        stack.restore(model)
    check("after restoring the sequential edit stack")

    # final scores: per group, pre-edit references on the restored model, then the whole stack
    for group in _chunks(list(range(n)), cfg.eval_group):
        pre, refs = pre_pass(group)
        with stack.applied(model):
            post, _ = scorer.score([reqs[i] for i in group], refs)
        check(f"after restoring the stack (final scoring of requests {group[0]}..{group[-1]})")
        for i, a, b in zip(group, pre, post):
            a["general/ppl"] = M.perplexity(*ppl_pre)
            b["general/ppl"] = M.perplexity(*ppl_post)
            records[i].update(pre=a, post=b)
            done(i)
    return ppl_post


def _check_reuse(reuse: Results | None, reqs: list[EditRequest], cfg: EvalConfig) -> Results | None:
    if reuse is None:
        return None
    recs = reuse.per_request
    if len(recs) != len(reqs) or any(r.get("prompt") != q.prompt or r.get("target_new") != q.target_new
                                     or "pre" not in r for r, q in zip(recs, reqs)):
        raise ValueError("reuse_pre: those results are for other requests (or incomplete)")
    theirs = dict(reuse.meta.get("config", {}))
    mine = asdict(cfg)
    scoring = [k for k in mine if k not in ("curve_every", "curve_generation", "eval_group", "check_restore")]
    diff = [k for k in scoring if k in theirs and theirs[k] != mine[k]]
    if diff:
        raise ValueError(f"reuse_pre: those results were measured with other settings: {diff}")
    return reuse


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
    from dataclasses import is_dataclass

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

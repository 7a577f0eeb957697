"""Per-request metrics of a group of requests on the model as it is now.

Scoring reads top-down:

1. :func:`queries` lists flat query rows, one per (prompt, target, kind): ``new`` / ``true``
   are teacher-forced scores of the new target / the true answer after a prompt, ``gen`` a
   greedy generation checked against the expected answer.
2. :meth:`Scorer.measure` runs every row of the group in batched forward passes (identical
   rows once) and gives each prompt an :class:`Item` with its measurements.
3. One pure reducer per split turns a request's items into its metrics:
   :func:`edit_split` (rewrite, paraphrase), :func:`neighborhood` and :func:`portability`.

The pre-edit pass keeps a :class:`Ref` per request (the neighborhood prompts' next-token
distributions and argmax tokens), against which post-edit KL and agreement are measured.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from kedit import paths
from kedit.data.request import EditRequest
from kedit.eval import metrics as M
from kedit.eval.scoring import (
    answer_budget,
    corpus_nll,
    generate,
    load_texts,
    score_targets,
)

if TYPE_CHECKING:
    from kedit.eval.runner import EvalConfig

Split = Literal["rewrite", "paraphrase", "neighborhood", "portability"]
Kind = Literal["new", "true", "gen"]


@dataclass(frozen=True)
class Query:
    """One measurement: ``kind`` "new" / "true" scores ``target`` after ``prompt`` teacher-forced,
    "gen" checks that the greedy generation after ``prompt`` starts with ``target``."""

    request: int
    """Index of the request in the scored group."""
    split: Split
    item: int
    """Index of the prompt within the request's split."""
    kind: Kind
    prompt: str
    target: str


def _rows(request: int, split: Split, item: int, prompt: str, **targets: str | None) -> list[Query]:
    """The rows of one prompt, in the order of ``targets`` (kind=target; None: not measured)."""
    return [Query(request, split, item, kind, prompt, target)  # type: ignore[arg-type]
            for kind, target in targets.items() if target is not None]


def queries(requests: Sequence[EditRequest], light: bool = False, generation: bool = True) -> list[Query]:
    """The query rows of ``requests``. ``light``: the edit prompts only (retention curves)."""
    def gen(answer: str) -> str | None:
        return answer if generation else None

    rows: list[Query] = []
    for i, r in enumerate(requests):
        edit = [("rewrite", 0, r.prompt)] + ([] if light else [("paraphrase", k, p)
                                                             for k, p in enumerate(r.paraphrase_prompts)])
        for split, k, prompt in edit:
            rows += _rows(i, split, k, prompt, new=r.target_new, true=r.target_true, gen=gen(r.target_new))
        if light:
            continue
        for k, probe in enumerate(r.neighborhood):
            rows += _rows(i, "neighborhood", k, probe.prompt, true=probe.answer, new=r.target_new,
                          gen=gen(probe.answer))
        for k, probe in enumerate(r.portability):
            rows += _rows(i, "portability", k, probe.prompt, new=probe.answer, gen=gen(probe.answer))
    return rows


@dataclass
class Scored:
    """Teacher-forced score of one target: summed log-prob, length, correct tokens, argmax tokens."""

    logp: Tensor
    length: Tensor
    correct: Tensor
    top1: Tensor


@dataclass
class Item:
    """The measurements of one prompt of a request."""

    new: Scored | None = None
    true: Scored | None = None
    gen: float | None = None
    """1.0 when the greedy generation starts with the expected answer, else 0.0; None: not measured."""


@dataclass
class Ref:
    """Pre-edit reference of one request: next-token log-probs (n_neighborhood, vocab) and
    argmax tokens over the answer of each neighborhood prompt."""

    next_logp: Tensor = field(default_factory=lambda: torch.zeros(0))
    top1: list[Tensor] = field(default_factory=list)


# --------------------------------------------------------------------------- reducers


def _gens(items: Sequence[Item]) -> list[float]:
    return [it.gen for it in items if it.gen is not None]


def edit_split(split: str, items: Sequence[Item]) -> dict[str, float]:
    """Rewrite or paraphrase prompts: efficacy / generalization of target_new."""
    if not items:
        return {}
    acc_exact = [M.token_accuracy(it.new.correct, it.new.length) for it in items]
    es = [float(M.prob_greater(it.new.logp, it.new.length, it.true.logp, it.true.length))
          for it in items if it.true is not None]
    m = {f"{split}/es": M.nanmean(es), f"{split}/acc": M.nanmean([float(a) for a, _ in acc_exact]),
         f"{split}/exact": M.nanmean([float(e) for _, e in acc_exact]), f"{split}/gen": M.nanmean(_gens(items))}
    if split == "rewrite":
        m["rewrite/p_new"] = M.nanmean([math.exp(-float(M.mean_nll(it.new.logp, it.new.length))) for it in items])
    return m


def neighborhood(items: Sequence[Item], ref: Ref, next_logp: Tensor) -> dict[str, float]:
    """Neighborhood prompts: the true answers kept (specificity) and the distribution unchanged
    (locality) against the pre-edit ``ref``; ``next_logp`` is now's (n_items, vocab)."""
    if not items:
        return {}
    agree = [M.top1_agreement(pre, it.true.top1, torch.ones_like(pre, dtype=torch.bool))
             for pre, it in zip(ref.top1, items)]
    return {
        "neighborhood/ns": M.nanmean([float(M.prob_greater(it.true.logp, it.true.length, it.new.logp, it.new.length))
                                     for it in items]),
        "neighborhood/acc": M.nanmean([float(M.token_accuracy(it.true.correct, it.true.length)[0]) for it in items]),
        "neighborhood/agree": M.nanmean([float(a) for a in agree]),
        "neighborhood/kl": float(M.kl_divergence(ref.next_logp, next_logp).mean()),
        "neighborhood/gen": M.nanmean(_gens(items)),
    }


def portability(items: Sequence[Item]) -> dict[str, float]:
    """Portability questions: the answers that follow from the edit."""
    if not items:
        return {}
    acc_exact = [M.token_accuracy(it.new.correct, it.new.length) for it in items]
    return {"portability/acc": M.nanmean([float(a) for a, _ in acc_exact]),
            "portability/exact": M.nanmean([float(e) for _, e in acc_exact]),
            "portability/gen": M.nanmean(_gens(items))}


# --------------------------------------------------------------------------- measuring


@dataclass
class Measured:
    """The items of every (request, split), and the neighborhood prompts' next-token
    log-distributions per request."""

    items: dict[tuple[int, str], list[Item]]
    next_logp: list[Tensor]

    def of(self, request: int, split: str) -> list[Item]:
        return self.items.get((request, split), [])


def _unique(keys: Sequence) -> tuple[list, list[int]]:
    """The distinct keys in first-seen order, and each key's index among them."""
    first: dict = {}
    index = [first.setdefault(k, len(first)) for k in keys]
    return list(first), index


class Scorer:
    """Scores groups of requests on the model as it is now."""

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: EvalConfig):
        self.model, self.tok, self.cfg = model, tokenizer, cfg
        self.texts = load_texts(paths.held_text(cfg.ppl_path), cfg.ppl_docs) if cfg.perplexity else []

    def perplexity(self) -> tuple[float, int]:
        """Summed NLL and token count on the held text (``(nan, 0)`` when off)."""
        if not self.texts:
            return float("nan"), 0
        return corpus_nll(self.model, self.tok, self.texts, self.cfg.ppl_tokens)

    def measure(self, requests: Sequence[EditRequest], rows: Sequence[Query]) -> Measured:
        """Run ``rows``: teacher-forced rows in one batched pass, generation rows in another;
        identical rows run once."""
        cfg = self.cfg
        forced = [q for q in rows if q.kind != "gen"]
        pairs, pair_of = _unique([(q.prompt, q.target) for q in forced])
        nb = [k for k, q in enumerate(forced) if q.split == "neighborhood" and q.kind == "true"]
        next_pairs, next_of = _unique([pair_of[k] for k in nb])
        sc = score_targets(self.model, self.tok, [p for p, _ in pairs], [t for _, t in pairs], cfg.batch_size,
                           next_of=next_pairs)
        gens = [q for q in rows if q.kind == "gen"]
        prompts, gen_of = _unique([(q.prompt, answer_budget(self.tok, q.target, cfg.gen_extra_tokens)) for q in gens])
        texts = generate(self.model, self.tok, [p for p, _ in prompts], [b for _, b in prompts], cfg.batch_size)

        items: dict[tuple[int, str], list[Item]] = {}
        for q in rows:
            split = items.setdefault((q.request, q.split), [])
            while len(split) <= q.item:
                split.append(Item())
        for q, j in zip(forced, pair_of):
            setattr(items[q.request, q.split][q.item], q.kind,
                    Scored(sc.logp[j], sc.length[j], sc.correct[j], sc.top1[j]))
        for q, j in zip(gens, gen_of):
            items[q.request, q.split][q.item].gen = float(M.generation_match(texts[j], q.target))
        rows_of = [[] for _ in requests]
        for k, j in zip(nb, next_of):
            rows_of[forced[k].request].append(j)
        next_logp = [sc.next_logp[js] if js else torch.zeros(0) for js in rows_of]
        return Measured(items, next_logp)

    def score(self, requests: Sequence[EditRequest], refs: Sequence[Ref] | None = None, light: bool = False,
              generation: bool | None = None) -> tuple[list[dict[str, float]], list[Ref]]:
        """Per-request metrics, and each request's reference. ``refs``: the pre-edit references
        (None: this is the pre-edit pass, and its own measurements become the references).
        ``light``: the rewrite metrics only (curves). ``generation`` overrides ``EvalConfig.generation``."""
        use_gen = self.cfg.generation if generation is None else generation
        got = self.measure(requests, queries(requests, light, use_gen))
        out, new_refs = [], []
        for i in range(len(requests)):
            nb = got.of(i, "neighborhood")
            ref = refs[i] if refs is not None else Ref(got.next_logp[i], [it.true.top1 for it in nb])
            out.append({**edit_split("rewrite", got.of(i, "rewrite")),
                        **edit_split("paraphrase", got.of(i, "paraphrase")),
                        **neighborhood(nb, ref, got.next_logp[i]), **portability(got.of(i, "portability"))})
            new_refs.append(ref)
        if self.cfg.fluency and not light:
            self._fluency(requests, out)
        return out, new_refs

    def refs(self, requests: Sequence[EditRequest]) -> list[Ref]:
        """Only the pre-edit references (neighborhood distributions and argmax tokens)."""
        rows = [q for q in queries(requests, generation=False) if q.split == "neighborhood" and q.kind == "true"]
        got = self.measure(requests, rows)
        return [Ref(got.next_logp[i], [it.true.top1 for it in got.of(i, "neighborhood")])
                for i in range(len(requests))]

    def _fluency(self, requests: Sequence[EditRequest], out: list[dict[str, float]]) -> None:
        """ROME's n-gram entropy of greedy generations (prompt and continuation, like ROME)."""
        per_request = []
        for r in requests:
            prompts = r.generation_prompts
            if self.cfg.max_generation_prompts is not None:
                prompts = list(dict.fromkeys(prompts))[:self.cfg.max_generation_prompts]
            per_request.append(prompts)
        unique = list(dict.fromkeys(p for ps in per_request for p in ps))  # greedy: each distinct prompt once
        if not unique:
            return
        conts = generate(self.model, self.tok, unique, self.cfg.fluency_new_tokens, self.cfg.batch_size)
        entropy = {p: M.ngram_entropy(p + c) for p, c in zip(unique, conts)}
        for prompts, m in zip(per_request, out):
            if prompts:
                m["fluency/ngram_entropy"] = M.nanmean([entropy[p] for p in prompts])

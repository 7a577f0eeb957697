"""Editing metrics: a plain functional core, and torchmetrics ``Metric`` s that reduce under DDP.

The functions take tensors or strings and return per-example values, so they can be
checked against hand computations. The ``Metric`` classes only accumulate sums and counts
(``dist_reduce_fx="sum"``), so a mean over requests is exact when ranks hold different
numbers of requests.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from kedit import utils


def nanmean(values: Sequence[float]) -> float:
    """Mean of the values that are not NaN (NaN when none is)."""
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


# --------------------------------------------------------------------------- teacher forcing


def mean_nll(logp_sum: Tensor, n_tokens: Tensor) -> Tensor:
    """Mean per-token negative log-likelihood from summed target log-probs and lengths."""
    return -logp_sum / n_tokens.clamp(min=1)


def prob_greater(logp_a: Tensor, len_a: Tensor, logp_b: Tensor, len_b: Tensor) -> Tensor:
    """ROME's comparison: target ``a`` is more probable than ``b`` after the same prompt.

    Compares the mean per-token NLL (so targets of different token lengths compare fairly):
    true where ``nll(a) < nll(b)``. ES uses (a, b) = (new, true); NS uses (true, new).
    """
    return mean_nll(logp_a, len_a) < mean_nll(logp_b, len_b)


def token_accuracy(n_correct: Tensor, n_tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Teacher-forced token accuracy and the all-tokens-correct indicator, per example."""
    n_tokens = n_tokens.clamp(min=1)
    return n_correct / n_tokens, (n_correct == n_tokens).float()


def top1_agreement(pre_top1: Tensor, post_top1: Tensor, mask: Tensor) -> Tensor:
    """Per example: fraction of masked positions where post-edit argmax equals pre-edit argmax."""
    same = ((pre_top1 == post_top1) & mask).sum(-1)
    return same / mask.sum(-1).clamp(min=1)


def kl_divergence(logp_pre: Tensor, logp_post: Tensor) -> Tensor:
    """KL(pre || post) over the last dimension, from log-probabilities (nats)."""
    return utils.kl_divergence(logp_pre.double(), logp_post.double()).float()


def perplexity(nll_sum: float | Tensor, n_tokens: int | Tensor) -> float:
    """``exp(total NLL / tokens)``."""
    n = float(n_tokens)
    return math.exp(float(nll_sum) / n) if n > 0 else float("nan")


# --------------------------------------------------------------------------- generation

_EDGE_PUNCT = string.punctuation + "“”‘’«»„‚—–…·"


def normalize_answer(text: str) -> str:
    """Strip, lower-case, collapse whitespace, strip punctuation at the edges (NFKC first)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = " ".join(text.split())
    return text.strip(_EDGE_PUNCT + " ")


def generation_match(continuation: str, target: str) -> bool:
    """Does the generated continuation start with the target, after :func:`normalize_answer`?

    The match must end at a word boundary: "Paris." and "Paris is" match "Paris",
    "Parisian" does not. An empty target never matches.
    """
    cont, tgt = normalize_answer(continuation), normalize_answer(target)
    if not tgt or not cont.startswith(tgt):
        return False
    rest = cont[len(tgt):]
    return not rest or not (rest[0].isalnum() and tgt[-1].isalnum())


# --------------------------------------------------------------------------- fluency

_WORD = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")


def word_tokenize(text: str) -> list[str]:
    """Words and punctuation marks, a dependency-free stand-in for ``nltk.word_tokenize``."""
    return _WORD.findall(text)


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's ``compute_n_gram_entropy``: weighted bi/tri-gram entropies (bits), arithmetic mean.

    For each n, the entropy of the n-gram frequency distribution of the text's words,
    multiplied by its weight; the result is the mean over n. Repetitive text scores low.
    """
    parts = []
    for n, w in zip(ns, weights):
        tokens = word_tokenize(text)
        counts = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
        total = sum(counts.values())
        h = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        parts.append(w * h)
    return sum(parts) / len(parts)


def mean_ngram_entropy(texts: Iterable[str]) -> float:
    """ROME's ``n_gram_entropy``: the arithmetic mean of :func:`ngram_entropy` over texts."""
    values = [ngram_entropy(t) for t in texts]
    return sum(values) / len(values) if values else float("nan")


# --------------------------------------------------------------------------- torchmetrics


class Rate(Metric):
    """Mean of per-example values (rates, accuracies, KLs); NaNs are skipped.

    State is a sum and a count, reduced by summation across processes.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, values: Tensor | float | Sequence[float]) -> None:
        values = torch.as_tensor(values, dtype=torch.float64, device=self.total.device).flatten()
        values = values[~values.isnan()]
        self.total += values.sum()
        self.count += values.numel()

    def compute(self) -> Tensor:
        if self.count == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return self.total / self.count


class Perplexity(Metric):
    """Token-level perplexity ``exp(sum NLL / tokens)``, reduced across processes."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("nll", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, nll_sum: Tensor | float, n_tokens: Tensor | int) -> None:
        self.nll += torch.as_tensor(nll_sum, dtype=torch.float64, device=self.nll.device).sum()
        self.tokens += torch.as_tensor(n_tokens, dtype=torch.int64, device=self.tokens.device).sum()

    def compute(self) -> Tensor:
        if self.tokens == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return torch.exp(self.nll / self.tokens)

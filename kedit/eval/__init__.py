"""Honest evaluation of edits: teacher-forced and generation-based scores, pre and post.

>>> from kedit.eval import evaluate
>>> results = evaluate(model, tok, kedit.editor("ft-m"), requests, mode="single")
>>> print(results.to_markdown())
"""

from kedit.eval.metrics import (Perplexity, Rate, generation_match, kl_divergence, mean_ngram_entropy, ngram_entropy,
                                normalize_answer, prob_greater, token_accuracy, top1_agreement)
from kedit.eval.results import METRICS, Results
from kedit.eval.resume import CheckpointError
from kedit.eval.runner import MODES, EvalConfig, RestoreError, evaluate

__all__ = ["METRICS", "MODES", "CheckpointError", "EvalConfig", "Perplexity", "Rate", "RestoreError", "Results", "evaluate",
           "generation_match", "kl_divergence", "mean_ngram_entropy", "ngram_entropy", "normalize_answer",
           "prob_greater", "token_accuracy", "top1_agreement"]

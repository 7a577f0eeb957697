"""Forward passes the metrics need: target scores, next-token distributions, greedy
generations and corpus perplexity. Batched, no gradients, model left in eval mode.

Decoder-only models use :func:`kedit.data.encode`'s right-padded ``prompt + " " + target``
batches; encoder-decoder models (T5) put the prompt in the encoder and the target in the
decoder.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from kedit.data.encode import encode, model_inputs, target_ids, target_logits
from kedit.utils import chunks

log = logging.getLogger(__name__)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def is_seq2seq(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


@dataclass
class TargetScores:
    """Teacher-forced scores of targets after prompts, one entry per (prompt, target) pair."""

    logp: Tensor
    """(n,) summed log-probability of the target tokens."""
    correct: Tensor
    """(n,) number of target tokens that are the argmax given the gold prefix."""
    length: Tensor
    """(n,) number of target tokens."""
    top1: list[Tensor]
    """Per pair, the argmax token at each target position (for pre/post agreement)."""
    next_logp: Tensor | None = None
    """(m, vocab) next-token log-distribution after the prompts of the pairs named in
    ``next_of`` (in that order), float32 on CPU; None when none were asked for."""


def _batches(items: Sequence, batch_size: int, desc: str) -> Iterable[Sequence]:
    """``items`` in batches, with a progress bar that appears only when the pass takes more than a
    few seconds (a curve point of a long sequential run scores thousands of rows)."""
    return tqdm(chunks(items, batch_size), desc=desc, unit="batch", delay=5, leave=False)


@torch.no_grad()
def score_targets(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                  targets: Sequence[str], batch_size: int = 32, next_of: Sequence[int] = ()) -> TargetScores:
    """Summed log-prob, correct-token count, length and argmax tokens of each target.

    ``next_of``: pairs whose prompt's next-token log-distribution to return as well (what
    :func:`next_token_logprobs` gives), read off the same forward pass. Pairs of similar
    length share a batch, so little compute goes to padding."""
    seq2seq = is_seq2seq(model)
    device = model_device(model)
    n = len(prompts)
    order = sorted(range(n), key=lambda i: len(prompts[i]) + len(targets[i]))
    want = {i: k for k, i in enumerate(next_of)}
    if len(want) != len(next_of) or any(not 0 <= i < n for i in want):
        raise ValueError(f"next_of must name distinct pairs in 0..{n - 1}, got {list(next_of)}")
    logps, corrects, lengths = torch.zeros(n), torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
    top1: list[Tensor | None] = [None] * n
    nxt: Tensor | None = None
    for chunk in _batches(range(n), batch_size, "scoring"):
        idx = [order[j] for j in chunk]
        batch = encode(tokenizer, [prompts[i] for i in idx], [targets[i] for i in idx],
                       seq2seq=seq2seq, device=device)
        logits = model(**model_inputs(batch)).logits
        lg, tgt, mask = target_logits(logits, batch["labels"], seq2seq)
        logp = torch.log_softmax(lg.float(), -1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        arg = lg.argmax(-1)
        at = torch.tensor(idx)
        logps[at] = (logp * mask).sum(-1).float().cpu()
        corrects[at] = ((arg == tgt) & mask).sum(-1).cpu()
        lengths[at] = mask.sum(-1).cpu()
        for i, a, m in zip(idx, arg, mask):
            top1[i] = a[m].cpu()
        rows = [b for b, i in enumerate(idx) if i in want]
        if rows:
            r = torch.tensor(rows, device=logits.device)
            pos = torch.zeros_like(r) if seq2seq else batch["prompt_len"][r] - 1
            dist = torch.log_softmax(logits[r, pos].float(), -1).cpu()
            if nxt is None:
                nxt = torch.empty(len(want), dist.shape[-1])
            nxt[torch.tensor([want[idx[b]] for b in rows])] = dist
    return TargetScores(logps, corrects, lengths, top1, nxt)  # type: ignore[arg-type]


@torch.no_grad()
def next_token_logprobs(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                        batch_size: int = 32) -> Tensor:
    """(n, vocab) log-distribution of the token following each prompt, float32 on CPU."""
    seq2seq = is_seq2seq(model)
    device = model_device(model)
    out = []
    for idx in chunks(range(len(prompts)), batch_size):
        batch = encode(tokenizer, [prompts[i] for i in idx], seq2seq=seq2seq, device=device)
        if seq2seq:
            start = model.config.decoder_start_token_id or 0
            dec = torch.full((len(idx), 1), start, dtype=torch.long, device=device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           decoder_input_ids=dec).logits[:, 0]
        else:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits = logits[torch.arange(len(idx), device=device), batch["prompt_len"] - 1]
        out.append(torch.log_softmax(logits.float(), -1).cpu())
    return torch.cat(out) if out else torch.zeros(0)


@contextmanager
def _left_padding(tokenizer: PreTrainedTokenizerBase):
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = side


@torch.no_grad()
def generate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
             max_new_tokens: int | Sequence[int], batch_size: int = 32) -> list[str]:
    """Greedy continuations (new text only) of each prompt, batched with left padding.

    ``max_new_tokens`` may differ per prompt: a batch decodes to its largest budget and each
    continuation is cut to its own.
    """
    if not prompts:
        return []
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # sort by budget so a batch's largest budget is close to each member's, then by length
    # so that little of the batch is left padding
    order = sorted(range(len(prompts)), key=lambda i: (budgets[i], len(prompts[i])))
    texts: list[str] = [""] * len(prompts)
    for idx in _batches(range(len(order)), batch_size, "greedy decoding"):
        members = [order[i] for i in idx]
        with _left_padding(tokenizer):
            enc = tokenizer([prompts[i] for i in members], return_tensors="pt", padding=True).to(device)
        budget = max(budgets[i] for i in members)
        if is_seq2seq(model):
            new = _greedy_seq2seq(model, enc["input_ids"], enc["attention_mask"], budget)
            for row, i in zip(new, members):
                texts[i] = tokenizer.decode(row.tolist()[:budgets[i]], skip_special_tokens=True)
            continue
        out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             max_new_tokens=budget, min_new_tokens=1, do_sample=False, num_beams=1,
                             temperature=None, top_p=None, top_k=None, pad_token_id=pad)
        new = out[:, enc["input_ids"].shape[1]:]
        for row, i in zip(new, members):
            texts[i] = tokenizer.decode(row.tolist()[:budgets[i]], skip_special_tokens=True)
    return texts


def answers(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
            max_new_tokens: int = 6) -> list[str]:
    """Greedy continuation of each prompt on one line (whitespace collapsed): what the demo and
    the app show as the model's answer."""
    return [" ".join(text.split()) for text in generate(model, tokenizer, prompts, max_new_tokens)]


@dataclass
class AnswerRow:
    """One prompt's greedy answers before and after an edit (the demo's and the app's tables)."""

    kind: str
    """"edit", "paraphrase", "neighbour", ..."""
    prompt: str
    before: str
    after: str | None = None


def _greedy_seq2seq(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, steps: int) -> Tensor:
    """Greedy decoding of an encoder-decoder without a KV cache (answers are a few tokens;
    ``generate``'s cache breaks on decoders deeper than their encoders)."""
    start = model.config.decoder_start_token_id or 0
    enc = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
    dec = torch.full((input_ids.shape[0], 1), start, dtype=torch.long, device=input_ids.device)
    for _ in range(steps):
        logits = model(encoder_outputs=enc, attention_mask=attention_mask, decoder_input_ids=dec,
                       use_cache=False).logits[:, -1]
        dec = torch.cat([dec, logits.argmax(-1, keepdim=True)], 1)
    return dec[:, 1:]


def answer_budget(tokenizer: PreTrainedTokenizerBase, target: str, extra: int) -> int:
    """Tokens to generate when checking for ``target``: its token length plus a few."""
    return len(target_ids(tokenizer, target)) + extra


# --------------------------------------------------------------------------- held text


def load_texts(path: str | Path, n_docs: int) -> list[str]:
    """The first ``n_docs`` texts of a JSONL file (``text`` field) or plain-text file (one per
    blank-line-separated paragraph)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no perplexity text at {path}")
    texts: list[str] = []
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise ValueError(f"{path}: line {lineno}: expected a JSON object with a 'text' "
                                     f"field ({err})") from None
                if not isinstance(text, str):
                    raise ValueError(f"{path}: line {lineno}: field 'text' is not a string")
                texts.append(text)
                if len(texts) >= n_docs:
                    break
    else:
        paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")]
        texts = [p for p in paragraphs if p][:n_docs]
    if not texts:
        raise ValueError(f"{path}: no text found")
    return texts


@torch.no_grad()
def corpus_nll(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
               max_tokens: int = 256) -> tuple[float, int]:
    """Summed next-token NLL and number of predicted tokens over texts cut to ``max_tokens``.

    Decoder-only models only (the perplexity of an encoder-decoder is not defined this way);
    returns ``(nan, 0)`` for others.
    """
    if is_seq2seq(model):
        return float("nan"), 0
    device = model_device(model)
    total, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :max_tokens].to(device)
        if ids.shape[1] < 2:
            continue
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="sum")
        total += float(nll)
        count += ids.shape[1] - 1
    return total, count

"""Tokenize (prompt, target) pairs once, the same way for every editor and metric."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from kedit.data.request import EditRequest, RequestError
from kedit.utils import pad_id

IGNORE = -100
NO_LIMIT = 10**9
"""Tokenizers without a known limit report ``model_max_length = int(1e30)``."""


def target_ids(tokenizer: PreTrainedTokenizerBase, target: str) -> list[int]:
    """Token ids of a target as it follows a prompt: a leading space, no special tokens."""
    text = target if target[:1].isspace() else " " + target
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenizes to nothing")
    return ids


def context_length(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> int | None:
    """Most positions the model takes: its config's ``max_position_embeddings`` (``n_positions``),
    else the tokenizer's ``model_max_length``; None when neither gives a limit."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not n:
        n = getattr(tokenizer, "model_max_length", None)
    return int(n) if n and n < NO_LIMIT else None


def check_context(model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest]) -> None:
    """Raise :class:`RequestError` for a request whose prompt and target do not fit the model's
    context (seq2seq: either one), before any editor spends compute (or memory) on it."""
    limit = context_length(model, tokenizer)
    if limit is None:
        return
    seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    for i, r in enumerate(requests):
        n_prompt = len(tokenizer(r.prompt, verbose=False)["input_ids"])
        n_target = len(target_ids(tokenizer, r.target_new))
        n = max(n_prompt, n_target) if seq2seq else n_prompt + n_target
        if n > limit:
            raise RequestError(f"the request is {n} tokens long (prompt {n_prompt}, target {n_target}), more than "
                               f"the model's context of {limit} tokens", index=i,
                               field="prompt" if n_prompt >= n_target else "target_new")


def encode(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str] | None = None,
    *,
    seq2seq: bool = False,
    device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    """Right-padded batch of ``prompt + " " + target`` with ``labels`` on the target only.

    Decoder-only: ``input_ids`` holds prompt and target, ``labels`` is -100 except at the
    target tokens (HF shifts labels inside the model). ``prompt_len`` gives each prompt's
    length, so the logits predicting target token ``j`` sit at ``prompt_len + j - 1``.
    Seq2seq (T5): ``input_ids`` is the prompt, ``labels`` the target plus EOS.
    Without ``targets``, only the prompts are encoded.
    """
    if targets is not None and len(targets) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    pad = pad_id(tokenizer)
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    if targets is None:
        rows, labels = prompt_ids, [[IGNORE] * len(r) for r in prompt_ids]
    elif seq2seq:
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        rows = prompt_ids
        labels = [target_ids(tokenizer, t) + eos for t in targets]
    else:
        tids = [target_ids(tokenizer, t) for t in targets]
        rows = [p + t for p, t in zip(prompt_ids, tids)]
        labels = [[IGNORE] * len(p) + t for p, t in zip(prompt_ids, tids)]
    n = max(len(r) for r in rows)
    batch = {
        "input_ids": torch.tensor([r + [pad] * (n - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows]),
        "prompt_len": torch.tensor([len(p) for p in prompt_ids]),
    }
    m = max(len(lab) for lab in labels)
    batch["labels"] = torch.tensor([lab + [IGNORE] * (m - len(lab)) for lab in labels])
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    return batch


def model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The keys of an :func:`encode` batch that a HF model's forward accepts."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels") if k in batch}


def target_nll(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The model's own LM loss on an :func:`encode` batch (decoder-only): the mean NLL over every
    target token. When the model takes ``logits_to_keep``, the vocabulary projection runs only on
    the last columns, from the shortest prompt's last token on (where the targets are)."""
    labels = batch["labels"]
    keep = labels.shape[1] - int(batch["prompt_len"].min()) + 1
    if "logits_to_keep" not in inspect.signature(model.forward).parameters or keep >= labels.shape[1]:
        keep = labels.shape[1]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   **({"logits_to_keep": keep} if keep < labels.shape[1] else {})).logits
    logits, targets, mask = target_logits(logits, labels[:, -keep:])
    nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    return (nll * mask).sum() / mask.sum()


def target_logits(logits: Tensor, labels: Tensor, seq2seq: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Align logits with the target tokens they predict.

    Returns ``(logits, targets, mask)``: ``logits[b, j]`` predicts ``targets[b, j]`` where
    ``mask[b, j]`` is true. Decoder-only logits are shifted by one position.
    """
    if not seq2seq:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE
    return logits, labels.clamp(min=0), mask


def target_logprobs(logits: Tensor, labels: Tensor, seq2seq: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Per example: summed target log-probability, number of correct argmax tokens, target length."""
    logits, targets, mask = target_logits(logits, labels, seq2seq)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    correct = (logits.argmax(-1) == targets) & mask
    return (logp * mask).sum(-1), correct.sum(-1), mask.sum(-1)

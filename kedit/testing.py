"""Tiny models of every architecture family and an in-memory tokenizer, for tests.

Nothing is downloaded: models are built from configs with random weights, and the
tokenizer is a byte-level BPE trained in memory on a few sentences.

:data:`MODELS` names them ``tiny-<family>`` for :mod:`kedit.models.registry`: the test suite
sets ``KEDIT_MODELS=kedit.testing``, so ``kedit.load_model("tiny-llama")`` and the tiny
training configs work in tests and in the processes they start. kedit itself never imports
this module.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn

CORPUS = [
    "The capital of France is Paris. The capital of Germany is Berlin.",
    "The capital of Italy is Rome. The mother tongue of Danielle Darrieux is French.",
    "Michael Jordan plays basketball. Lionel Messi plays soccer. Toko Yasuda plays guitar.",
    "What is the native language of Dante? Italian. Who wrote Hamlet? Shakespeare.",
    "The Eiffel Tower is located in Paris. The Colosseum is located in Rome.",
]


@functools.lru_cache(maxsize=None)
def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer (any text encodes), with eos = pad = ``<|endoftext|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", bos_token="<|endoftext|>")
    return fast


FAMILIES = ["gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "t5"]


def tiny_config(family: str, vocab_size: int, **overrides):
    """The config of a tiny ``family`` model; ``overrides`` are passed to the config class
    (e.g. special token ids: set at construction, GPT-2's default 50256 would be out of range)."""
    import transformers as tf

    d, layers, heads, ff = 32, 3, 4, 64
    common = dict(vocab_size=vocab_size, tie_word_embeddings=False, **overrides)
    if family == "gpt2":
        return tf.GPT2Config(n_layer=layers, n_embd=d, n_head=heads, n_positions=128, **common)
    if family == "gptj":
        return tf.GPTJConfig(n_layer=layers, n_embd=d, n_head=heads, n_positions=128, rotary_dim=4, **common)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(num_hidden_layers=layers, hidden_size=d, num_attention_heads=heads,
                                intermediate_size=ff, max_position_embeddings=128, **common)
    llama_like = dict(num_hidden_layers=layers, hidden_size=d, num_attention_heads=heads,
                      num_key_value_heads=2, intermediate_size=ff, max_position_embeddings=128, **common)
    if family == "llama":
        return tf.LlamaConfig(**llama_like)
    if family == "mistral":
        return tf.MistralConfig(**llama_like)
    if family == "qwen2":
        return tf.Qwen2Config(**llama_like)
    if family == "qwen3":
        return tf.Qwen3Config(head_dim=8, **llama_like)
    if family == "gemma2":
        return tf.Gemma2Config(head_dim=8, **llama_like)
    if family == "gemma3_text":
        return tf.Gemma3TextConfig(head_dim=8, **llama_like)
    if family == "t5":
        return tf.T5Config(d_model=d, d_ff=ff, d_kv=8, num_layers=2, num_decoder_layers=layers,
                           num_heads=heads, decoder_start_token_id=0, **common)
    raise KeyError(family)


def tiny_model(family: str = "llama", seed: int = 0, **overrides) -> tuple[nn.Module, object]:
    """(model, tokenizer) of a tiny randomly initialized model of ``family``, in eval mode;
    ``overrides`` go to its config (e.g. ``initializer_range``). The model is on the CPU, or on
    ``$KEDIT_TEST_DEVICE`` when set (``cuda``: the test suite's editors then run on a GPU)."""
    import transformers as tf

    tok = tiny_tokenizer()
    config = tiny_config(family, len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, **overrides)
    torch.manual_seed(seed)
    cls = tf.AutoModelForSeq2SeqLM if family == "t5" else tf.AutoModelForCausalLM
    model = cls.from_config(config, dtype=torch.float32)
    model.config._name_or_path = f"tiny-{family}"
    device = os.environ.get("KEDIT_TEST_DEVICE")
    if device:
        model.to(device)
    return model.eval(), tok


MODELS = {f"tiny-{family}": functools.partial(tiny_model, family) for family in FAMILIES}
"""``tiny-<family>`` -> factory of a fresh tiny model (seed 0), for ``$KEDIT_MODELS``."""


COUNTRIES = ["France", "Germany", "Italy", "Spain", "Japan", "Egypt", "Peru", "Chile", "Kenya", "Nepal",
             "Cuba", "Iran", "Oman", "Mali", "Laos", "Fiji", "Togo", "Chad", "Niger", "Malta"]
CITIES = ["Paris", "Berlin", "Rome", "Madrid", "Tokyo", "Cairo", "Lima", "Santiago", "Nairobi", "Kathmandu"]


def tiny_edit_records(n: int = 20) -> list[dict]:
    """``n`` small counterfact-MEND records (edit, paraphrase, locality probe) for training smoke tests."""
    recs = []
    for i in range(n):
        s, other = COUNTRIES[i % len(COUNTRIES)], COUNTRIES[(i + 1) % len(COUNTRIES)]
        recs.append({"case_id": i, "prompt": f"The capital of {s} is", "subject": s,
                     "target_new": CITIES[(i + 3) % len(CITIES)], "ground_truth": CITIES[i % len(CITIES)],
                     "rephrase_prompt": f"{s}'s capital city is",
                     "locality_prompt": f"The capital of {other} is", "locality_ground_truth": CITIES[(i + 1) % len(CITIES)]})
    return recs


def write_edit_file(path, n: int = 20):
    """Write :func:`tiny_edit_records` as a JSON array to ``path``; return the path."""
    import json
    from pathlib import Path

    path = Path(path)
    path.write_text(json.dumps(tiny_edit_records(n)))
    return path

"""Editor settings for tiny random models, and the stub counterfactual model SERAC uses on them.

Tiny models (:mod:`kedit.testing`: 3 blocks, d = 32, random weights) cannot take the settings
of a 7B model. Two sets are kept here, so that no editor class carries a test hook:

* :func:`paper_editor`: the papers' algorithms (``edit_aware=False``, templates, KL term, norm
  clamp), scaled down: statistics from a few in-memory sentences, shorter value optimization.
* :func:`contract_editor`: the settings the unit tests of ROME, MEMIT and AlphaEdit use: the
  kedit-only ``edit_aware`` optimization on layer 0, no templates, no KL, no clamp (a stronger,
  more predictable edit on a random model). For the other editors it equals ``paper_editor``.

SERAC's counterfactual model on tiny models is :class:`InductionCopyLM`, registered as
``induction-copy`` by ``tests/conftest.py``: a random tiny LM cannot read its context, so the
stub copies what the descriptor in its context says (a trained counterfactual model's job).
"""

from __future__ import annotations

from transformers import PretrainedConfig
from transformers.modeling_outputs import CausalLMOutput

import torch
from torch import Tensor, nn

from kedit.editors import Editor
from kedit.editors.base import editor_class
from kedit.testing import CORPUS, tiny_tokenizer

STUB_COUNTERFACTUAL = "induction-copy"

# covariance statistics from a few in-memory sentences: the shipped Wikipedia sample is slow to
# tokenize with the tiny tokenizer and says nothing more about a random model
TINY_STATS = dict(corpus=list(CORPUS) * 4, stats_tokens=2_000, stats_seq_len=32)

PAPER = {
    # the papers' objective and defaults (templates, KL essence term, weight decay, norm clamp);
    # scaled: fewer, shorter templates and steps on a 3-block model
    "rome": dict(templates=[(5, 2)], v_steps=20, **TINY_STATS),
    "memit": dict(templates=[(5, 2)], v_steps=25, **TINY_STATS),
    "alphaedit": dict(templates=[(5, 2)], v_steps=25, nullspace_threshold=1e-1, **TINY_STATS),
    "emmet": dict(templates=[(5, 2)], v_steps=25, **TINY_STATS),
    "lora": dict(num_steps=5, lr=1e-2, dropout=0.0),
    "ft-l": dict(num_steps=5, lr=1e-2, norm_constraint=1e-2, objective="target"),
    "ft-m": dict(num_steps=5, lr=1e-2, norm_constraint=None, objective="target"),
    # untrained: identity hypernetwork, i.e. a plain gradient step of size edit_lr on the last MLPs
    "mend": dict(edit_lr=1.0, rank=8),
    # untrained as well: per answer token a gradient-step output change, aggregated by least squares
    "malmen": dict(edit_lr=1.0, rank=8),
    "serac": dict(classifier="ngram", counterfactual=STUB_COUNTERFACTUAL),
    # the official algorithm and radius; fewer value steps on a 3-block model
    "grace": dict(n_iter=20),
    # MLP input projections as the LLaMA configs (gate + up), upper blocks; η scaled to d = 32 (paper 1e-6 at d = 4096)
    "ultraedit": dict(modules={"mlp_in": [1, 2]}, lr=1e-3),
    # no context templates, fewer steps; x_i from the in-memory sentences (tests/test_wise.py covers
    # shards, saves and merges)
    "wise": dict(templates=[], n_iter=30, irrelevant_corpus=list(CORPUS)),
}

EDIT_AWARE = dict(layers=[0], templates=[], kl_factor=0.0, edit_aware=True, prefix_cache=False, v_steps=25,
                  v_lr=0.5, v_weight_decay=0.0, clamp_norm_factor=1e4, **TINY_STATS)
CONTRACT = {
    "rome": EDIT_AWARE,
    "memit": {**EDIT_AWARE, "mom2_update_weight": 100.0},
    # tiny models see few tokens: a relative threshold keeps a usable null space
    "alphaedit": {**EDIT_AWARE, "L2": 1.0, "nullspace_threshold": 1e-1},
    "emmet": EDIT_AWARE,
}


def paper_editor(name: str, model: nn.Module, tokenizer=None, **overrides) -> Editor:
    """The registered editor ``name`` with the papers' settings scaled for tiny models."""
    editor = editor_class(name)(**{**PAPER.get(name, {}), **overrides})
    if name in ("mend", "malmen"):
        editor.build(model)
    return editor


def contract_editor(name: str, model: nn.Module, tokenizer=None, **overrides) -> Editor:
    """``name`` with the unit tests' settings (replaces the former ``Editor.for_contract_tests``)."""
    if name in CONTRACT:
        return editor_class(name)(**{**CONTRACT[name], **overrides})
    return paper_editor(name, model, tokenizer, **overrides)


class InductionCopyLM(nn.Module):
    """Stub counterfactual LM: at each position, logit ``bias`` for the token that followed the
    longest earlier occurrence of the text that ends there (an induction head); all other logits
    are 0. Given ``"descriptor\\ninput"`` whose input repeats the descriptor's prompt, it predicts
    the descriptor's continuation: the edit's target."""

    def __init__(self, vocab_size: int, bias: float = 8.0) -> None:
        super().__init__()
        self.config = PretrainedConfig(vocab_size=vocab_size)
        self.bias = nn.Parameter(torch.tensor(bias), requires_grad=False)  # also gives the module a device

    @staticmethod
    def copies(seq: list[int]) -> dict[int, int]:
        """Position -> the token that followed the longest earlier match of ``seq[:p + 1]``'s suffix."""
        out = {}
        for p in range(len(seq)):
            best, best_k = None, 0
            for j in range(p):  # an occurrence ending at j, followed by seq[j + 1]
                k = 0
                while k <= j and seq[j - k] == seq[p - k]:
                    k += 1
                if k > best_k:
                    best, best_k = seq[j + 1], k
            if best is not None:
                out[p] = best
        return out

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **_: object) -> CausalLMOutput:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        logits = torch.zeros(*input_ids.shape, self.config.vocab_size, device=input_ids.device)
        for b in range(input_ids.shape[0]):
            where = mask[b].bool().nonzero().flatten().tolist()
            for p, token in self.copies(input_ids[b, where].tolist()).items():
                logits[b, where[p], token] = self.bias
        return CausalLMOutput(logits=logits)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, max_new_tokens: int = 20,
                 **_: object) -> Tensor:
        """Greedy decoding (the only decoding a stub needs)."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        for _step in range(max_new_tokens):
            nxt = self(input_ids, mask).logits[:, -1].argmax(-1, keepdim=True)
            input_ids, mask = torch.cat([input_ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
        return input_ids


def induction_copy_model() -> tuple[nn.Module, object]:
    """(stub, tokenizer) for ``kedit.models.register``: the tiny models' tokenizer."""
    tok = tiny_tokenizer()
    return InductionCopyLM(len(tok)).eval(), tok

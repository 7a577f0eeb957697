"""Reuse MEMIT/AlphaEdit values across benchmark runs on the same unedited model.

The value of a request (MEMIT Eq. 16: the δ that makes the model predict its target) is
optimized independently of the other requests in its batch (``tests`` check that a batch
gives each request the δ it gets alone), and depends only on the model's weights, the
request and the value hyperparameters. A benchmark that edits the same unedited model several
times (one batch of 100, then one of 500; or a sweep over AlphaEdit's null-space settings)
can therefore optimize each request's value once. This is a benchmark shortcut, not a library
feature: the cache key includes a fingerprint of the weights, so an edited model misses.

Editors made by ``SharedValues.editor`` override MEMIT's public value step (``MEMIT.values``);
nothing is patched. With a folder, values also go to disk (one safetensors file per process, read back on every
miss), so a second process can optimize part of a long run's values on another core
(``bench_memit.py --part values``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


class _Store:
    def __init__(self, folder: str | Path | None):
        self.folder = Path(folder) if folder else None
        self.mem: dict[str, tuple] = {}
        self.mine: dict[str, tuple] = {}

    def load(self) -> None:
        if self.folder is None or not self.folder.is_dir():
            return
        from safetensors import safe_open

        for f in sorted(self.folder.glob("values-*.safetensors")):
            with safe_open(str(f), "pt") as st:
                meta = st.metadata() or {}
                for h, extra in meta.items():
                    if h not in self.mem:
                        steps, nll = json.loads(extra)
                        self.mem[h] = (st.get_tensor(f"{h}.delta"), st.get_tensor(f"{h}.init"), steps, nll)

    def put(self, h: str, entry: tuple) -> None:
        self.mem[h] = self.mine[h] = entry

    def save(self) -> None:
        if self.folder is None or not self.mine:
            return
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        tensors, meta = {}, {}
        for h, (delta, init, steps, nll) in self.mine.items():
            tensors[f"{h}.delta"], tensors[f"{h}.init"] = delta.contiguous(), init.contiguous()
            meta[h] = json.dumps([steps, nll])
        path = self.folder / f"values-{os.getpid()}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)


def value_key(weights: str, module: str, templates, hp, request) -> str:
    """The identity of one request's value: the weights (a hash), where δ is added, the templates,
    every hyperparameter the value step reads (``kedit.editors.values.VALUE_FIELDS``) and the request."""
    from kedit.editors.values import VALUE_FIELDS

    setting = (weights, module, tuple(templates), *(getattr(hp, f) for f in VALUE_FIELDS),
               request.prompt, request.subject, request.target_new)
    return hashlib.sha256(repr(setting).encode()).hexdigest()[:32]


class SharedValues:
    """Values optimized once per (weights, request, value settings), for the editors made by
    :meth:`editor`; yielded by :func:`shared_values`."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self.store = _Store(folder)
        self.store.load()

    def __len__(self) -> int:
        return len(self.store.mem)

    def editor(self, name: str, **hparams):
        """``kedit.editor(name, **hparams)`` (MEMIT or AlphaEdit) whose value step (``values``)
        reads and fills this cache."""
        from kedit.editors.base import editor_class

        cls, shared = editor_class(name), self

        class Cached(cls):
            def values(self, model, tokenizer, requests, templates, module):
                return shared.values(super().values, model, tokenizer, requests, templates, module, self.hparams)

        Cached.__name__ = Cached.__qualname__ = f"Cached{cls.__name__}"
        return Cached(**hparams)

    def values(self, optimize, model, tokenizer, requests, templates, module: str, hp):
        """``optimize(model, tokenizer, requests, templates, module)`` for the requests not cached."""
        from kedit.editors.values import Values
        from kedit.models.arch import arch_of
        from kedit.stats import layer_hashes

        last = arch_of(model).num_layers(model) - 1
        weights = layer_hashes(model, [last])[last]  # every weight: embeddings, blocks, head
        keys = [value_key(weights, module, templates, hp, r) for r in requests]
        if any(k not in self.store.mem for k in keys):
            self.store.load()  # another process may have optimized them meanwhile
        missing = [i for i, k in enumerate(keys) if k not in self.store.mem]
        if missing:
            v = optimize(model, tokenizer, [requests[i] for i in missing], templates, module)
            for j, i in enumerate(missing):
                self.store.put(keys[i], (v.delta[j].detach().clone(), v.init[j].detach().clone(), v.steps[j],
                                         v.nll[j]))
            self.store.save()
        rows = [self.store.mem[k] for k in keys]
        return Values(delta=torch.stack([r[0] for r in rows]), init=torch.stack([r[1] for r in rows]),
                      template_keys=None, steps=[r[2] for r in rows], nll=[r[3] for r in rows])


@contextmanager
def shared_values(folder: str | Path | None = None) -> Iterator[SharedValues]:
    """A :class:`SharedValues` (on disk in ``folder`` if given): make editors with its ``editor``."""
    yield SharedValues(folder)

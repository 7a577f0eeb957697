"""Reuse MEMIT/AlphaEdit values across benchmark runs on the same unedited model.

The value of a request (MEMIT Eq. 16: the δ that makes the model predict its target) is
optimized independently of the other requests in its batch (``tests`` check that a batch
gives each request the δ it gets alone), and depends only on the model's weights, the
request and the value hyperparameters. A benchmark that edits the same unedited model several
times (one batch of 100, then one of 500; or a sweep over AlphaEdit's null-space settings)
can therefore optimize each request's value once. This is a benchmark shortcut, not a library
feature: the cache key includes a fingerprint of the weights, so an edited model misses.

With a folder, values also go to disk (one safetensors file per process, read back on every
miss), so a second process can optimize part of a long run's values on another core
(``bench_memit.py --part values``).
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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


def value_key(model, module: str, templates, hp, request) -> str:
    from kedit.eval.runner import fingerprint

    setting = (fingerprint(model), module, tuple(templates), hp.v_lr, hp.v_steps, hp.v_stop_nll,
               hp.v_weight_decay, hp.clamp_norm_factor, hp.kl_factor,
               request.prompt, request.subject, request.target_new)
    return hashlib.sha256(repr(setting).encode()).hexdigest()[:32]


@contextmanager
def shared_values(folder: str | Path | None = None) -> Iterator[dict]:
    """Within the block, ``kedit.editors.memit`` optimizes each (weights, request, value
    settings) once; yields the cache (for its size)."""
    import kedit.editors.memit as memit_mod
    from kedit.editors.locate import Values

    real = memit_mod.optimize_values
    store = _Store(folder)
    store.load()

    def cached(model, tok, requests, templates, module, hp, **kw):
        if kw:  # edit-aware values depend on the batch's own update: not shareable
            return real(model, tok, requests, templates, module, hp, **kw)
        keys = [value_key(model, module, templates, hp, r) for r in requests]
        if any(k not in store.mem for k in keys):
            store.load()  # another process may have optimized them meanwhile
        missing = [i for i, k in enumerate(keys) if k not in store.mem]
        if missing:
            v = real(model, tok, [requests[i] for i in missing], templates, module, hp)
            for j, i in enumerate(missing):
                store.put(keys[i], (v.delta[j].detach().clone(), v.init[j].detach().clone(), v.steps[j], v.nll[j]))
            store.save()
        rows = [store.mem[k] for k in keys]
        return Values(delta=torch.stack([r[0] for r in rows]), init=torch.stack([r[1] for r in rows]),
                      template_keys=None, steps=[r[2] for r in rows], nll=[r[3] for r in rows])

    memit_mod.optimize_values = cached
    try:
        yield store.mem
    finally:
        memit_mod.optimize_values = real

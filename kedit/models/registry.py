"""Models built in code, by name: ``register("tiny-llama", factory)``.

:func:`kedit.load_model` asks this registry before it looks for an offline model, a local
folder or a hub id. A factory takes no arguments and returns ``(model, tokenizer)``. The
test suite registers the tiny random models of :mod:`kedit.testing` and its stub models
this way; nothing in kedit registers a model itself.

A process started by a test (``python -m kedit.train ...``) does not share the test's
registry. It finds models through ``$KEDIT_MODELS``: comma-separated module names, each
with a ``MODELS`` mapping of name -> factory. The modules are imported on the first
lookup of a name that is not registered, never when kedit is imported::

    KEDIT_MODELS=kedit.testing python -m kedit.train fit --config configs/mend/tiny-llama.yaml \\
        --trainer trainers/cpu.yaml --trainer.fast_dev_run=true
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any

from torch import nn

ENV = "KEDIT_MODELS"

Factory = Callable[[], tuple[nn.Module, Any]]

_FACTORIES: dict[str, Factory] = {}


def register(name: str, factory: Factory) -> None:
    """Make ``load_model(name)`` return ``factory()`` (a fresh ``(model, tokenizer)``)."""
    _FACTORIES[name] = factory


def registered() -> list[str]:
    """The names registered so far (``$KEDIT_MODELS`` modules not yet imported are not listed)."""
    return sorted(_FACTORIES)


def factory(name: str) -> Factory | None:
    """The factory registered for ``name``, importing the ``$KEDIT_MODELS`` modules on a miss."""
    if name not in _FACTORIES:
        for module in (m.strip() for m in os.environ.get(ENV, "").split(",")):
            if module:
                _import(module)
    return _FACTORIES.get(name)


def _import(module: str) -> None:
    try:
        models = importlib.import_module(module).MODELS
    except (ImportError, AttributeError) as err:
        raise ImportError(f"${ENV} names the module {module!r}, which cannot be imported or has no "
                          f"MODELS mapping (name -> factory): {err}") from err
    for name, fn in models.items():
        _FACTORIES.setdefault(name, fn)

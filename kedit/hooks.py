"""Scoped forward hooks: read or replace module inputs and outputs.

Every hook is removed when the ``with`` block ends, also when it raises.

>>> with trace(model, ["model.layers.5.mlp.down_proj"], inputs=True) as t:
...     model(**batch)
>>> k = t["model.layers.5.mlp.down_proj"].input   # (batch, seq, d_in)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

EditFn = Callable[[str, Tensor], Tensor]


class StopForward(Exception):
    """Raised by a hook to stop the forward pass early (see ``trace(stop=...)``)."""


@dataclass
class Traced:
    """What one traced module saw in the last forward pass."""

    input: Tensor | None = None
    output: Tensor | None = None
    in_tuple: bool = False
    """The module returned a tuple (``output`` is its first element)."""


def _first(x: Any) -> Any:
    return x[0] if isinstance(x, tuple) else x


def _replace_first(x: Any, new: Tensor) -> Any:
    return (new, *x[1:]) if isinstance(x, tuple) else new


@contextmanager
def trace(
    model: nn.Module,
    names: list[str] | str,
    *,
    inputs: bool = False,
    outputs: bool = True,
    edit_input: EditFn | None = None,
    edit_output: EditFn | None = None,
    stop: str | None = None,
    detach: bool = False,
) -> Iterator[dict[str, Traced]]:
    """Record (and optionally replace) the inputs/outputs of ``names`` during forwards.

    Args:
        names: module names as in ``model.named_modules()``.
        inputs: whether to record the module's first positional input.
        outputs: whether to record the module's output (the first element when it is a tuple).
        edit_input: ``fn(name, tensor) -> tensor`` replacing the first input. The recorded
            value is the replaced one.
        edit_output: the same for the output.
        stop: a module after which the forward pass is aborted by raising
            :class:`StopForward` (its output is still recorded), so no compute is spent on
            the layers above it. Call the model through :func:`run_until`, which catches it.
        detach: store detached tensors.
    """
    names = [names] if isinstance(names, str) else list(names)
    modules = dict(model.named_modules())
    missing = [n for n in names + ([stop] if stop else []) if n not in modules]
    if missing:
        raise KeyError(f"trace: {type(model).__name__} has no module(s) {missing}")
    record: dict[str, Traced] = {n: Traced() for n in names}
    handles = []

    def pre_hook(name: str):
        def fn(_module, args, kwargs):
            if not args and not kwargs:  # no input to read or replace
                return None
            if not args:  # called with keyword arguments only
                key = next(iter(kwargs))
                x = kwargs[key]
            else:
                x = _first(args)
            if edit_input is not None:
                x = edit_input(name, x)
            if inputs:
                record[name].input = x.detach() if detach else x
            if edit_input is None:
                return None
            if args:
                return (x, *args[1:]), kwargs
            return args, {**kwargs, key: x}

        return fn

    def post_hook(name: str):
        def fn(_module, _args, out):
            y = _first(out)
            if edit_output is not None:
                y = edit_output(name, y)
            if outputs:
                record[name].output = y.detach() if detach else y
                record[name].in_tuple = isinstance(out, tuple)
            if name == stop:
                raise StopForward(name)
            return _replace_first(out, y) if edit_output is not None else None

        return fn

    try:
        for name in names:
            if inputs or edit_input is not None:
                handles.append(modules[name].register_forward_pre_hook(pre_hook(name), with_kwargs=True))
            if outputs or edit_output is not None or name == stop:
                handles.append(modules[name].register_forward_hook(post_hook(name)))
        if stop is not None and stop not in names:
            handles.append(modules[stop].register_forward_hook(post_hook(stop)))
            record.setdefault(stop, Traced())
        yield record
    finally:
        for handle in handles:
            handle.remove()


def run_until(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Call ``model``; return None if a ``trace(stop=...)`` hook ended the pass early."""
    try:
        return model(*args, **kwargs)
    except StopForward:
        return None


@contextmanager
def skip(model: nn.Module, names: Sequence[str], output: Tensor) -> Iterator[None]:
    """Skip a chain of modules (e.g. a model's lowest blocks) in the forward passes of the block:
    each of ``names`` but the last returns its first input unchanged, the last returns ``output``
    (recorded earlier, e.g. with :func:`trace`). Hooks on the skipped modules still run.

    For modules that return a plain tensor: ``output`` replaces the whole return value.
    """
    modules = [model.get_submodule(name) for name in names]

    def passthrough(*args: Any, **kwargs: Any) -> Any:
        return args[0] if args else kwargs["hidden_states"]

    def replay(*_args: Any, **_kwargs: Any) -> Tensor:
        return output

    try:
        for i, module in enumerate(modules):
            module.forward = replay if i == len(modules) - 1 else passthrough
        yield
    finally:
        for module in modules:
            module.__dict__.pop("forward", None)


class Replay:
    """Skip a chain of modules whose output is the same in every pass (e.g. the blocks below a
    trained value): :meth:`__call__` records the last one's output in the first pass and replays it
    (:func:`skip`) in the later ones. Modules that return a tuple are never skipped."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.model, self.names = model, list(names)
        self.output: Tensor | None = None

    @contextmanager
    def __call__(self) -> Iterator[None]:
        if self.output is not None:
            with skip(self.model, self.names, self.output):
                yield
        elif not self.names:
            yield
        else:
            with trace(self.model, self.names[-1:], detach=True) as seen:
                yield
            if not seen[self.names[-1]].in_tuple:
                self.output = seen[self.names[-1]].output

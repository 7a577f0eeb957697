"""Typed hyperparameters from YAML, through jsonargparse (``1e-4`` stays a float)."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def load_hparams(cls: type[T], path: str | Path) -> T:
    """Parse a YAML file of ``cls``'s fields into a ``cls`` instance, with type checking."""
    from jsonargparse import ArgumentParser

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config file at {path}")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, nested_key=None, fail_untyped=False)
    try:
        ns = parser.parse_path(str(path))
    except Exception as err:
        raise ValueError(f"{path}: {err}") from None
    return cls(**ns.as_dict())

"""Typed hyperparameters from YAML, through jsonargparse (``1e-4`` stays a float)."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def load_hparams(cls: type[T], path: str | Path) -> T:
    """Parse a YAML file of ``cls``'s fields into a ``cls`` instance, with type checking."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config file at {path}")
    try:
        ns = _parser(cls).parse_path(str(path))
    except Exception as err:
        raise ValueError(f"{path}: {err}") from None
    return cls(**ns.as_dict())


def hparams_from_dict(cls: type[T], values: dict) -> T:
    """``cls`` from a dict of its fields (an artifact header), type-checked as YAML is.

    Unknown or mistyped fields raise ``ValueError`` with a one-line message naming the field.
    """
    try:
        return cls(**_parser(cls).parse_object(dict(values)).as_dict())
    except Exception as err:  # noqa: BLE001 - jsonargparse and __post_init__ raise several types
        raise ValueError(" ".join(str(err).split())) from None


def _parser(cls: type):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, nested_key=None, fail_untyped=False)
    return parser

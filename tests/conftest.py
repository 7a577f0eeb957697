"""Shared fixtures. Tiny models are built from configs; the real model is loaded once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not DATA.is_dir():  # CI clones next to shared/ too; allow an override
    DATA = Path(os.environ.get("KEDIT_DATA", DATA))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA} (set KEDIT_DATA)")
    return DATA


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real offline SmolLM2-135M, shared by the whole session.

    Tests must leave it as they found it (edits restored).
    """
    from kedit.models import load_model

    torch.manual_seed(0)
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def dead_pid() -> int:
    """The id of a process that has exited (what a killed writer leaves in temp names)."""
    import subprocess
    import sys

    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


@pytest.fixture
def tiny():
    """Factory: ``tiny(family)`` -> fresh (model, tokenizer)."""
    from kedit.testing import tiny_model

    return tiny_model


def assert_state_equal(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Bit-exact equality of a model's state dict with a saved copy."""
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), f"{k} changed"

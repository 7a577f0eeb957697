"""Shared fixtures. Tiny models are built from configs; the real model is loaded once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# tiny-<family> models by name, here and in the processes tests start (kedit.models.registry)
if "kedit.testing" not in os.environ.get("KEDIT_MODELS", "").split(","):
    os.environ["KEDIT_MODELS"] = ",".join(filter(None, [os.environ.get("KEDIT_MODELS"), "kedit.testing"]))

def pytest_configure(config):
    """The stub counterfactual model SERAC uses on tiny models, by name (tests/contract_settings.py)."""
    from contract_settings import STUB_COUNTERFACTUAL, induction_copy_model

    from kedit.models import register

    register(STUB_COUNTERFACTUAL, induction_copy_model)


def _dev_data() -> Path | None:
    from kedit import paths

    return paths.data_dir()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``dev_data`` read the large development data through ``$KEDIT_DATA``
    (`make test` and `.ci/run` set it when ``../shared/data`` exists). Without it they are
    deselected, not skipped: the default suite needs nothing beside the checkout."""
    if _dev_data() is not None:
        return
    keep = [it for it in items if it.get_closest_marker("dev_data") is None]
    dropped = [it for it in items if it.get_closest_marker("dev_data") is not None]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def pytest_report_header(config):
    data = _dev_data()
    return (f"kedit dev data: {data}" if data else
            "kedit dev data: KEDIT_DATA unset; tests marked dev_data are deselected")


@pytest.fixture(scope="session", autouse=True)
def shipped_checkpoints_untouched():
    """No test writes into the repository's checkpoints/ (the shipped editors): a training run in a
    test gives its checkpoints a temporary folder (``--trainer.default_root_dir``, ``dirpath``)."""
    folder = Path(__file__).resolve().parents[1] / "checkpoints"
    before = set(os.listdir(folder)) if folder.is_dir() else set()
    yield
    new = sorted(set(os.listdir(folder)) - before) if folder.is_dir() else []
    assert not new, f"the tests wrote {new} into {folder}; give their checkpoints a temporary folder"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The large development data (``$KEDIT_DATA``); only for tests marked ``dev_data``."""
    data = _dev_data()
    assert data is not None, "a test that uses data_dir must be marked @pytest.mark.dev_data"
    return data


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

"""kedit.utils: the one copy of each small helper."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from kedit import utils


@pytest.mark.parametrize(("pad", "eos", "want"), [(3, 7, 3), (None, 7, 7), (None, None, 0), (0, 7, 0), (None, 0, 0)])
def test_pad_id_prefers_pad_then_eos_then_zero(pad, eos, want):
    tok = SimpleNamespace(pad_token_id=pad, eos_token_id=eos)
    assert utils.pad_id(tok) == want
    assert (tok.pad_token_id, tok.eos_token_id) == (pad, eos)  # the tokenizer is not changed


def test_kl_divergence_matches_torch_and_is_zero_on_equal_distributions():
    logp = torch.log_softmax(torch.randn(3, 11, dtype=torch.float64), -1)
    logq = torch.log_softmax(torch.randn(3, 11, dtype=torch.float64), -1)
    want = torch.nn.functional.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(utils.kl_divergence(logp, logq), want)
    torch.testing.assert_close(utils.kl_divergence(logp, logp), torch.zeros(3, dtype=torch.float64))


def test_chunks_keep_order_type_and_cover_everything():
    assert utils.chunks(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert utils.chunks(range(5), 2) == [range(2), range(2, 4), range(4, 5)]
    assert utils.chunks([1, 2], 0) == [[1], [2]]  # size < 1 counts as 1
    assert utils.chunks([], 4) == []


def test_depth_layer_clamps_to_the_blocks():
    assert utils.depth_layer(28, 0.18) == 5  # ROME's GPT-J layer
    assert utils.depth_layer(32, 21 / 32) == 21
    assert utils.depth_layer(4, 1.0) == 3 and utils.depth_layer(4, -1.0) == 0


def test_check_layers_counts_negatives_from_the_end_and_names_what():
    assert utils.check_layers([-1, 0, 0], 3) == [0, 2]
    with pytest.raises(ValueError, match=r"MEND layers: \[3\] out of range; the model has 3 layers"):
        utils.check_layers([3], 3, "MEND layers")
    with pytest.raises(ValueError, match="empty"):
        utils.check_layers([], 3)
    with pytest.raises(ValueError, match="out of range"):
        utils.check_layers([True], 3)


def test_peak_memory_is_in_mib_between_what_this_process_holds_and_the_machine():
    import os

    block = torch.ones(64, 2**20 // 4)  # 64 MiB, touched
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    assert 64 <= utils.peak_rss_mb() < physical  # KiB or bytes read as MiB would exceed the machine
    assert utils.peak_memory_mb("cpu") == utils.peak_rss_mb()
    del block


def test_wandb_mode_honours_wandb_login_netrc(monkeypatch, tmp_path):
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert utils.wandb_mode() == "offline"
    rc = tmp_path / "netrc"
    rc.write_text("machine api.wandb.ai\n  login user\n  password abc\n")  # what `wandb login` writes
    rc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(rc))
    assert utils.wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert utils.wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert utils.wandb_mode() == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert utils.wandb_mode() == "online"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(utils._malloc_trim() is None, reason="needs glibc (malloc_trim)")
def test_release_free_memory_returns_freed_heap_pages_to_the_system():
    blocks = [torch.ones(25_000) for _ in range(2_000)]  # 100 KB each: heap chunks, 200 MB touched
    keep = torch.ones(25_000)  # above them on the heap: free() alone cannot trim the top
    before = _rss_mb()
    del blocks
    assert before - _rss_mb() < 100, "free() handed the chunks back by itself: nothing left to test"
    assert utils.release_free_memory() is True
    assert before - _rss_mb() > 100, "malloc_trim handed back less than half of 200 MB of freed chunks"
    assert keep.sum() == 25_000


def test_release_free_memory_is_a_no_op_without_glibc(monkeypatch):
    utils._malloc_trim.cache_clear()
    monkeypatch.setattr(utils.sys, "platform", "darwin")
    try:
        assert utils.release_free_memory() is False
    finally:
        utils._malloc_trim.cache_clear()

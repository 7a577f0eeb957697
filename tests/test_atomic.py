"""kedit.atomic: atomic writes, stale temporaries, tolerant caches, checked tensors."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kedit.atomic import (
    atomic_path,
    atomic_write_text,
    load_tensors,
    read_cache,
    save_tensors,
    sweep_temporaries,
    temp_path,
    write_cache,
)


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    import kedit.atomic

    monkeypatch.setattr(kedit.atomic, "_WARNED", set())


def test_failed_write_keeps_the_old_content_and_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_text(path, "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    folder = tmp_path / "model"
    for text in ("one", "two"):  # a folder replaces a folder
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            (tmp / "w").write_text(text)
    assert (folder / "w").read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "model"]


KILLED_SAVE = """
import os, sys, torch
from kedit.atomic import atomic_path, save_tensors
with atomic_path(sys.argv[1]) as tmp:
    save_tensors(tmp, {"w": torch.zeros(1000)})
    (tmp.parent / ".tmpAbC123").write_bytes(b"a library's own partial file")
    os._exit(9)  # like SIGKILL: no finally, no cleanup
"""


def test_killed_save_leaves_one_folder_that_the_next_write_removes(tmp_path):
    dest = tmp_path / "edit.safetensors"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(dest)], env=env, capture_output=True, text=True)
    assert run.returncode == 9, run.stderr
    (left,) = tmp_path.iterdir()  # the partial write and the library's file, in one hidden folder
    assert left.name.startswith(".edit.safetensors.kedit-tmp-") and len(list(left.iterdir())) == 2
    live = temp_path(tmp_path / "other")  # this process: still writing
    live.write_bytes(b"")
    old = temp_path(tmp_path / "old")  # a live pid, but a day old
    old.write_bytes(b"")
    os.utime(old, (time.time() - 86400, time.time() - 86400))
    unrelated = tmp_path / ".hidden.tmp123"
    unrelated.write_bytes(b"")
    atomic_write_text(tmp_path / "next.json", "{}")  # the next write into the folder sweeps it
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, unrelated.name, "next.json"])
    assert sweep_temporaries(tmp_path, max_age=-1) == [live]  # any age: stale


def test_read_cache_removes_damaged_entries(tmp_path, caplog):
    path = tmp_path / "t.json"
    path.write_text("[1, 2")
    assert read_cache(path, lambda p: __import__("json").loads(p.read_text()), "test") is None
    assert not path.exists()
    assert read_cache(path, lambda p: 1 / 0, "test") is None  # absent: read is not called
    assert [r.levelname for r in caplog.records] == ["WARNING"]


def test_write_cache_on_an_unwritable_folder(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert not write_cache(blocker / "sub" / "x.json", lambda tmp: tmp.write_text("1"), "test")
    assert not write_cache(blocker / "sub" / "y.json", lambda tmp: tmp.write_text("1"), "test")
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "going on without caching" in warnings[0].getMessage()
    assert write_cache(tmp_path / "ok" / "x.json", lambda tmp: tmp.write_text("1"), "test")


def test_checked_tensors(tmp_path):
    path = tmp_path / "t.safetensors"
    save_tensors(path, {"a": torch.arange(6.0).view(2, 3)}, {"note": "x"})
    assert torch.equal(load_tensors(path, {"a": (2, 3)})["a"], torch.arange(6.0).view(2, 3))
    with pytest.raises(ValueError, match=r"shape \(2, 3\), expected \(3, 3\)"):
        load_tensors(path, {"a": (3, 3)})
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_tensors(path)


def test_old_versions_leftovers_are_removed_from_caches_by_age(tmp_path):
    """Leftovers of earlier kedit versions carry no pid: in a cache folder, an old one goes."""
    names = [".tmpAb12Cd", ".smollm2-135m-k3_x9z0a", "L1_x_float32.tmp4242"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "keep.safetensors").write_bytes(b"")
    assert sweep_temporaries(tmp_path, cache=True) == []  # recent: maybe still being written
    assert sweep_temporaries(tmp_path, max_age=-1) == []  # not a cache folder: not ours to judge
    assert sorted(p.name for p in sweep_temporaries(tmp_path, max_age=-1, cache=True)) == sorted(names)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.safetensors"]


def test_edit_and_artifact_saves_are_atomic(tmp_path, monkeypatch):
    """Edit.save and an editor artifact write through atomic_path: a save interrupted inside
    safetensors leaves neither a partial file nor a temporary, and the old file intact."""
    import torch
    from kedit.checkpoint import save_artifact
    from kedit.editors import base
    from kedit.editors.base import WeightDelta

    edit = WeightDelta(dense={"w": torch.ones(2, 3)}, base={"model": "m", "hash": "h"})
    dest = edit.save(tmp_path / "e.safetensors")
    before = dest.read_bytes()

    def interrupted(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(base, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        edit.save(dest)
    assert dest.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["e.safetensors"]
    monkeypatch.setattr("safetensors.torch.save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_artifact(tmp_path / "a.safetensors", "mend", {"x": torch.zeros(2)}, {})
    assert [p.name for p in tmp_path.iterdir()] == ["e.safetensors"]

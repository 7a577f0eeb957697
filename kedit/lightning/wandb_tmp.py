"""W&B's temporary folders, and those that killed runs leave behind.

W&B makes temporary folders (media, artifacts) when it is imported and removes them when the
process exits, but not when the process is killed (SIGKILL, OOM, a cluster's time limit).
:func:`import_wandb` has them made in ``$TMPDIR/kedit-wandb/<host>-<pid>`` and first removes
the folders there of this host's processes that are gone. Standard library only: cheap to import.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import tempfile
import weakref
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


def wandb_tmp_root() -> Path:
    """Where :func:`import_wandb` puts W&B's temporary folders: ``$TMPDIR/kedit-wandb``."""
    return Path(tempfile.gettempdir()) / "kedit-wandb"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_tmp(root: str | Path) -> list[Path]:
    """Remove ``root/<host>-<pid>`` folders of this host whose process is gone; return them.

    Folders of other hosts (a shared temp folder) and of live processes are kept.
    """
    root, host = Path(root), socket.gethostname()
    removed = []
    for folder in sorted(root.glob(f"{host}-*")) if root.is_dir() else ():
        pid = folder.name[len(host) + 1:]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    if removed:
        log.info("removed %d temporary folder(s) of killed runs in %s", len(removed), root)
    return removed


@contextmanager
def _tempdir(path: Path):
    """``tempfile`` makes its files and folders in ``path`` inside the block."""
    old = tempfile.tempdir
    tempfile.tempdir = str(path)
    try:
        yield
    finally:
        tempfile.tempdir = old


def import_wandb(tmp_root: str | Path | None = None) -> None:
    """Import wandb with its temporary folders in ``tmp_root/<host>-<pid>`` (default :func:`wandb_tmp_root`).

    Stale folders are removed first (:func:`remove_stale_tmp`). The process's own folder is
    removed at exit, after W&B's own cleanup (exit finalizers run newest first, and this one is
    made before W&B's). When wandb is imported already, only the stale folders are removed.
    ``python -m kedit.train`` calls this before it parses its configuration (which imports wandb).
    """
    tmp_root = wandb_tmp_root() if tmp_root is None else Path(tmp_root)
    remove_stale_tmp(tmp_root)
    if "wandb" in sys.modules:
        return
    own = tmp_root / f"{socket.gethostname()}-{os.getpid()}"
    own.mkdir(parents=True, exist_ok=True)
    weakref.finalize(import_wandb, shutil.rmtree, own, ignore_errors=True)
    with _tempdir(own):
        try:
            import wandb  # noqa: F401
        except ImportError:
            pass

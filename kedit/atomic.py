"""Files written whole or not at all, and caches that never fail a run.

Every file (or folder) is written in a hidden work folder beside its destination and renamed
over it (``os.replace``), so a reader sees the old content or the new, never half of it:

>>> with atomic_path(path) as tmp:
...     save_file(tensors, tmp)

A killed writer leaves its work folder behind (with whatever a library wrote there, e.g.
safetensors' ``.tmpXXXXXX``). Work folders are named ``.<name>.kedit-tmp-<host>-<pid>-<random>``;
the next write into the same folder removes those whose process is gone (on this host) or
that are older than :data:`STALE_SECONDS`.

Caches (statistics, context templates, dequantized models) go through
:func:`read_cache` / :func:`write_cache`: a damaged entry is removed and recomputed, and a
cache that cannot be written is skipped; each logs one warning per process.
:func:`save_tensors` / :func:`load_tensors` store a checksum of the tensors in the
safetensors header and check it, and the shapes, on read.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

TMP_MARK = ".kedit-tmp-"
STALE_SECONDS = 6 * 3600
"""A temporary this old is stale even when its process id is in use (ids are reused, and a
folder shared between hosts cannot ask the other host)."""

_LEGACY_NAME = re.compile(r"^\.tmp[A-Za-z0-9]{6}$|^\..+-[a-z0-9_]{8}$|\.tmp\d+$")
"""What interrupted cache writes of earlier kedit versions left: safetensors' ``.tmpXXXXXX``,
``tempfile.mkdtemp`` folders ``.<name>-XXXXXXXX`` and ``<name>.tmp<pid>`` (age only)."""
_HOST = re.sub(r"[^A-Za-z0-9]+", "", socket.gethostname())[:16] or "host"
_TMP_NAME = re.compile(re.escape(TMP_MARK) + r"(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-[0-9a-f]+$")


# --------------------------------------------------------------------------- atomic writes


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh hidden temporary name beside ``path``, recognizable by :func:`sweep_temporaries`."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write a file or a folder at; on success it replaces ``path``,
    on any exception (KeyboardInterrupt included) it is removed.

    The temporary lies in a hidden work folder beside ``path`` that is named by
    :func:`temp_path`, so what a library writes next to it (safetensors' own ``.tmpXXXXXX``
    files) goes with it, and a killed write leaves one folder that the next write removes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(path.parent)
    work = temp_path(path)
    work.mkdir()
    tmp = work / path.name
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            os.replace(path, work / f"{path.name}.old")  # os.replace cannot replace a non-empty folder
        os.replace(tmp, path)
    finally:
        _remove(work)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: someone else's live process
        return True
    return True


def sweep_temporaries(folder: str | os.PathLike, max_age: float = STALE_SECONDS, *,
                      cache: bool = False) -> list[Path]:
    """Remove the temporaries of killed writers in ``folder``: those of a process that no
    longer runs on this host, and any older than ``max_age`` seconds. In a folder only kedit
    writes (``cache=True``), also the old temporaries of earlier versions. Returns what it removed."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        m = _TMP_NAME.search(entry.name)
        if m is None and not (cache and _LEGACY_NAME.search(entry.name)):
            continue
        try:
            age = now - entry.lstat().st_mtime
        except OSError:
            continue
        dead = m is not None and m["host"] == _HOST and not _alive(int(m["pid"]))
        if dead or age > max_age:
            _remove(entry)
            removed.append(entry)
            log.info("removed %s, left by an interrupted write", entry)
    return removed


def check_writable(path: str | os.PathLike) -> None:
    """Raise ``OSError`` unless a file can be written at ``path`` (creating its folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        tmp.write_bytes(b"")
    finally:
        tmp.unlink(missing_ok=True)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder")


# --------------------------------------------------------------------------- tolerant caches

_WARNED: set[tuple[str, str]] = set()


def _warn_once(kind: str, what: str, message: str, *args: object) -> None:
    if (kind, what) in _WARNED:
        log.debug(message, *args)
        return
    _WARNED.add((kind, what))
    log.warning(message, *args)


def read_cache(path: str | os.PathLike, read: Callable[[Path], T], what: str) -> T | None:
    """``read(path)``, or None when the entry is absent or damaged (then removed, to be
    recomputed). ``read`` raises on anything it does not accept."""
    path = Path(path)
    try:
        if not path.exists():
            return None
    except OSError:  # an unreadable cache folder: nothing cached
        return None
    try:
        return read(path)
    except Exception as err:  # noqa: BLE001 - any damage means: recompute
        _warn_once("damaged", what, "the %s cache %s is damaged (%s); recomputing it", what, path, err)
        try:
            _remove(path)
        except OSError:
            pass
        return None


def write_cache(path: str | os.PathLike, write: Callable[[Path], None], what: str) -> bool:
    """Write a cache entry atomically with ``write(tmp)``; when the cache cannot be written
    (unwritable, not a folder, disk full) log one warning and return False."""
    from safetensors import SafetensorError  # its I/O errors are not OSErrors

    sweep_temporaries(Path(path).parent, cache=True)
    try:
        with atomic_path(path) as tmp:
            write(tmp)
    except (OSError, SafetensorError) as err:
        _warn_once("unwritable", what, "cannot write the %s cache at %s (%s); going on without caching it",
                   what, path, err)
        return False
    return True


def cache_writable(folder: str | os.PathLike, what: str) -> bool:
    """Whether a cache entry can be written in ``folder`` (one warning when not): check
    before computing something large that only makes sense to keep."""
    try:
        check_writable(Path(folder) / "probe")
    except OSError as err:
        _warn_once("unwritable", what, "cannot write the %s cache in %s (%s); going on without caching it",
                   what, folder, err)
        return False
    return True


# --------------------------------------------------------------------------- checked tensors

CHECKSUM_KEY = "kedit_sha256"


def save_tensors(path: str | os.PathLike, tensors: Mapping, metadata: Mapping[str, str] | None = None) -> None:
    """safetensors file with a checksum of the tensors (names, dtypes, shapes, bytes) in its header."""
    from safetensors.torch import save_file

    from kedit.identity import tensor_hash

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={**(metadata or {}), CHECKSUM_KEY: tensor_hash(tensors)})


def load_tensors(path: str | os.PathLike, shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict:
    """The tensors of a :func:`save_tensors` file; ``ValueError`` when the checksum or a
    shape in ``shapes`` does not match."""
    from safetensors import safe_open

    from kedit.identity import tensor_hash

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for name, shape in (shapes or {}).items():
        if name not in tensors:
            raise ValueError(f"no tensor {name!r}")
        if tuple(tensors[name].shape) != tuple(shape):
            raise ValueError(f"{name} has shape {tuple(tensors[name].shape)}, expected {tuple(shape)}")
    if meta.get(CHECKSUM_KEY) != tensor_hash(tensors):
        raise ValueError("checksum mismatch" if CHECKSUM_KEY in meta else "no checksum (an older kedit wrote it)")
    return tensors

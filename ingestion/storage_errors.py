"""Disk-full errors: recognized whichever store raised them, reported with the disk, the path and what to do.

A full disk reaches us as ``OSError`` (ENOSPC, EDQUOT, EFBIG), as ``sqlite3.OperationalError("database or
disk is full")`` from the ledger, or as a ``chromadb`` error carrying SQLite's "(code: 13) database or disk
is full" or, from its compactor, only "Failed to apply logs to the ... segment"; the last is taken as disk
full when the disk it writes has less than ``LOW_SPACE_BYTES`` free. None of them is worth retrying
before space is freed.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
DISK_FULL_WORDS = ("database or disk is full", "no space left on device", "disk quota exceeded", "(os error 28)")
SQLITE_FULL = 13
LOW_SPACE_BYTES = 64 * 1024 * 1024


class StorageFull(RuntimeError):
    """A write failed because the disk under `path` is full (or under the free-space margin)."""

    def __init__(self, store: str, path: Path | None, detail: str = "") -> None:
        self.store, self.path = store, path
        free, device = free_space(path) if path is not None else (None, "the Chroma server's disk")
        self.free_bytes = free
        where = f"{human_bytes(free)} free on {device}" if free is not None else device
        self.message = f"disk full: {path or 'Chroma server'} ({store}) — {where}{detail}; free space and retry"
        super().__init__(self.message)


def human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    size: float = n
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def free_space(path: Path) -> tuple[int | None, str]:
    """(bytes free to an unprivileged writer, "DEVICE (mounted at M)") of the filesystem holding `path`."""
    probe = Path(os.path.abspath(path))
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        stat = os.statvfs(probe)
        free = stat.f_bavail * stat.f_frsize
    except OSError:
        free = None
    return free, _device(probe.resolve())


def _device(path: Path) -> str:
    best = ("?", "/")
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 2:
                    continue
                point = fields[1].replace("\\040", " ")
                if (path == Path(point) or Path(point) in path.parents) and len(point) >= len(best[1]):
                    best = (fields[0], point)
    except OSError:
        return "its filesystem"
    return f"{best[0]} (mounted at {best[1]})"


def is_disk_full(exc: BaseException, path: Path | None = None) -> bool:
    """Whether `exc` (or an exception it was raised from) says the disk is full. With `path`, a Chroma
    error without a reason also counts when the disk under `path` is nearly full."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, StorageFull):
            return True
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return True
        if isinstance(current, sqlite3.Error) and getattr(current, "sqlite_errorcode", None) == SQLITE_FULL:
            return True
        text = str(current).lower()
        if any(words in text for words in DISK_FULL_WORDS):
            return True
        if path is not None and type(current).__module__.startswith("chromadb"):
            free, _ = free_space(path)
            if free is not None and free < LOW_SPACE_BYTES:
                return True
        current = current.__cause__ or current.__context__
    return False


def disk_full(exc: BaseException, store: str, path: Path | None) -> StorageFull | None:
    """`exc` as a StorageFull naming `store` and `path`, or None when it is not a disk-full error."""
    if isinstance(exc, StorageFull):
        return exc
    return StorageFull(store, path) if is_disk_full(exc, path) else None


def raise_if_full(exc: BaseException, store: str, path: Path | None) -> None:
    """Raise `exc` as StorageFull(store, path) from it when it is a disk-full error; else return."""
    full = disk_full(exc, store, path)
    if full is not None and full is not exc:
        raise full from exc
    if full is not None:
        raise full


def require_free(store: str, path: Path, min_free_bytes: int) -> None:
    """Refuse to write when the disk under `path` has less than `min_free_bytes` free (0: no check)."""
    if min_free_bytes <= 0:
        return
    free, _ = free_space(path)
    if free is not None and free < min_free_bytes:
        raise StorageFull(store, path, f", under the {human_bytes(min_free_bytes)} margin (RAG_MIN_FREE_DISK_MB)")

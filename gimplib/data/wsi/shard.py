"""Extraction over several workers: deterministic shards of a slide list and per-slide lock files.

``gimp-extract --shard i/n`` (a cluster's array job, or one process per GPU) takes the slides
whose position in the sorted slide list is ``i`` modulo ``n``. Every worker, sharded or not,
takes a slide only after creating ``out_dir/locks/<slide_id>.lock`` with ``O_CREAT | O_EXCL``
(atomic on local file systems and on NFS v3+), so two workers never embed the same slide even
when their shards overlap or the same shard is started twice. A lock whose process is gone
(same host, no such pid) is stale and taken over; a lock from another host is left alone
(delete ``locks/`` after a crashed node). Shared files (``extract_status.csv``, ``dataset.csv``)
are rewritten under an ``fcntl`` lock so that no worker's rows are lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator, Sequence, TypeVar

from gimplib.utils import DataError

__all__ = ["parse_shard", "release_slide", "shard_items", "shared_file_lock", "take_slide"]

T = TypeVar("T")


def parse_shard(text: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"i/n"`` (0 <= i < n) -> ``(i, n)``; None stays None."""
    if text is None:
        return None
    if isinstance(text, tuple):
        i, n = text
    else:
        try:
            i, n = (int(v) for v in str(text).split("/"))
        except ValueError:
            raise DataError(f"shard {text!r}: expected i/n, e.g. 0/4 for the first of four workers") from None
    if not (n >= 1 and 0 <= i < n):
        raise DataError(f"shard {i}/{n}: expected 0 <= i < n")
    return int(i), int(n)


def shard_items(items: Sequence[T], keys: Sequence[str], shard: tuple[int, int] | None) -> list[T]:
    """The items of shard ``(i, n)``: position ``i`` modulo ``n`` in the order of ``keys`` (sorted), so the
    split does not depend on how the slides were listed."""
    if shard is None:
        return list(items)
    i, n = shard
    order = sorted(range(len(items)), key=lambda k: keys[k])
    return [items[k] for rank, k in enumerate(order) if rank % n == i]


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}


def _stale(path: Path) -> bool:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return False  # being written right now
    if info.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError):
        return False
    return False


def take_slide(out_dir: str | os.PathLike, slide_id: str) -> Path | None:
    """Create ``locks/<slide_id>.lock`` for this process; None when another live worker holds it."""
    folder = Path(out_dir) / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{slide_id}.lock"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _stale(path):
                path.unlink(missing_ok=True)
                continue
            return None
        with os.fdopen(fd, "w") as f:
            json.dump(_owner(), f)
        return path
    return None


def release_slide(lock: Path | None) -> None:
    """Remove a lock taken by :func:`take_slide`."""
    if lock is not None:
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def shared_file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive ``fcntl`` lock on ``<path>.lock`` while a shared file is read, merged and rewritten."""
    import fcntl

    lock = Path(f"{path}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)

"""Atomic *and* power-loss-durable file writes.

A rename alone is atomic against a process crash but not against power loss: the data must be
fsynced before the rename, and the directory after it. An fsync error is never retried (a second
fsync can report success after the kernel dropped the dirty pages: "fsyncgate"), it is raised.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries of directory `path` (creations, renames, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside `target`; on success fsync it, rename over `target`, fsync the dir.

    `suffix` lets callers keep an extension that a writer insists on (Keras wants `.weights.h5`).
    On any error the temp file is removed and `target` is left as it was.
    """
    target = Path(target)
    directory = target.parent
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=directory)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(directory)


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
        os.chmod(tmp, mode)


def atomic_write_text(target: str | os.PathLike[str], text: str, mode: int = 0o644) -> None:
    atomic_write_bytes(target, text.encode("utf-8"), mode)


def atomic_write_with(
    target: str | os.PathLike[str], writer: Callable[[Path], None], suffix: str = ""
) -> None:
    """Let `writer` produce the file at a temp path, then commit it durably under `target`."""
    with atomic_path(target, suffix) as tmp:
        writer(tmp)


def write_nondurable(target: str | os.PathLike[str], data: bytes) -> None:
    """Atomic replace without fsync: for heartbeats, which must be cheap and need not survive a
    power cut (they prove liveness, the store records what must last)."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, target)

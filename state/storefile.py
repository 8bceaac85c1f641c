"""The store's file before SQLite touches it: refuse what is not a ckptd store (keeping it as
evidence, no -wal or -shm made beside it), and keep the store private to the daemon's user."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path


class StoreError(Exception):
    pass


def private(path: Path) -> None:
    """The store holds every user's job records: nobody but the daemon's user (and group) reads
    it, even where the state directory is traversable for users' run directories. SQLite gives
    its -wal and -shm files the database's mode."""
    for f in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(OSError):
            st = f.lstat()
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_mode & 0o007:
                os.chmod(f, stat.S_IMODE(st.st_mode) & ~0o007)


SQLITE_MAGIC = b"SQLite format 3\x00"
SQLITE_HEADER = 100  # a database file is at least its header


def _refuse_foreign(path: Path, size: int) -> None:
    """A file that is not an SQLite database (a 1-byte stub, a text file copied over it): SQLite
    would take it as empty and write a new store over it, destroying the evidence. Checked
    before any connection, so not even a -wal or -shm file is made beside it."""
    if size == 0:
        return  # an empty file: see the size check in refuse_unusable
    with open(path, "rb") as f:
        head = f.read(SQLITE_HEADER)
    if len(head) < SQLITE_HEADER or not head.startswith(SQLITE_MAGIC):
        raise StoreError(
            f"job store {path} is not an SQLite database ({size} bytes, starts {head[:16]!r}); "
            "it was left untouched. Restore it from a backup (docs/service.md: 'Backing up the store'), or "
            "move it aside to start with an empty store (run directories stay in "
            f"{path.parent / 'jobs'}; `ckptd recover --adopt` queues them again)"
        )


def refuse_unusable(path: Path) -> None:
    """An empty store (truncated by a bad restore, a full disk, a mistake) would be re-created
    empty and every job forgotten; a store this user may not open is not 'unreadable'."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    except PermissionError as e:
        raise StoreError(
            f"permission denied on the job store {path} (uid {os.geteuid()}): it is "
            "the daemon's; ask it through the socket (ckptd status) instead"
        ) from e
    if not os.access(path, os.R_OK | os.W_OK):
        raise StoreError(
            f"permission denied on the job store {path} (uid {os.geteuid()}): it is "
            "the daemon's; ask it through the socket (ckptd status) instead"
        )
    _refuse_foreign(path, st.st_size)
    wal = path.with_name(path.name + "-wal")
    if st.st_size == 0 and not (wal.exists() and wal.stat().st_size > 0):
        raise StoreError(
            f"job store {path} is empty (0 bytes): ckptd will not start as if no job "
            "ever existed. Restore it from a backup; or, to forget every job on "
            f"purpose, move it aside (run directories stay in {path.parent / 'jobs'})"
        )

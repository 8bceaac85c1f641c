"""The job store's SQLite database itself: its schema and migrations, opening a connection the
store can trust (integrity, WAL, synchronous=FULL), and the one write transaction.

Split from ckptd.state.store, which keeps the records and their transactions: this module knows
tables and files, not jobs.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ckptd.state.storefile import StoreError, private, refuse_unusable

SCHEMA_VERSION = 3
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    spec_json TEXT NOT NULL,
    spec_digest TEXT NOT NULL,
    job_file TEXT NOT NULL,
    run_dir TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    last_committed_step INTEGER,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS jobs_name ON jobs(name, created_at);
CREATE TABLE IF NOT EXISTS submissions (
    job_id TEXT PRIMARY KEY REFERENCES jobs(id),
    owner_uid INTEGER NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    submit_key TEXT,
    submitted_at REAL NOT NULL,
    owner_gid INTEGER,
    owner_groups TEXT,
    UNIQUE (owner_uid, submit_key)
);
CREATE TABLE IF NOT EXISTS attempts (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    n INTEGER NOT NULL,
    pid INTEGER,
    started_at REAL NOT NULL,
    ended_at REAL,
    exit_code INTEGER,
    signal INTEGER,
    class TEXT,
    evidence TEXT,
    error_summary TEXT,
    restored_step INTEGER,
    last_step INTEGER,
    pid_started REAL,
    PRIMARY KEY (job_id, n)
);
CREATE TABLE IF NOT EXISTS checkpoints (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    step INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    path TEXT NOT NULL,
    committed_at REAL NOT NULL,
    metrics_json TEXT,
    digest TEXT,
    retired_at REAL,
    PRIMARY KEY (job_id, step)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    data_json TEXT
);
"""


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction: BEGIN IMMEDIATE … COMMIT, rolled back on any exception. Inside one
    already, it joins it, so a store method can be part of a caller's larger transaction."""
    if db.in_transaction:
        yield db
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def open_db(path: Path, check: bool, threads: bool, readonly: bool) -> sqlite3.Connection:
    """A configured connection to the store at `path`, migrated to SCHEMA_VERSION unless
    `readonly`; StoreError (the file left as it was) if it cannot be trusted."""
    path.parent.mkdir(parents=True, exist_ok=True)
    refuse_unusable(path)
    db = _connect(path, threads, readonly)
    # sqlite3 opens with O_CLOEXEC on Linux, so workers never inherit the store's descriptors.
    db.row_factory = sqlite3.Row
    try:
        _configure(db, check, readonly)
    except sqlite3.OperationalError as e:
        db.close()
        frozen = _frozen_copy(path) if readonly else None
        if frozen is None:
            raise StoreError(f"cannot open job store {path}: {e}") from e
        return frozen
    except sqlite3.DatabaseError as e:
        db.close()
        raise StoreError(
            f"job store {path} is unreadable ({e}); it was left untouched — "
            "restore it from a backup or move it aside"
        ) from e
    return db


def _connect(path: Path, threads: bool, readonly: bool) -> sqlite3.Connection:
    """`threads`: a pooled connection, used by one thread at a time but not always the same.
    `readonly` (ckptd status) opens with SQLite's mode=ro: it neither migrates nor checkpoints a
    crashed writer's WAL into the database file at close."""
    try:
        if not readonly:
            private(path)
        fresh = not path.exists()
        old_umask = os.umask(0o027) if fresh else None  # born private (see storefile.private)
        target = f"file:{urllib.parse.quote(str(path))}?mode=ro" if readonly else str(path)
        try:
            return sqlite3.connect(
                target, timeout=10.0, isolation_level=None, check_same_thread=not threads, uri=readonly
            )
        finally:
            if old_umask is not None:
                os.umask(old_umask)
    except sqlite3.Error as e:
        raise StoreError(f"cannot open job store {path}: {e}") from e


def _frozen_copy(path: Path) -> sqlite3.Connection | None:
    """A full disk: WAL mode cannot make its -shm file, so no connection opens. With no -wal
    file the database file holds everything (nobody writes: a writer keeps a -wal), and it is
    read as immutable — `ckptd status` works when the disk is full."""
    wal = path.with_name(path.name + "-wal")
    if not path.exists() or (wal.exists() and wal.stat().st_size > 0):
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
        db.row_factory = sqlite3.Row
        db.execute("SELECT count(*) FROM jobs").fetchone()
    except sqlite3.Error:
        return None
    return db


def _configure(db: sqlite3.Connection, check: bool, readonly: bool) -> None:
    db.execute("PRAGMA busy_timeout = 10000")
    # Once per process is enough; extra connections (API threads, job threads) skip it.
    result = db.execute("PRAGMA integrity_check").fetchall() if check else [("ok",)]
    if [tuple(r) for r in result] != [("ok",)]:
        detail = "; ".join(str(r[0]) for r in result[:5])
        raise sqlite3.DatabaseError(f"integrity_check failed: {detail}")
    # Before anything writes (WAL mode rewrites the header): another program's database.
    if (
        not db.execute("PRAGMA user_version").fetchone()[0]
        and db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    ):
        raise sqlite3.DatabaseError("it is an SQLite database of something else (no ckptd schema)")
    mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode != "wal":
        raise sqlite3.DatabaseError(f"cannot enable WAL (journal_mode={mode})")
    db.execute("PRAGMA synchronous = FULL")
    db.execute("PRAGMA foreign_keys = ON")
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(f"store schema {version} is newer than this ckptd ({SCHEMA_VERSION})")
    if version == SCHEMA_VERSION:
        return  # nothing to migrate: a reader (ckptd status) writes nothing, even on a full disk
    if readonly:
        raise sqlite3.DatabaseError(
            f"store schema {version} is older than this ckptd's ({SCHEMA_VERSION}) and a reader "
            "does not update it: start the daemon (or ckptd run) once, then ask again"
        )
    _migrate(db, version)


def _migrate(db: sqlite3.Connection, version: int) -> None:
    """From `version` (0: a new file) to SCHEMA_VERSION, in one transaction."""
    with transaction(db):
        if 0 < version < 3:  # keys become per owner; the owner's gid and groups are kept
            db.execute("ALTER TABLE submissions RENAME TO submissions_v2")
        # executescript() would COMMIT first; run the statements inside our transaction.
        for stmt in filter(str.strip, SCHEMA.split(";")):
            db.execute(stmt)
        if 0 < version < 2:  # v1 stores: attempts learn the worker's process start time
            db.execute("ALTER TABLE attempts ADD COLUMN pid_started REAL")
        if 0 < version < 3:
            db.execute(
                "INSERT INTO submissions (job_id, owner_uid, priority, submit_key, "
                "submitted_at) SELECT job_id, owner_uid, priority, submit_key, "
                "submitted_at FROM submissions_v2"
            )
            db.execute("DROP TABLE submissions_v2")
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

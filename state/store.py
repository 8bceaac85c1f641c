"""The durable job store: SQLite in WAL mode with synchronous=FULL.

WAL + FULL makes every committed transaction survive power loss; writes use BEGIN IMMEDIATE so two
writers serialise on the lock instead of failing mid-transaction. The store records state
transitions, attempts, committed checkpoints and events; heartbeats never come here. The
database itself (schema, migrations, opening it) is ckptd.state.storedb.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptd.state.protocol import Event
from ckptd.state.states import AttemptClass, IllegalTransition, JobState, is_legal
from ckptd.state.storedb import open_db, transaction
from ckptd.state.storefile import StoreError as StoreError


@dataclass(frozen=True)
class Job:
    id: str
    name: str
    state: JobState
    spec_json: str
    spec_digest: str
    job_file: str
    run_dir: str
    created_at: float
    updated_at: float
    last_committed_step: int | None
    reason: str | None


@dataclass(frozen=True)
class Attempt:
    job_id: str
    n: int
    pid: int | None
    started_at: float
    ended_at: float | None
    exit_code: int | None
    signal: int | None
    klass: AttemptClass | None
    evidence: str | None
    error_summary: str | None
    restored_step: int | None
    last_step: int | None
    pid_started: float | None = None


def _job(row: sqlite3.Row) -> Job:
    d = dict(row)
    d["state"] = JobState(d["state"])
    return Job(**d)


def _attempt(row: sqlite3.Row) -> Attempt:
    d = dict(row)
    k = d.pop("class")
    return Attempt(klass=AttemptClass(k) if k else None, **d)


class Store:
    """Jobs, their state transitions, attempts, committed checkpoints and events. Every write is
    one transaction (ckptd.state.storedb.transaction); a job's state changes only as the one
    table (ckptd.state.states) allows, checked inside that transaction."""

    def __init__(self, path: Path, check: bool = True, threads: bool = False, readonly: bool = False) -> None:
        """`readonly`: a reader (ckptd status) that never writes the store: it neither migrates
        nor checkpoints a crashed writer's WAL into ckptd.db at close; on a full disk it may fall
        back to a frozen copy. `threads`: a pooled connection, used by one thread at a time."""
        self.path, self.check, self.readonly = path, check, readonly
        self._db = open_db(path, check, threads, readonly)

    @classmethod
    def open(cls, state: Path, check: bool = True, threads: bool = False, readonly: bool = False) -> Store:
        return cls(state / "ckptd.db", check, threads, readonly)

    def close(self) -> None:
        self._db.close()

    def backup_to(self, target: sqlite3.Connection) -> None:
        """A consistent copy of the whole store, WAL included (SQLite's online backup)."""
        self._db.backup(target)

    def checkpoint_wal(self) -> bool:
        """Move the WAL's transactions into the database file and empty the WAL (at a clean
        stop, when no other connection is busy). False if a reader kept part of it."""
        try:
            busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error:
            return False
        return not busy

    def write(self) -> AbstractContextManager[sqlite3.Connection]:
        """One write transaction: BEGIN IMMEDIATE … COMMIT, rolled back on any exception."""
        return transaction(self._db)

    def _event(
        self, db: sqlite3.Connection, job_id: str | None, kind: Event, data: dict[str, Any] | None = None
    ) -> None:
        db.execute(
            "INSERT INTO events (job_id, ts, kind, data_json) VALUES (?, ?, ?, ?)",
            (job_id, time.time(), str(kind), json.dumps(data or {}, sort_keys=True)),
        )

    # -- jobs ---------------------------------------------------------------------------------

    def create_job(
        self,
        job_id: str,
        name: str,
        spec_json: str,
        spec_digest: str,
        job_file: str,
        run_dir: str,
        state: JobState = JobState.QUEUED,
    ) -> Job:
        now = time.time()
        with self.write() as db:
            db.execute(
                "INSERT INTO jobs (id, name, state, spec_json, spec_digest, job_file, run_dir,"
                " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, name, str(state), spec_json, spec_digest, job_file, run_dir, now, now),
            )
            self._event(db, job_id, Event.JOB_CREATED, {"state": str(state)})
        return self.job(job_id)

    def transition(
        self, job_id: str, new: JobState, reason: str | None = None, expect: frozenset[JobState] | None = None
    ) -> Job:
        """Change a job's state; the transition table is checked inside the write transaction.
        `expect` makes it a compare-and-set: the change happens only from one of those states."""
        with self.write() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise StoreError(f"no job {job_id}")
            old = JobState(row["state"])
            if not is_legal(old, new) or (expect is not None and old not in expect):
                raise IllegalTransition(job_id, old, new)
            db.execute(
                "UPDATE jobs SET state = ?, updated_at = ?, reason = ? WHERE id = ?",
                (str(new), time.time(), reason, job_id),
            )
            self._event(db, job_id, Event.JOB_STATE, {"from": str(old), "to": str(new), "reason": reason})
        return self.job(job_id)

    def job(self, job_id: str) -> Job:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise StoreError(f"no job {job_id!r} (see `ckptd status` for the list)")
        return _job(row)

    def jobs(self) -> list[Job]:
        return [_job(r) for r in self._db.execute("SELECT * FROM jobs ORDER BY created_at")]

    def latest_by_name(self, name: str) -> Job | None:
        row = self._db.execute(
            "SELECT * FROM jobs WHERE name = ? ORDER BY created_at DESC LIMIT 1", (name,)
        ).fetchone()
        return _job(row) if row else None

    # -- attempts -----------------------------------------------------------------------------

    def start_attempt(self, job_id: str, pid: int, pid_started: float | None = None) -> int:
        """`pid_started` (the process's start time) tells a live worker from a reused pid."""
        with self.write() as db:
            n = db.execute(
                "SELECT COALESCE(MAX(n), 0) + 1 FROM attempts WHERE job_id = ?", (job_id,)
            ).fetchone()[0]
            db.execute(
                "INSERT INTO attempts (job_id, n, pid, started_at, pid_started) VALUES (?, ?, ?, ?, ?)",
                (job_id, n, pid, time.time(), pid_started),
            )
            self._event(db, job_id, Event.ATTEMPT_STARTED, {"attempt": n, "pid": pid})
        return int(n)

    def end_attempt(
        self,
        job_id: str,
        n: int,
        *,
        exit_code: int | None,
        signal: int | None,
        klass: AttemptClass,
        evidence: str,
        error_summary: str | None,
        restored_step: int | None,
        last_step: int | None,
    ) -> None:
        with self.write() as db:
            db.execute(
                "UPDATE attempts SET ended_at = ?, exit_code = ?, signal = ?, class = ?,"
                " evidence = ?, error_summary = ?, restored_step = ?, last_step = ?"
                " WHERE job_id = ? AND n = ?",
                (
                    time.time(),
                    exit_code,
                    signal,
                    str(klass),
                    evidence,
                    error_summary,
                    restored_step,
                    last_step,
                    job_id,
                    n,
                ),
            )
            self._event(
                db, job_id, Event.ATTEMPT_ENDED, {"attempt": n, "class": str(klass), "evidence": evidence}
            )

    def attempts(self, job_id: str) -> list[Attempt]:
        rows = self._db.execute("SELECT * FROM attempts WHERE job_id = ? ORDER BY n", (job_id,))
        return [_attempt(r) for r in rows]

    # -- checkpoints --------------------------------------------------------------------------

    def record_checkpoint(
        self, job_id: str, step: int, epoch: int, path: str, metrics: dict[str, Any], digest: str
    ) -> bool:
        """Record a committed checkpoint (idempotent). Returns True if it was new."""
        with self.write() as db:
            # A step committed again after its row was retired (a quarantined commit, trained
            # anew) is live again.
            cur = db.execute(
                "INSERT INTO checkpoints (job_id, step, epoch, path, committed_at,"
                " metrics_json, digest) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (job_id, step)"
                " DO UPDATE SET retired_at = NULL, epoch = excluded.epoch, path = excluded.path,"
                " committed_at = excluded.committed_at, metrics_json = excluded.metrics_json,"
                " digest = excluded.digest WHERE retired_at IS NOT NULL",
                (job_id, step, epoch, path, time.time(), json.dumps(metrics, sort_keys=True), digest),
            )
            if cur.rowcount == 0:
                return False
            db.execute(
                "UPDATE jobs SET last_committed_step = MAX(COALESCE(last_committed_step,"
                " -1), ?), updated_at = ? WHERE id = ?",
                (step, time.time(), job_id),
            )
            self._event(db, job_id, Event.CHECKPOINT_COMMITTED, {"step": step, "epoch": epoch})
        return True

    def retire_checkpoints(self, job_id: str, steps: list[int]) -> None:
        """Mark checkpoints deleted by retention (kept as history, no longer restorable)."""
        with self.write() as db:
            db.executemany(
                "UPDATE checkpoints SET retired_at = ? WHERE job_id = ? AND step = ?",
                [(time.time(), job_id, s) for s in steps],
            )

    def reconcile_checkpoints(self, job_id: str, present: list[dict[str, Any]]) -> None:
        """Make the store agree with the manifests on disk (a worker's inventory at restore):
        commits it never heard of are recorded, rows whose checkpoint is gone are retired, and
        last_committed_step is the newest commit on disk."""
        steps = {int(c["step"]) for c in present}
        with self.write() as db:
            for c in present:
                db.execute(
                    "INSERT OR IGNORE INTO checkpoints (job_id, step, epoch, path, committed_at,"
                    " metrics_json, digest) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        job_id,
                        int(c["step"]),
                        int(c["epoch"]),
                        str(c["path"]),
                        time.time(),
                        json.dumps(c.get("metrics") or {}, sort_keys=True),
                        str(c.get("digest", "")),
                    ),
                )
                db.execute(
                    "UPDATE checkpoints SET retired_at = NULL, path = ? WHERE job_id = ? AND step = ?",
                    (str(c["path"]), job_id, int(c["step"])),
                )
            live = db.execute(
                "SELECT step FROM checkpoints WHERE job_id = ? AND retired_at IS NULL", (job_id,)
            ).fetchall()
            db.executemany(
                "UPDATE checkpoints SET retired_at = ? WHERE job_id = ? AND step = ?",
                [(time.time(), job_id, r["step"]) for r in live if r["step"] not in steps],
            )
            db.execute(
                "UPDATE jobs SET last_committed_step = ?, updated_at = ? WHERE id = ?",
                (max(steps) if steps else None, time.time(), job_id),
            )

    def checkpoints(self, job_id: str, include_retired: bool = False) -> list[dict[str, Any]]:
        where = "" if include_retired else " AND retired_at IS NULL"
        rows = self._db.execute(f"SELECT * FROM checkpoints WHERE job_id = ?{where} ORDER BY step", (job_id,))
        return [dict(r) for r in rows]

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        """A read for modules that add their own tables (ckptd.state.submissions)."""
        return list(self._db.execute(sql, params))

    def events(self, job_id: str) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT * FROM events WHERE job_id = ? ORDER BY id", (job_id,))
        return [dict(r) for r in rows]

    def add_event(self, job_id: str | None, kind: Event, data: dict[str, Any] | None = None) -> None:
        with self.write() as db:
            self._event(db, job_id, kind, data)


def new_job_id(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%d')}-{os.urandom(3).hex()}"

"""Jobs submitted to the daemon: owner, priority, idempotency key, and the persistent queue.

A job row plus its submission row are written in one transaction, so an acknowledged submit exists
exactly once even if the daemon is killed right after answering; a retried submit with the same
key returns the job it already created.
"""

from __future__ import annotations

import json
import os
import pwd
import time
from dataclasses import dataclass

from ckptd.state.states import JobState
from ckptd.state.store import Job, Store, StoreError


@dataclass(frozen=True)
class Submission:
    job_id: str
    owner_uid: int
    priority: int
    submit_key: str | None
    submitted_at: float
    owner_gid: int | None = None  # None: submitted before ckptd recorded it (the account's)
    owner_groups: str | None = None  # JSON list of supplementary gids


class DuplicateKey(Exception):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"already submitted as job {job_id}")
        self.job_id = job_id


@dataclass(frozen=True)
class Owner:
    """Whose rights a job runs with: the submitter's uid, gid and supplementary groups."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()


def submit(
    store: Store,
    job_id: str,
    name: str,
    spec_json: str,
    spec_digest: str,
    job_file: str,
    run_dir: str,
    owner: Owner,
    priority: int,
    key: str | None,
) -> Job:
    """Create a queued job and its submission atomically; DuplicateKey if this owner used `key`."""
    with store.write() as db:
        if key is not None:
            row = db.execute(
                "SELECT job_id FROM submissions WHERE owner_uid = ? AND submit_key = ?", (owner.uid, key)
            ).fetchone()
            if row is not None:
                raise DuplicateKey(row["job_id"])
        store.create_job(job_id, name, spec_json, spec_digest, job_file, run_dir, JobState.QUEUED)
        db.execute(
            "INSERT INTO submissions (job_id, owner_uid, priority, submit_key, submitted_at,"
            " owner_gid, owner_groups) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (job_id, owner.uid, priority, key, time.time(), owner.gid, json.dumps(list(owner.groups))),
        )
    return store.job(job_id)


def by_key(store: Store, owner_uid: int, key: str) -> str | None:
    """Idempotency keys are per owner: another user's key never names this user's job."""
    rows = store.query(
        "SELECT job_id FROM submissions WHERE owner_uid = ? AND submit_key = ?", (owner_uid, key)
    )
    return str(rows[0]["job_id"]) if rows else None


def owner_of(sub: Submission) -> Owner:
    """The rights a job runs with. Rows from before ckptd recorded gid and groups: the account's."""
    if sub.owner_gid is not None:
        return Owner(sub.owner_uid, sub.owner_gid, tuple(json.loads(sub.owner_groups or "[]")))
    return account_owner(sub.owner_uid)


def account_owner(uid: int) -> Owner:
    """The uid's primary group and supplementary groups from the account database."""
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        return Owner(uid, uid)  # no account: its own gid, no supplementary groups
    return Owner(uid, pw.pw_gid, tuple(sorted(set(os.getgrouplist(pw.pw_name, pw.pw_gid)))))


def submission(store: Store, job_id: str) -> Submission | None:
    rows = store.query("SELECT * FROM submissions WHERE job_id = ?", (job_id,))
    return Submission(**dict(rows[0])) if rows else None


def managed_jobs(store: Store, states: frozenset[JobState]) -> list[tuple[Job, Submission]]:
    """Daemon-managed jobs in `states`, in queue order: priority (high first), then FIFO."""
    marks = ",".join("?" * len(states))
    rows = store.query(
        f"SELECT j.id FROM jobs j JOIN submissions s ON s.job_id = j.id WHERE j.state IN ({marks})"
        " ORDER BY s.priority DESC, s.submitted_at, j.id",
        tuple(str(s) for s in states),
    )
    out = []
    for r in rows:
        sub = submission(store, r["id"])
        if sub is None:  # pragma: no cover - the join guarantees it
            raise StoreError(f"job {r['id']} lost its submission row")
        out.append((store.job(r["id"]), sub))
    return out


def recent_owners(store: Store, limit: int) -> list[Owner]:
    """The owners of the latest submissions, newest first, each once: whose next job is likely."""
    rows = store.query(
        "SELECT owner_uid, MAX(submitted_at) AS last, owner_gid, owner_groups FROM submissions "
        "GROUP BY owner_uid ORDER BY last DESC LIMIT ?",
        (limit,),
    )
    return [
        owner_of(Submission("", r["owner_uid"], 0, None, r["last"], r["owner_gid"], r["owner_groups"]))
        for r in rows
    ]

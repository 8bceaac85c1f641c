"""Retention of finished jobs' run directories (daemon.yaml `finished_retention:`): a step of the
daemon's main loop.

Observe (one query, at the start and then hourly) → decide (ckptd.state.runretention.expired) →
act: one removal at a time, in a child process with the rights of the run directory's owner
(ckptd.state.runremove), polled from the loop, so the loop never waits on a large removal and no
symlink planted in a run directory can turn the daemon's rights against anything. Right before
a removal the job is read again: only a job still finished, unchanged since the decision and not
held by a supervisor loses anything; its supervision lock is held until the removal ends. What
went is recorded in the store (a `retention.removed` event; the checkpoints' rows retired, so
no-one restores from them) and in the daemon's log. The job's row stays: `ckptd status` shows it.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from structlog.typing import FilteringBoundLogger

from ckptd.daemon import jobs
from ckptd.daemon.backend import Registry
from ckptd.state.durable import fsync_dir
from ckptd.state.protocol import Event
from ckptd.state.runretention import DAY, FINISHED, Finished, FinishedRetention, What, expired
from ckptd.state.states import JobState
from ckptd.state.store import Job, Store
from ckptd.state.submissions import Owner, account_owner, owner_of, submission
from ckptd.supervisor import identity
from ckptd.supervisor.process import worker_env

CHECK_SECONDS = 3600.0
CHILD_LIMIT_SECONDS = 3600.0  # a removal still running then (a hung file system) is killed
REMOVER = "ckptd.state.runremove"
# Each finished job with what retention already removed of it (the kinds its events name).
_QUERY = (
    "SELECT j.id, j.name, j.state, j.updated_at, s.owner_uid, r.done FROM jobs j"
    " LEFT JOIN submissions s ON s.job_id = j.id"
    " LEFT JOIN (SELECT job_id, group_concat(json_extract(data_json, '$.what')) AS done"
    " FROM events WHERE kind = ? GROUP BY job_id) r ON r.job_id = j.id"
    " WHERE j.state IN ({marks})"
)


def finished_jobs(store: Store) -> list[Finished]:
    """What the decision needs, in one query."""
    states = sorted(str(s) for s in FINISHED)
    rows = store.query(_QUERY.format(marks=",".join("?" * len(states))), (Event.RETENTION_REMOVED, *states))
    return [
        Finished(
            r["id"],
            r["name"],
            r["owner_uid"],
            JobState(r["state"]),
            r["updated_at"],
            frozenset(filter(None, (r["done"] or "").split(","))),
        )
        for r in rows
    ]


def remover(run_uid: int, submitter: Owner | None, me: Owner) -> Owner:
    """Whose rights remove a run directory's files: its owner's (the directory's uid), with the
    submitter's groups when the submitter owns it, else the account's."""
    if run_uid == me.uid:
        return me
    if submitter is not None and submitter.uid == run_uid:
        return submitter
    return account_owner(run_uid)


@dataclass
class _Removal:
    job_id: str
    what: What
    ended_at: float
    inside: bool  # checkpoint.dir is relative: the checkpoints are the run directory's
    proc: subprocess.Popen[bytes]
    lock_fd: int
    started: float


class RunRetention:
    def __init__(self, home: Path, policy: FinishedRetention | None, log: FilteringBoundLogger) -> None:
        self.home, self.policy, self.log = home, policy, log
        self.pending: list[tuple[str, What, float]] = []
        self.child: _Removal | None = None
        self.next_round = 0.0  # time.monotonic(): the first round is at the daemon's start

    def step(self, store: Store, registry: Registry) -> None:
        """One loop iteration's share: a removal's end, else the next removal, else a round."""
        if self.policy is None:
            return
        if self.child is not None:
            self._poll(store)
            return
        now = time.monotonic()
        if not self.next_round:
            self.log.info("retention.policy", **self.policy.model_dump())
        if not self.pending and now >= self.next_round:
            self.next_round = now + CHECK_SECONDS
            self._round(store, self.policy)
        if self.pending:
            job_id, what, ended_at = self.pending.pop(0)
            with registry.lock:
                busy = job_id in registry.running
            try:
                self._begin(store, job_id, what, ended_at, busy)
            except ValueError as e:  # a stored spec this ckptd cannot read: leave the job alone
                self.log.warning("retention.failed", job_id=job_id, what=what, error=str(e))

    def _round(self, store: Store, policy: FinishedRetention) -> None:
        found = finished_jobs(store)
        ended = {f.id: f.ended_at for f in found}
        chosen = expired(found, policy, time.time())
        if not chosen:
            return
        self.log.info("retention.round", finished=len(found), expired=len(chosen), dry_run=policy.dry_run)
        if policy.dry_run:
            for job_id, what in chosen:
                self.log.info(
                    "retention.would_remove", job_id=job_id, what=what, ended_days_ago=_days(ended[job_id])
                )
            return
        self.pending = [(job_id, what, ended[job_id]) for job_id, what in chosen]

    def _begin(self, store: Store, job_id: str, what: What, ended_at: float, busy: bool) -> None:
        job = store.job(job_id)
        if busy or job.state not in FINISHED or job.updated_at != ended_at:
            reason = "changed since decided: decided again at the next round"
            self.log.info("retention.skipped", job_id=job_id, state=str(job.state), reason=reason)
            return
        inside = not Path(jobs.spec_of(job).checkpoint.dir).is_absolute()
        run = self.home / "jobs" / job_id
        try:
            st = os.stat(run, follow_symlinks=False)
        except FileNotFoundError:
            self._record(store, job_id, what, ended_at, _nothing("run directory absent"), inside)
            return
        if Path(os.path.abspath(job.run_dir)) != Path(os.path.abspath(run)) or not stat.S_ISDIR(st.st_mode):
            note = f"{job.run_dir} is not a directory in {run.parent}: not touched"
            self._record(store, job_id, what, ended_at, _nothing(note), False)
            return
        try:
            lock = jobs.lock_job(jobs.supervision_dir(self.home, job_id))
        except jobs.JobBusy:
            self.log.info("retention.skipped", job_id=job_id, reason="a supervisor holds the job")
            return
        try:
            proc = self._spawn(job, what, remover(st.st_uid, _submitter(store, job_id), identity.me()))
        except BaseException:
            os.close(lock)
            raise
        self.child = _Removal(job_id, what, ended_at, inside, proc, lock, time.monotonic())

    def _spawn(self, job: Job, what: What, owner: Owner) -> subprocess.Popen[bytes]:
        argv = [
            sys.executable,
            "-m",
            REMOVER,
            str(self.home / "jobs"),
            job.id,
            what,
            jobs.spec_of(job).checkpoint.dir,
        ]
        return subprocess.Popen(
            argv,
            cwd="/",  # the owner may not enter the daemon's directory
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=worker_env() | identity.owner_env(owner),
            close_fds=True,
            start_new_session=True,
            **identity.popen_kwargs(owner),
        )

    def _poll(self, store: Store) -> None:
        c = self.child
        assert c is not None
        if c.proc.poll() is None and time.monotonic() - c.started < CHILD_LIMIT_SECONDS:
            return
        self.child = None
        try:
            result = self._outcome(c)
            if result is not None:
                self._record(
                    store, c.job_id, c.what, c.ended_at, result, c.inside and not result["elsewhere"]
                )
        finally:
            os.close(c.lock_fd)

    def _outcome(self, c: _Removal) -> dict[str, Any] | None:
        """The child's report; None (logged, retried at the next round) unless all went."""
        if c.proc.poll() is None:  # past CHILD_LIMIT_SECONDS
            c.proc.kill()
        out, err = c.proc.communicate()
        try:
            result: dict[str, Any] = json.loads(out) if c.proc.returncode == 0 else {}
        except ValueError:
            result = {}
        errors = result.get("errors", [err.decode(errors="replace")[-2000:].strip()])
        if not errors and c.what == "run_dir":
            try:
                os.rmdir(self.home / "jobs" / c.job_id)  # empty now; rmdir follows no symlink
                fsync_dir(self.home / "jobs")
            except OSError as e:
                errors = [f"{c.job_id}: {e.strerror}"]
        if errors:
            self.log.warning(
                "retention.failed", job_id=c.job_id, what=c.what, exit_code=c.proc.returncode, errors=errors
            )
            return None
        return result

    def _record(
        self, store: Store, job_id: str, what: What, ended_at: float, result: dict[str, Any], retire: bool
    ) -> None:
        data = {
            "what": what,
            "files": result["files"],
            "bytes": result["bytes"],
            "ended_days_ago": _days(ended_at),
        }
        if result.get("note"):
            data["note"] = result["note"]
        with store.write():  # the event and the retired rows together
            if retire:
                store.retire_checkpoints(job_id, [c["step"] for c in store.checkpoints(job_id)])
            store.add_event(job_id, Event.RETENTION_REMOVED, data)
        self.log.info(Event.RETENTION_REMOVED, job_id=job_id, **data)


def _nothing(note: str) -> dict[str, Any]:
    return {"files": 0, "bytes": 0, "note": note, "elsewhere": False}


def _submitter(store: Store, job_id: str) -> Owner | None:
    sub = submission(store, job_id)
    return owner_of(sub) if sub is not None else None


def _days(ended_at: float) -> float:
    return round((time.time() - ended_at) / DAY, 2)

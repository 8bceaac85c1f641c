"""Start-up reconciliation: what the store says was running, against what is really running.

A worker left by a previous daemon (killed, crashed) is adopted when three facts agree: its pid is
alive with the recorded start time, its command line names this job's run directory, and the job's
checkpoint lock is held. Otherwise its attempt is closed as `lost` and the job is queued again; it
resumes from its newest committed checkpoint. Never two workers on one job.

Also the memory tiers (docs/memory-tier.md) of jobs that ended while no supervisor was there to
remove them: a daemon killed between a job's end and the removal, a job cancelled while queued
whose removal failed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

import psutil
from structlog.typing import FilteringBoundLogger

from ckptd.daemon import jobs
from ckptd.state.paths import RunDir
from ckptd.state.safeopen import read_under
from ckptd.state.states import STALE, AttemptClass, JobState
from ckptd.state.store import Attempt, Job, Store
from ckptd.state.submissions import managed_jobs, owner_of, submission
from ckptd.supervisor import ledger, tier
from ckptd.supervisor.runner import Adopted

START_TIME_SLACK = 1.0  # psutil's create_time is derived from boot time and clock ticks


@dataclass(frozen=True)
class Recovered:
    adopted: list[tuple[Job, Adopted, list[int]]]
    requeued: list[str]
    lost: list[tuple[str, int, str]]  # job id, attempt, evidence: each gets its worker.exited


def lock_is_held(run: RunDir, ckpt_dir: Path) -> bool:
    """Whether the checkpoint directory's lock is held. Only looked at inside the run directory
    (component by component, no symlink followed): a checkpoint directory elsewhere is the
    owner's to name, and the daemon opens nothing there; pid, start time and command line
    already identify the worker."""
    try:
        rel = ckpt_dir.relative_to(run.root)
    except ValueError:
        return True
    fd = -1
    try:
        way = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(run.root, way)
        for name in rel.parts:
            nxt = os.open(name, way, dir_fd=fd)
            os.close(fd)
            fd = nxt
        nxt = os.open(".lock", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        os.close(fd)
        fd = nxt
    except OSError:
        if fd >= 0:
            os.close(fd)
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def live_worker(a: Attempt, run: RunDir, ckpt_dir: Path) -> psutil.Process | None:
    """The attempt's worker if it is alive and provably ours, else None."""
    if a.pid is None or a.pid_started is None:
        return None
    try:
        proc = psutil.Process(a.pid)
        if abs(proc.create_time() - a.pid_started) > START_TIME_SLACK:
            return None  # the pid was reused
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    if not jobs.works_for(proc, run):
        return None
    return proc if lock_is_held(run, ckpt_dir) else None


def _devices(proc: psutil.Process, run: RunDir) -> list[int]:
    """The GPUs the worker was given: from its environment, or, for a warm worker (whose
    /proc environ predates its assignment), from the record it wrote when it got the job."""
    with contextlib.suppress(psutil.Error, ValueError, OSError):
        visible = proc.environ().get("CUDA_VISIBLE_DEVICES")
        if visible is None:  # the owner's run directory: read without following symlinks
            recorded = json.loads(read_under(run.root, run.warm_env(proc.pid)))
            visible = recorded.get("CUDA_VISIBLE_DEVICES", "")
        return [int(d) for d in visible.split(",") if d.strip()]
    return []


def _close_lost(
    store: Store, job: Job, a: Attempt, what: str, lost: list[tuple[str, int, str]], run: RunDir | None
) -> bool:
    """Close the attempt; True if its worker's own records say it finished (not lost)."""
    evidence = f"daemon restarted; {what}"
    if jobs.end_lost(store, job.id, a, evidence, run) == AttemptClass.SUCCEEDED:
        return True
    lost.append((job.id, a.n, evidence))
    return False


def _reconcile(store: Store, job: Job, lost: list[tuple[str, int, str]]) -> Adopted | bool:
    """The adopted worker; else whether the job finished while no daemon watched it."""
    run = RunDir(Path(job.run_dir))
    spec = jobs.spec_of(job)
    ckpt_dir = run.checkpoint_dir(spec.checkpoint.dir)
    gang = spec.distribute.is_gang
    adopted: Adopted | None = None
    finished = False
    for a in store.attempts(job.id):
        if a.ended_at is not None:
            continue
        proc = live_worker(a, run, ckpt_dir) if adopted is None and not gang else None
        if proc is not None:
            adopted = Adopted(a.n, proc.pid)
            continue
        what = jobs.stop_gang(a.pid, run) if gang else jobs.stop_orphan(a.pid, run) if a.pid else "no worker"
        what += jobs.end_tree(a)
        finished = _close_lost(store, job, a, what, lost, None if gang else run)
        # Its commits since the lost supervisor last read its events (an adopted worker's
        # supervisor replays them itself).
        ledger.catch_up(store, job.id, run.root)
    return adopted if adopted is not None else finished


def recover(store: Store) -> Recovered:
    adopted: list[tuple[Job, Adopted, list[int]]] = []
    requeued: list[str] = []
    lost: list[tuple[str, int, str]] = []
    for job, _sub in managed_jobs(store, STALE):
        found = _reconcile(store, job, lost)
        if found is True and job.state == JobState.RUNNING:  # it finished while no daemon watched
            store.transition(job.id, JobState.SUCCEEDED, "finished while the daemon was gone")
            continue
        if isinstance(found, Adopted):
            devices: list[int] = []
            with contextlib.suppress(psutil.Error):
                devices = _devices(psutil.Process(found.pid), RunDir(Path(job.run_dir)))
            adopted.append((store.job(job.id), found, devices))
            continue
        store.transition(job.id, JobState.INTERRUPTED, "daemon was lost")
        requeued.append(job.id)
    # Interrupted by the last daemon's stop (or just now): they continue automatically.
    for job, _sub in managed_jobs(store, frozenset({JobState.INTERRUPTED})):
        store.transition(job.id, JobState.QUEUED, "resumed at daemon start")
        if job.id not in requeued:
            requeued.append(job.id)
    return Recovered(adopted, requeued, lost)


# Ended daemon jobs that asked for a memory tier: a JSON null (no tier) reads as SQL NULL.
_TIER_JOBS = (
    "SELECT j.id FROM jobs j JOIN submissions s ON s.job_id = j.id WHERE j.state IN ({marks})"
    " AND json_extract(j.spec_json, '$.checkpoint.memory') IS NOT NULL ORDER BY j.id"
)


def ended_tiers(store: Store) -> list[tuple[str, tier.OwnedTier]]:
    """The memory tiers still there of daemon jobs in an end state (tier.END_STATES)."""
    states = sorted(str(s) for s in tier.END_STATES)
    found = []
    for row in store.query(_TIER_JOBS.format(marks=",".join("?" * len(states))), tuple(states)):
        sub = submission(store, row["id"])
        try:
            t = tier.for_job(jobs.spec_of(store.job(row["id"])), row["id"], owner_of(sub)) if sub else None
        except ValueError:  # a stored spec this ckptd cannot read: leave the job alone
            continue
        if t is not None and os.path.lexists(t.path):  # lstat only: nothing of it is opened
            found.append((row["id"], t))
    return found


def remove_ended_tiers(store: Store, log: FilteringBoundLogger) -> None:
    for job_id, t in ended_tiers(store):
        tier.remove_logged(t, job_id, log)

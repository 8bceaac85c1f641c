"""Jobs the daemon is supervising right now: one thread per job, each running a JobRunner.

The thread only supervises (its JobRunner observes → decides → acts); the daemon's main loop
starts threads, asks them to stop through their StopRequests, and reaps them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from structlog.typing import FilteringBoundLogger

from ckptd.daemon import jobs
from ckptd.state import protocol as p
from ckptd.state.jobspec import JobSpec
from ckptd.state.paths import RunDir
from ckptd.state.states import TERMINAL, JobState
from ckptd.state.store import Store
from ckptd.state.submissions import Owner
from ckptd.supervisor import tier
from ckptd.supervisor.display import LogDisplay
from ckptd.supervisor.process import RealProcessOps
from ckptd.supervisor.runner import Adopted, JobRunner, StopRequests
from ckptd.supervisor.warm import WarmPool


@dataclass
class RunningJob:
    job_id: str
    devices: list[int]
    stops: StopRequests = field(default_factory=StopRequests)
    thread: threading.Thread | None = None
    end: JobState | None = None
    drained: bool = False  # stopped by `ckptd drain`: back to the queue when it has stopped


def start_job(
    home: Path,
    job_id: str,
    spec: JobSpec,
    run_dir: Path,
    devices: list[int],
    log: FilteringBoundLogger,
    owner: Owner,
    adopt: Adopted | None = None,
    warm: WarmPool | None = None,
    first: subprocess.Popen[bytes] | None = None,
) -> RunningJob:
    """`owner`: whose rights the workers run with; `warm`: the daemon's pool; `first`: a warm
    worker it took for this job's first attempt."""
    rj = RunningJob(job_id, devices)
    mine = jobs.supervision_dir(home, job_id)
    ops = RealProcessOps(warm, first, owner, mine)
    rj.thread = threading.Thread(
        target=_supervise,
        args=(home, rj, spec, RunDir(run_dir), mine, log, adopt, ops, tier.for_job(spec, job_id, owner)),
        name=f"job-{job_id}",
        daemon=True,
    )
    rj.thread.start()
    return rj


def _supervise(
    home: Path,
    rj: RunningJob,
    spec: JobSpec,
    run: RunDir,
    mine: Path,
    log: FilteringBoundLogger,
    adopt: Adopted | None,
    ops: RealProcessOps,
    job_tier: tier.OwnedTier | None,
) -> None:
    store = Store.open(home, check=False)
    lock_fd = None
    jlog = log.bind(job_id=rj.job_id)
    try:
        lock_fd = jobs.lock_job(mine)
        runner = JobRunner(
            store,
            rj.job_id,
            spec,
            run,
            ops,
            LogDisplay(jlog),
            rj.stops,
            hot_spare=spec.restart.hot_spare,
            gpus=rj.devices,
            record=mine / p.EVENTS_FILE,
            tier=job_tier,
        )
        rj.end = runner.run_job(adopt)
        job = store.job(rj.job_id)
        jlog.info(
            "job.finished", state=str(rj.end), reason=job.reason, last_committed_step=job.last_committed_step
        )
    except Exception as e:  # one job's trouble must never take the daemon down
        jlog.error("job.supervisor_error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        rj.end = _fail(store, rj.job_id, f"supervisor error: {type(e).__name__}: {e}")
    finally:
        ops.release_unused()
        ops.close()
        if lock_fd is not None:
            os.close(lock_fd)
        store.close()


def _fail(store: Store, job_id: str, reason: str) -> JobState:
    try:
        state = store.job(job_id).state
        if state not in TERMINAL and state != JobState.FAILED:
            store.transition(job_id, JobState.FAILED, reason)
        return store.job(job_id).state
    except Exception:
        return JobState.FAILED


def ask_stop(rj: RunningJob, cancel: bool, by: str | None = None) -> None:
    """First call: the worker saves and exits. A second call: kill now (the runner's rule).
    `by`: who asked, for the job's reason (a daemon stop says which signal)."""
    if cancel:
        rj.stops.cancel = True
        rj.stops.by = by
    rj.stops.signals.append(signal.SIGTERM)

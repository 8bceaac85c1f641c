"""Supervise one job: run attempts, classify each end, restart or stop.

The attempt loop only observes → decides (ckptd.supervisor.policy) → acts (ProcessOps, the
store). An attempt's workers are started by ckptd.supervisor.launch and watched by the one loop
of ckptd.supervisor.attempt, a single worker as a group of one, a gang's members
(ckptd.supervisor.gangattempt) as a group of K. Signal handlers elsewhere only append to
`StopRequests`; the watch loop dispatches them.
"""

from __future__ import annotations

import contextlib
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptd.state import goodput
from ckptd.state import protocol as p
from ckptd.state.jobspec import JobSpec
from ckptd.state.paths import RunDir
from ckptd.state.states import AttemptClass, JobState
from ckptd.state.store import Store
from ckptd.supervisor import ledger, nvml
from ckptd.supervisor.attempt import (
    HANG_GRACE_SECONDS,
    POLL_SECONDS,
    STOP_GRACE_SECONDS,
    AttemptWatch,
    Display,
    Group,
    LocalGroup,
    Member,
    Progress,
)
from ckptd.supervisor.evidence import error_summary, file_size, read_error
from ckptd.supervisor.gangattempt import gang_attempt
from ckptd.supervisor.launch import Launcher, NoDevices
from ckptd.supervisor.policy import (
    Action,
    AttemptOutcome,
    ExitObservation,
    classify_exit,
    decide_restart,
    nan_restarts,
)
from ckptd.supervisor.process import ExitStatus, ProcessOps
from ckptd.supervisor.tier import Tier, TierMeter, ends_tier

# Imported from here by the daemon and tests: the grace periods of the watch loop.
__all__ = ["HANG_GRACE_SECONDS", "STOP_GRACE_SECONDS", "Adopted", "JobRunner", "NoDevices", "StopRequests"]


@dataclass
class StopRequests:
    """Appended to by signal handlers (nothing else happens in a handler), or by the daemon on
    shutdown or `ckptd cancel` (then `cancel` is set first: the job ends cancelled)."""

    signals: list[int] = field(default_factory=list)
    cancel: bool = False
    by: str | None = None  # who asked, when not a signal: "uid 1001 through the API"

    def stopped_state(self) -> JobState:
        return JobState.CANCELLED if self.cancel else JobState.INTERRUPTED


@dataclass(frozen=True)
class Adopted:
    """A live worker of this job left by a previous supervisor (daemon restart)."""

    n: int
    pid: int


class JobRunner:
    def __init__(
        self,
        store: Store,
        job_id: str,
        spec: JobSpec,
        run: RunDir,
        ops: ProcessOps,
        display: Display,
        stops: StopRequests,
        jitter: Callable[[], float] = random.random,
        hot_spare: bool = False,
        gpus: list[int] | None = None,
        record: Path | None = None,
        tier: Tier | None = None,
    ) -> None:
        """`record`: the supervisor's own events file (never in the owner's run directory),
        where each attempt's start, end and restart are kept for `ckptd logs`. `tier`: the job's
        memory tier (ckptd.supervisor.tier.for_job), None for a job without one."""
        self.store, self.job_id, self.spec, self.run = store, job_id, spec, run
        self.record = record
        self.ops, self.display, self.stops, self.jitter = ops, display, stops, jitter
        self.history: list[AttemptOutcome] = []
        self.committed_step: int | None = store.job(job_id).last_committed_step
        self.events = p.EventTail(run.root / p.EVENTS_FILE, root=run.root)
        self.tier = tier
        self.launcher = Launcher(ops, run, spec, hot_spare, gpus or [], tier.bytes if tier else None)

    def run_job(self, adopt: Adopted | None = None) -> JobState:
        """Run attempts until the job succeeds, fails or is interrupted. Returns the end state."""
        try:
            end = self._run_attempts(adopt)
        finally:
            self.launcher.drop_spare()
        self._end_tier(end)
        return end

    def _end_tier(self, end: JobState) -> None:
        """Remove the memory tier and the async saver's segment once no attempt follows
        (ckptd.supervisor.tier.ends_tier): a worker killed after its final commit leaves both.
        Neither failure changes the job's end: its RAM is lost until a reboot, its training is
        not. The tier's failure is reported; the segment's is not (ckptd.state.paths.
        remove_segment already passes over a missing file or another user's, so only an I/O
        error of the tmpfs is left)."""
        if not ends_tier(end):
            return
        with contextlib.suppress(OSError):
            self.ops.remove_segment(self.run.checkpoint_dir(self.spec.checkpoint.dir))
        if self.tier is None:
            return
        try:
            self.tier.remove()
        except OSError as e:
            ev = {"event": p.Event.MEMORY_TIER_REMOVE_FAILED, "tier": str(self.tier.path), "error": str(e)}
            self.display.event(ev)
            self.record_event(p.Event.MEMORY_TIER_REMOVE_FAILED, tier=ev["tier"], error=ev["error"])

    def _run_attempts(self, adopt: Adopted | None) -> JobState:
        while True:
            try:
                outcome = self._attempt(adopt)
                adopt = None
            except NoDevices as e:
                self.store.transition(self.job_id, JobState.FAILED, str(e))
                return JobState.FAILED
            if outcome.klass == AttemptClass.SUCCEEDED:  # even if a stop arrived meanwhile
                self.store.transition(self.job_id, JobState.SUCCEEDED, "training finished")
                return JobState.SUCCEEDED
            if not self.run.root.is_dir():
                self.store.transition(
                    self.job_id,
                    JobState.FAILED,
                    f"the run directory {self.run.root} was deleted while the "
                    "job ran; its checkpoints and logs went with it",
                )
                return JobState.FAILED
            if self.stops.signals:
                end = self.stops.stopped_state()
                what = "cancelled" if self.stops.cancel else "stopped"
                by = self.stops.by or signal.Signals(self.stops.signals[0]).name
                self.store.transition(self.job_id, end, f"{what} by {by}")
                return end
            decision = decide_restart(self.history, self.spec.restart, self.jitter())
            if decision.action == Action.DONE:
                self.store.transition(self.job_id, JobState.SUCCEEDED, decision.reason)
                return JobState.SUCCEEDED
            if decision.action == Action.FAIL:
                self.store.transition(self.job_id, JobState.FAILED, decision.reason)
                return JobState.FAILED
            self.store.transition(self.job_id, JobState.BACKOFF, decision.reason)
            self.display.restarting(decision.delay, decision.reason)
            self.record_event(
                p.Event.WORKER_RESTARTING, delay_seconds=round(decision.delay, 2), reason=decision.reason
            )
            if not self._sleep(decision.delay):
                end = self.stops.stopped_state()
                self.store.transition(self.job_id, end, f"{end} during backoff")
                return end
            self.store.transition(self.job_id, JobState.RUNNING, f"attempt after {outcome.klass}")

    def _sleep(self, delay: float) -> bool:
        end = self.ops.monotonic() + delay
        while self.ops.monotonic() < end:
            if self.stops.signals:
                return False
            self.ops.sleep(min(POLL_SECONDS * 2, end - self.ops.monotonic()))
        return True

    # -- one attempt ------------------------------------------------------------------------

    def begin_attempt(self) -> int:
        """The next attempt's number; its events are the ones appended from now on."""
        self.events.offset = file_size(self.run.root / p.EVENTS_FILE)
        return len(self.store.attempts(self.job_id)) + 1

    def _start(self) -> tuple[int, int]:
        n = self.begin_attempt()
        pid, how = self.launcher.single(n, nan_restarts(self.history))
        self.store.start_attempt(self.job_id, pid, self.ops.start_time(pid))
        self.display.attempt_started(n, pid)
        self.record_event(p.Event.WORKER_SPAWNED, attempt=n, pid=pid)
        if how is not None:
            self.display.event({"event": how, "attempt": n, "pid": pid})
        return n, pid

    def _attempt(self, adopt: Adopted | None = None) -> AttemptOutcome:
        if self.spec.distribute.is_gang:
            return gang_attempt(self)
        if adopt is None:
            n, pid = self._start()
        else:  # its events so far were recorded by the previous supervisor or are replayed
            n, pid = adopt.n, adopt.pid
            self.display.event({"event": p.Event.WORKER_ADOPTED, "attempt": n, "pid": pid})
        adir = self.run.attempt_dir(n)
        w = Progress(n)
        worker = Member(0, pid, self.run, last_change=self.ops.monotonic())
        watch = self.watch(w, [worker], LocalGroup(self.ops, [pid]), solo=True)
        assert worker.status is not None
        status = worker.status
        if status.exit_code is None and status.signal is None:  # not our child: ask its file
            status = ExitStatus(p.read_exit_code(adir, self.run.root), None)
        oom = worker.oom or self.ops.memory_evidence(pid)
        last = p.Heartbeat.read(self.run.heartbeat, self.run.root)  # its last word: DONE?
        phase = last.phase if last is not None and last.attempt == n else worker.phase
        self.drain_events(w)
        err = read_error(self.run.root, adir / p.ERROR_FILE)
        sick = self._sick_devices(status)
        obs = ExitObservation(
            status.exit_code,
            status.signal,
            err.get("type"),
            err.get("message"),
            watch.hang,
            oom,
            nvml.describe(sick),
            phase == p.Phase.DONE,
        )
        klass, evidence = classify_exit(obs)
        if isinstance(err.get("step"), int):
            w.last_step = err["step"]
        return self.end_attempt(w, status, klass, evidence, error_summary(err), sick)

    def watch(self, w: Progress, members: list[Member], group: Group, solo: bool) -> AttemptWatch:
        """Watch attempt `w.n`'s workers until all have ended, recording their events as they
        come. Only a single worker's memory is watched here (a gang's members have no limit);
        its memory tier counts with it, measured every few seconds (TierMeter)."""
        meter = TierMeter(self.tier.bytes, self.ops.monotonic) if solo and self.tier else None
        watch = AttemptWatch(
            self.ops,
            self.spec.restart,
            members,
            group,
            lambda: len(self.stops.signals),
            w.n,
            self.display,
            solo=solo,
            memory_limit=self.spec.resources.memory_limit if solo else None,
            tier_bytes=meter,
        )
        watch.run(lambda: self.drain_events(w))
        w.last_step, w.memory_step = members[0].last_step, members[0].memory_step
        if w.restored_step is None:
            w.restored_step = members[0].restored_step
        return watch

    def end_attempt(
        self,
        w: Progress,
        status: ExitStatus,
        klass: AttemptClass,
        evidence: str,
        summary: str | None,
        sick: dict[int, str],
    ) -> AttemptOutcome:
        n = w.n
        self.store.end_attempt(
            self.job_id,
            n,
            exit_code=status.exit_code,
            signal=status.signal,
            klass=klass,
            evidence=evidence,
            error_summary=summary,
            restored_step=w.restored_step,
            last_step=w.last_step,
        )
        self.display.attempt_ended(n, klass, evidence)
        # The job's goodput so far: the last attempt's exit event carries the whole job's.
        gp = goodput.summary(self.store, self.job_id, self.run.root) if self.record else None
        self.record_event(
            p.Event.WORKER_EXITED, attempt=n, exit_class=str(klass), evidence=evidence, goodput=gp
        )
        outcome = AttemptOutcome(klass, w.restored_step, w.committed_step, w.last_step, w.memory_step)
        self.history.append(outcome)
        if klass == AttemptClass.GPU_FAULT and self.launcher.devices:
            excluded = self.launcher.exclude_sick(sorted(sick))
            self.store.add_event(self.job_id, p.Event.GPU_EXCLUDED, {"devices": excluded})
        return outcome

    def record_event(self, kind: p.Event, **data: Any) -> None:
        if self.record is not None:
            p.append_event(self.record, kind, **data)

    def _sick_devices(self, status: ExitStatus) -> dict[int, str]:
        """NVML's report on the attempt's GPUs, asked only after an ending that was not clean."""
        devices = self.launcher.devices
        if not devices or status.exit_code in (p.EXIT_OK, p.EXIT_PREEMPTED):
            return {}
        return self.ops.gpu_problems(devices)

    def drain_events(self, w: Progress) -> None:
        for ev in self.events.read():
            ledger.apply(self.store, self.job_id, ev)
            step = ev.get("step")
            if ev.get("event") == p.Event.CHECKPOINT_COMMITTED and isinstance(step, int):
                w.committed_step = self.committed_step = step
            elif ev.get("event") == p.Event.RESTORE_DONE and isinstance(step, int):
                w.restored_step = w.committed_step = step
            self.display.event(ev)

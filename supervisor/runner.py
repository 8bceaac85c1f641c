"""Supervise one job: start a worker per attempt, watch it, classify its end, restart or stop.

The loop only observes → decides (ckptd.supervisor.policy) → acts (ProcessOps, the store).
Signal handlers elsewhere only append to `StopRequests`; this loop dispatches them.
"""

from __future__ import annotations

import random
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ckptd.state import goodput
from ckptd.state import protocol as p
from ckptd.state.jobspec import JobSpec, replica_counts
from ckptd.state.paths import RunDir
from ckptd.state.states import AttemptClass, JobState
from ckptd.state.store import Store
from ckptd.supervisor import ledger, nvml
from ckptd.supervisor.evidence import error_summary, file_size, read_error
from ckptd.supervisor.gangattempt import gang_attempt
from ckptd.supervisor.gpus import choose_devices, exclude_after_fault
from ckptd.supervisor.policy import (
    Action,
    AttemptOutcome,
    ExitObservation,
    classify_exit,
    decide_restart,
    nan_restarts,
    silence_limit,
)
from ckptd.supervisor.process import ExitStatus, ProcessOps, worker_argv

POLL_SECONDS = 0.05
STOP_GRACE_SECONDS = 60.0  # a polite stop waits this long for the final save before SIGKILL
HANG_GRACE_SECONDS = 10.0


class NoDevices(Exception):
    """Not enough healthy GPUs for the job."""


class Display(Protocol):
    def heartbeat(self, hb: p.Heartbeat) -> None: ...
    def event(self, ev: dict[str, Any]) -> None: ...
    def attempt_started(self, n: int, pid: int) -> None: ...
    def attempt_ended(self, n: int, klass: AttemptClass, evidence: str) -> None: ...
    def restarting(self, delay: float, reason: str) -> None: ...


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


@dataclass
class Watch:
    n: int
    pid: int
    started: float
    last_change: float
    last_seq: int = -1
    phase: str = p.Phase.STARTING
    restored_step: int | None = None
    committed_step: int | None = None
    last_step: int | None = None
    term_sent: float | None = None
    kill_sent: bool = False
    hang: str | None = None
    oom: str | None = None
    stops_seen: int = 0


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
    ) -> None:
        """`record`: the supervisor's own events file (never in the owner's run directory),
        where each attempt's start, end and restart are kept for `ckptd logs`."""
        self.store, self.job_id, self.spec, self.run = store, job_id, spec, run
        self.record = record
        self.ops, self.display, self.stops, self.jitter = ops, display, stops, jitter
        self.history: list[AttemptOutcome] = []
        self.committed_step: int | None = store.job(job_id).last_committed_step
        self.events = p.EventTail(run.root / p.EVENTS_FILE, root=run.root)
        self.hot_spare = hot_spare
        self.spare_pid: int | None = None
        self.spare_env: dict[str, str] = {}
        self.gpus, self.excluded_gpus = gpus or [], set[int]()
        self.devices: list[int] = []

    def run_job(self, adopt: Adopted | None = None) -> JobState:
        """Run attempts until the job succeeds, fails or is interrupted. Returns the end state."""
        try:
            return self._run_attempts(adopt)
        finally:
            self._drop_spare()

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

    # -- hot spare: a worker with TensorFlow imported and the model built, waiting on stdin ------

    def _start_spare(self, env: dict[str, str]) -> None:
        sdir = self.run.root / "attempts" / "spare"
        self.spare_env = env
        limit = self.spec.resources.memory_limit
        self.spare_pid = self.ops.take_warm(self.run.root, "--spare", env, limit)
        if self.spare_pid is None:
            self.spare_pid = self.ops.spawn(
                worker_argv(self.run.root, None),
                self.run.root,
                sdir / "stdout.log",
                sdir / "stderr.log",
                spare=True,
                env=env,
                memory_limit=limit,
            )

    def _take_spare(self, n: int, env: dict[str, str]) -> int | None:
        pid, self.spare_pid = self.spare_pid, None
        # A spare started on a device that has since been excluded is no use.
        if pid is not None and self.spare_env == env and self.ops.assign(pid, n):
            return pid
        if pid is not None:
            self.spare_pid = pid
            self._drop_spare()
        return None

    def _drop_spare(self) -> None:
        if self.spare_pid is None:
            return
        self.ops.signal_group(self.spare_pid, signal.SIGKILL)
        for _ in range(100):  # reap it: no zombie, no orphan
            if self.ops.poll(self.spare_pid) is not None:
                break
            self.ops.sleep(POLL_SECONDS / 5)
        self.spare_pid = None

    def _device_env(self) -> dict[str, str]:
        wanted = self.spec.resources.gpus
        if wanted == 0:
            return {}
        chosen = choose_devices(self.gpus, self.excluded_gpus, wanted, replica_counts(self.spec)[1])
        if chosen is None:
            raise NoDevices(
                f"resources.gpus={wanted} (fewest {replica_counts(self.spec)[1]}), but only "
                f"{len(self.gpus) - len(self.excluded_gpus)} healthy GPU(s) "
                f"(found {self.gpus}, excluded {sorted(self.excluded_gpus)})"
            )
        self.devices = chosen
        # nvidia-smi's and NVML's indices are in PCI bus order; CUDA's default order is not.
        return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ",".join(map(str, chosen))}

    def _launch(self, n: int) -> tuple[int, p.Event | None]:
        """Start attempt `n`: in the job's hot spare, else in a warm worker, else cold. Returns
        the pid and which kind of pre-started process took it, if any."""
        adir = self.run.attempt_dir(n)
        env = self._device_env()
        if k := nan_restarts(self.history):  # the worker lowers its learning rate this much
            env[p.NAN_RESTARTS_ENV] = str(k)
        limit = self.spec.resources.memory_limit
        pid = self._take_spare(n, env)
        how = p.Event.WORKER_SPARE_ASSIGNED if pid is not None else None
        if pid is None and (pid := self.ops.take_warm(self.run.root, str(n), env, limit)):
            how = p.Event.WORKER_WARM_ASSIGNED
        if pid is None:
            pid = self.ops.spawn(
                worker_argv(self.run.root, n),
                self.run.root,
                adir / "stdout.log",
                adir / "stderr.log",
                env=env,
                memory_limit=limit,
            )
        if self.hot_spare:
            self._start_spare(env)
        return pid, how

    def _start(self) -> tuple[int, int]:
        n = len(self.store.attempts(self.job_id)) + 1
        self.events.offset = file_size(self.run.root / p.EVENTS_FILE)
        pid, how = self._launch(n)
        self.store.start_attempt(self.job_id, pid, self.ops.start_time(pid))
        self.display.attempt_started(n, pid)
        self.record_event(p.Event.WORKER_SPAWNED, attempt=n, pid=pid)
        if how is not None:
            self.display.event({"event": how, "attempt": n, "pid": pid})
        return n, pid

    def _attempt(self, adopt: Adopted | None = None) -> AttemptOutcome:
        if self.spec.distribute.strategy == "multi_worker":
            return gang_attempt(self)
        if adopt is None:
            n, pid = self._start()
        else:  # its events so far were recorded by the previous supervisor or are replayed
            n, pid = adopt.n, adopt.pid
            self.display.event({"event": p.Event.WORKER_ADOPTED, "attempt": n, "pid": pid})
        adir = self.run.attempt_dir(n)
        now = self.ops.monotonic()
        w = Watch(n=n, pid=pid, started=now, last_change=now)
        status = self._watch(w)
        if status.exit_code is None and status.signal is None:  # not our child: ask its file
            status = ExitStatus(p.read_exit_code(adir, self.run.root), None)
        w.oom = w.oom or self.ops.memory_evidence(pid)
        last = p.Heartbeat.read(self.run.heartbeat, self.run.root)  # its last word: DONE?
        if last is not None and last.attempt == n:
            w.phase = last.phase
        self.drain_events(w)
        err = read_error(self.run.root, adir / p.ERROR_FILE)
        sick = self._sick_devices(status)
        obs = ExitObservation(
            status.exit_code,
            status.signal,
            err.get("type"),
            err.get("message"),
            w.hang,
            w.oom,
            nvml.describe(sick),
            w.phase == p.Phase.DONE,
        )
        klass, evidence = classify_exit(obs)
        if isinstance(err.get("step"), int):
            w.last_step = err["step"]
        return self.end_attempt(n, w, status, klass, evidence, error_summary(err), sick)

    def end_attempt(
        self,
        n: int,
        w: Watch,
        status: ExitStatus,
        klass: AttemptClass,
        evidence: str,
        summary: str | None,
        sick: dict[int, str],
    ) -> AttemptOutcome:
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
        outcome = AttemptOutcome(klass, w.restored_step, w.committed_step, w.last_step)
        self.history.append(outcome)
        if klass == AttemptClass.GPU_FAULT and self.devices:
            # NVML names the sick device; an error message alone only says "one of these".
            self.excluded_gpus = exclude_after_fault(
                self.gpus,
                self.excluded_gpus,
                sorted(sick) or self.devices,
                self.spec.resources.gpus,
                replica_counts(self.spec)[1],
            )
            self.store.add_event(self.job_id, p.Event.GPU_EXCLUDED, {"devices": sorted(self.excluded_gpus)})
        return outcome

    def record_event(self, kind: p.Event, **data: Any) -> None:
        if self.record is not None:
            p.append_event(self.record, kind, **data)

    def _sick_devices(self, status: ExitStatus) -> dict[int, str]:
        """NVML's report on the attempt's GPUs, asked only after an ending that was not clean."""
        if not self.devices or status.exit_code in (p.EXIT_OK, p.EXIT_PREEMPTED):
            return {}
        return self.ops.gpu_problems(self.devices)

    def _watch(self, w: Watch) -> ExitStatus:
        while True:
            status = self.ops.poll(w.pid)
            if status is not None:
                return status
            self._observe(w)
            self._enforce(w)
            self.ops.sleep(POLL_SECONDS)

    def _observe(self, w: Watch) -> None:
        hb = p.Heartbeat.read(self.run.heartbeat, self.run.root)
        if hb is not None and hb.attempt == w.n and hb.seq != w.last_seq:
            w.last_seq, w.phase = hb.seq, hb.phase
            w.last_change = self.ops.monotonic()
            w.last_step = hb.step
            if hb.restored_step is not None:
                w.restored_step = hb.restored_step
            self.display.heartbeat(hb)
        self.drain_events(w)
        limit = self.spec.resources.memory_limit
        if limit and w.oom is None and not self.ops.memory_enforced(w.pid):  # no cgroup: watch RSS
            rss = self.ops.rss(w.pid)
            if rss is not None and rss > limit:
                w.oom = (
                    f"anonymous memory (RssAnon+RssShmem) {rss} bytes exceeded resources.memory_limit {limit}"
                )
                self.ops.signal_group(w.pid, signal.SIGKILL)

    def drain_events(self, w: Watch) -> None:
        for ev in self.events.read():
            ledger.apply(self.store, self.job_id, ev)
            step = ev.get("step")
            if ev.get("event") == p.Event.CHECKPOINT_COMMITTED and isinstance(step, int):
                w.committed_step = self.committed_step = step
            elif ev.get("event") == p.Event.RESTORE_DONE and isinstance(step, int):
                w.restored_step = w.committed_step = step
            self.display.event(ev)

    def _enforce(self, w: Watch) -> None:
        now = self.ops.monotonic()
        if len(self.stops.signals) > w.stops_seen:
            w.stops_seen = len(self.stops.signals)
            if w.term_sent is None:
                self.ops.signal_group(w.pid, signal.SIGTERM)
                w.term_sent = now
            else:  # asked twice: stop now
                self.ops.signal_group(w.pid, signal.SIGKILL)
                w.kill_sent = True
        if w.term_sent is None and w.hang is None:
            limit = silence_limit(w.phase, self.spec.restart)
            if now - w.last_change > limit:
                w.hang = (
                    f"no progress heartbeat for {now - w.last_change:.1f}s in phase "
                    f"{w.phase} (last step {w.last_step}); Python stacks in "
                    f"{self.run.attempt_dir(w.n) / 'stderr.log'}"
                )
                self.display.event(
                    {
                        "event": p.Event.HEARTBEAT_MISSED,
                        "attempt": w.n,
                        "pid": w.pid,
                        "phase": w.phase,
                        "last_step": w.last_step,
                        "silent_seconds": round(now - w.last_change, 1),
                    }
                )
                self.ops.signal_pid(w.pid, signal.SIGUSR1)  # faulthandler dumps every stack
                self.ops.signal_group(w.pid, signal.SIGCONT)  # a stopped worker must see TERM
                self.ops.signal_group(w.pid, signal.SIGTERM)
                w.term_sent = now
        grace = HANG_GRACE_SECONDS if w.hang else STOP_GRACE_SECONDS
        if w.term_sent is not None and not w.kill_sent and now - w.term_sent > grace:
            self.ops.signal_group(w.pid, signal.SIGKILL)
            w.kill_sent = True

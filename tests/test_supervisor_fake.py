"""The supervisor loop against a fake OS seam: no processes, a fake clock, scripted workers."""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ckptd.state.jobspec import JobSpec, spec_digest, spec_json
from ckptd.state.paths import RunDir
from ckptd.state.protocol import Event, Heartbeat, append_event
from ckptd.state.states import AttemptClass, JobState
from ckptd.state.store import Store
from ckptd.supervisor.process import ExitStatus
from ckptd.supervisor.runner import Adopted, JobRunner, StopRequests


@dataclass
class Script:
    """One fake worker: `tick(ops, t)` runs every poll and may return its exit status."""

    tick: Callable[[FakeOps, float], ExitStatus | None]
    rss: int = 100


@dataclass
class FakeOps:
    run: RunDir
    scripts: list[Script]
    now: float = 0.0
    sent: list[tuple[int, int]] = field(default_factory=list)
    sleeps: list[float] = field(default_factory=list)
    live: dict[int, tuple[Script, float]] = field(default_factory=dict)

    spares: list[int] = field(default_factory=list)
    envs: list[dict[str, str]] = field(default_factory=list)
    assigned: list[int] = field(default_factory=list)
    oom_evidence: dict[int, str] = field(default_factory=dict)
    sick_gpus: dict[int, str] = field(default_factory=dict)
    gpu_queries: list[list[int]] = field(default_factory=list)
    next_pid: int = 1000

    segments_removed: list[Path] = field(default_factory=list)  # checkpoint dirs, at job ends
    warm: list[int] = field(default_factory=list)  # the daemon's warm workers
    warm_taken: list[tuple[int, str]] = field(default_factory=list)

    def fork(
        self, run_dir: Path, mode: str, env: dict[str, str], memory_limit: int | None = None
    ) -> int | None:
        return None  # no fork server: attempts start cold (or warm), as scripted

    def take_warm(
        self, run_dir: Path, mode: str, env: dict[str, str], memory_limit: int | None = None
    ) -> int | None:
        if not self.warm:
            return None
        pid = self.warm.pop(0)
        self.warm_taken.append((pid, mode))
        self.envs.append(env)
        if mode == "--spare":
            self.spares.append(pid)
        else:
            self.live[pid] = (self.scripts.pop(0), self.now)
        return pid

    def gpu_problems(self, devices: list[int]) -> dict[int, str]:
        self.gpu_queries.append(devices)
        return {d: what for d, what in self.sick_gpus.items() if d in devices}

    def assign(self, pid: int, attempt: int) -> bool:
        if pid not in self.spares:
            return False
        self.spares.remove(pid)
        self.assigned.append(pid)
        self.live[pid] = (self.scripts.pop(0), self.now)
        return True

    def memory_enforced(self, pid: int) -> bool:
        return False

    def memory_evidence(self, pid: int) -> str | None:
        return self.oom_evidence.pop(pid, None)

    def spawn(
        self,
        argv: list[str],
        cwd: Path,
        stdout: Path,
        stderr: Path,
        spare: bool = False,
        env: dict[str, str] | None = None,
        memory_limit: int | None = None,
    ) -> int:
        self.next_pid += 1
        self.envs.append(env or {})
        if spare:
            assert argv[-1] == "--spare"
            self.spares.append(self.next_pid)
        else:
            self.live[self.next_pid] = (self.scripts.pop(0), self.now)
        return self.next_pid

    def poll(self, pid: int) -> ExitStatus | None:
        if pid in self.spares:  # an idle spare only dies when killed
            if (pid, signal.SIGKILL) in self.sent:
                self.spares.remove(pid)
                return ExitStatus(None, signal.SIGKILL)
            return None
        script, started = self.live[pid]
        status = script.tick(self, self.now - started)
        if status is None and any(p == pid and s == signal.SIGKILL for p, s in self.sent):
            status = ExitStatus(None, signal.SIGKILL)
        if status is not None:
            del self.live[pid]
        return status

    def start_time(self, pid: int) -> float | None:
        return 1000.0 + pid

    def signal_group(self, pid: int, sig: int) -> None:
        self.sent.append((pid, sig))

    def signal_pid(self, pid: int, sig: int) -> None:
        self.sent.append((pid, sig))

    def rss(self, pid: int) -> int | None:
        return self.live[pid][0].rss if pid in self.live else None

    def stopped(self, pid: int) -> bool:
        return False

    def remove_segment(self, checkpoint_dir: Path) -> bool:
        self.segments_removed.append(checkpoint_dir)
        return True

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def exits_after(
    seconds: float, code: int | None, sig: int | None = None, commit: int | None = None
) -> Script:
    def tick(ops: FakeOps, t: float) -> ExitStatus | None:
        if t < seconds:
            return None
        if commit is not None:
            append_event(
                ops.run.root / "events.jsonl",
                "checkpoint.committed",
                step=commit,
                epoch=0,
                path="p",
                metrics={},
                digest="d",
            )
        return ExitStatus(code, sig)

    return Script(tick)


def _setup(tmp_path: Path, **restart: float) -> tuple[Store, RunDir, JobSpec]:
    spec = JobSpec.model_validate(
        {
            "name": "fake",
            "model": "m.mod:build",
            "restart": {"backoff_initial_seconds": 1, "backoff_max_seconds": 4, **restart},
            "resources": {"memory_limit": "100MiB"},
        },
        strict=False,
    )
    store = Store.open(tmp_path)
    run = RunDir(tmp_path / "jobs" / "j")
    run.root.mkdir(parents=True)
    store.create_job("j", "fake", spec_json(spec), spec_digest(spec), "f", str(run.root))
    store.transition("j", JobState.RUNNING)
    return store, run, spec


def _runner(
    tmp_path: Path, scripts: list[Script], stops: StopRequests | None = None, **restart: float
) -> tuple[JobRunner, FakeOps, Store]:
    store, run, spec = _setup(tmp_path, **restart)
    ops = FakeOps(run, scripts)
    runner = JobRunner(
        store, "j", spec, run, ops, _NullDisplay(), stops or StopRequests(), jitter=lambda: 0.0
    )
    return runner, ops, store


class _NullDisplay:
    def __init__(self) -> None:
        self.events: list[dict[str, object]] = []

    def heartbeat(self, hb: Heartbeat) -> None: ...
    def event(self, ev: dict[str, object]) -> None:
        self.events.append(ev)

    def attempt_started(self, n: int, pid: int) -> None: ...
    def attempt_ended(self, n: int, klass: AttemptClass, evidence: str) -> None: ...
    def restarting(self, delay: float, reason: str) -> None: ...


def test_crash_then_success(tmp_path: Path) -> None:
    runner, _ops, store = _runner(tmp_path, [exits_after(1, 1), exits_after(1, 0, commit=52)])
    assert runner.run_job() == JobState.SUCCEEDED
    assert [a.klass for a in store.attempts("j")] == [AttemptClass.CRASH, AttemptClass.SUCCEEDED]
    assert store.job("j").last_committed_step == 52
    states = [e["data_json"] for e in store.events("j") if e["kind"] == "job.state"]
    assert any('"to": "backoff"' in s for s in states)


def test_budget_exhausted_fails(tmp_path: Path) -> None:
    runner, _, store = _runner(tmp_path, [exits_after(0.1, 1, None) for _ in range(3)], max_restarts=1)
    # Different steps each time would be needed to dodge crash-loop detection; budget 1 fails first.
    assert runner.run_job() == JobState.FAILED
    assert len(store.attempts("j")) == 2
    assert "max_restarts=1" in (store.job("j").reason or "")


def test_hang_is_detected_and_killed(tmp_path: Path) -> None:
    never = Script(lambda ops, t: None)
    runner, ops, store = _runner(
        tmp_path, [never, exits_after(0.1, 0)], startup_grace_seconds=5, heartbeat_timeout_seconds=2
    )
    assert runner.run_job() == JobState.SUCCEEDED
    first = store.attempts("j")[0]
    assert first.klass == AttemptClass.HANG
    sigs = [s for _, s in ops.sent]
    # stacks first, wake a stopped worker, ask politely, then kill after the grace period
    assert sigs[:4] == [signal.SIGUSR1, signal.SIGCONT, signal.SIGTERM, signal.SIGKILL]
    assert "stacks" in (first.evidence or "")
    missed = [e for e in runner.display.events if e["event"] == Event.HEARTBEAT_MISSED]  # type: ignore[attr-defined]
    assert len(missed) == 1 and missed[0]["phase"] == "starting"


def test_memory_limit_kills_as_host_oom(tmp_path: Path) -> None:
    hog = Script(lambda ops, t: None, rss=200 * 2**20)
    runner, _ops, store = _runner(tmp_path, [hog, exits_after(0.1, 0)])
    assert runner.run_job() == JobState.SUCCEEDED
    first = store.attempts("j")[0]
    assert first.klass == AttemptClass.HOST_OOM
    assert "memory_limit" in (first.evidence or "")


def test_stop_request_preempts_and_interrupts(tmp_path: Path) -> None:
    stops = StopRequests()

    def worker(ops: FakeOps, t: float) -> ExitStatus | None:
        if t > 1 and not stops.signals:
            stops.signals.append(signal.SIGINT)  # Ctrl-C arrives while training
        if any(s == signal.SIGTERM for _, s in ops.sent):
            return ExitStatus(75, None)  # saved and stopped as agreed
        return None

    runner, _ops, store = _runner(tmp_path, [Script(worker)], stops)
    assert runner.run_job() == JobState.INTERRUPTED
    assert store.attempts("j")[0].klass == AttemptClass.PREEMPTED
    assert store.job("j").state == JobState.INTERRUPTED


@pytest.mark.parametrize("code", [78, 77, 76])
def test_config_errors_are_not_retried(tmp_path: Path, code: int) -> None:
    runner, _, store = _runner(tmp_path, [exits_after(0.1, code)])
    assert runner.run_job() == JobState.FAILED
    assert [a.klass for a in store.attempts("j")] == [AttemptClass.CONFIG_ERROR]


def test_hot_spare_takes_over_after_a_failure_and_is_reaped(tmp_path: Path) -> None:
    store, run, spec = _setup(tmp_path)
    ops = FakeOps(run, [exits_after(1, 1), exits_after(1, 0)])
    runner = JobRunner(
        store, "j", spec, run, ops, _NullDisplay(), StopRequests(), jitter=lambda: 0.0, hot_spare=True
    )
    assert runner.run_job() == JobState.SUCCEEDED
    first, second = store.attempts("j")
    assert ops.assigned == [second.pid]  # the second attempt ran in the spare
    assert first.pid not in ops.assigned
    assert ops.spares == []  # the spare started for a third attempt was killed and reaped


def test_warm_workers_take_attempts_then_cold_starts_when_none_is_left(tmp_path: Path) -> None:
    """Attempt 1 runs in a warm worker, attempt 2 (after a crash) in the other, attempt 3 cold."""
    store, run, spec = _setup(tmp_path)
    ops = FakeOps(
        run, [exits_after(1, 1, commit=20), exits_after(1, 1, commit=40), exits_after(1, 0)], warm=[7, 8]
    )
    runner = JobRunner(store, "j", spec, run, ops, _NullDisplay(), StopRequests(), jitter=lambda: 0.0)
    assert runner.run_job() == JobState.SUCCEEDED
    assert [a.pid for a in store.attempts("j")][:2] == [7, 8]
    assert ops.warm_taken == [(7, "1"), (8, "2")]
    assert store.attempts("j")[2].pid not in (7, 8)


def test_a_jobs_hot_spare_comes_from_a_warm_worker(tmp_path: Path) -> None:
    store, run, spec = _setup(tmp_path)
    ops = FakeOps(run, [exits_after(1, 1), exits_after(1, 0)], warm=[7])
    runner = JobRunner(
        store, "j", spec, run, ops, _NullDisplay(), StopRequests(), jitter=lambda: 0.0, hot_spare=True
    )
    assert runner.run_job() == JobState.SUCCEEDED
    first, second = store.attempts("j")
    assert ops.warm_taken == [(7, "1")] and first.pid == 7  # the warm one ran attempt 1
    assert ops.assigned == [second.pid]  # its cold-started spare took attempt 2


def _gpu_setup(tmp_path: Path, gpus: int) -> tuple[Store, RunDir, JobSpec]:
    store, run, spec = _setup(tmp_path)
    spec = spec.model_copy(update={"resources": spec.resources.model_copy(update={"gpus": gpus})})
    return store, run, spec


def test_gpu_fault_moves_the_job_to_another_gpu(tmp_path: Path) -> None:
    store, run, spec = _gpu_setup(tmp_path, 1)
    (run.attempt_dir(1)).mkdir(parents=True)
    (run.attempt_dir(1) / "error.json").write_text(
        '{"type": "InternalError", "message": "an illegal memory access was encountered"}'
    )
    ops = FakeOps(run, [exits_after(1, 1), exits_after(1, 0)])
    runner = JobRunner(
        store, "j", spec, run, ops, _NullDisplay(), StopRequests(), jitter=lambda: 0.0, gpus=[0, 1]
    )
    assert runner.run_job() == JobState.SUCCEEDED
    assert [a.klass for a in store.attempts("j")] == [AttemptClass.GPU_FAULT, AttemptClass.SUCCEEDED]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in ops.envs] == ["0", "1"]


def test_nvml_names_the_sick_gpu_behind_a_bare_sigkill(tmp_path: Path) -> None:
    """The driver killed the worker without a word; NVML says GPU 1 has uncorrected ECC errors:
    gpu_fault, and only GPU 1 is excluded (GPU 0 was fine)."""
    store, run, spec = _gpu_setup(tmp_path, 2)
    ops = FakeOps(
        run,
        [exits_after(1, None, signal.SIGKILL), exits_after(1, 0)],
        sick_gpus={1: "uncorrected ECC errors: 2"},
    )
    runner = JobRunner(
        store, "j", spec, run, ops, _NullDisplay(), StopRequests(), jitter=lambda: 0.0, gpus=[0, 1, 2]
    )
    assert runner.run_job() == JobState.SUCCEEDED
    first, second = store.attempts("j")
    assert (first.klass, second.klass) == (AttemptClass.GPU_FAULT, AttemptClass.SUCCEEDED)
    assert "NVML: GPU 1: uncorrected ECC errors: 2" in (first.evidence or "")
    assert [e["CUDA_VISIBLE_DEVICES"] for e in ops.envs] == ["0,1", "0,2"]
    assert ops.gpu_queries == [[0, 1]]  # not asked after the clean exit


def test_more_gpus_than_exist_fails_clearly(tmp_path: Path) -> None:
    store, run, spec = _gpu_setup(tmp_path, 2)
    runner = JobRunner(store, "j", spec, run, FakeOps(run, []), _NullDisplay(), StopRequests(), gpus=[0])
    assert runner.run_job() == JobState.FAILED
    assert "resources.gpus=2" in (store.job("j").reason or "")
    assert store.attempts("j") == []


def crashes_at(step: int, heartbeat_step: int) -> Script:
    """A worker whose last polled heartbeat lags the step its error file reports."""

    def tick(ops: FakeOps, t: float) -> ExitStatus | None:
        if t < 1:
            hb = Heartbeat(
                pid=1,
                attempt=len(ops.envs),
                seq=int(t * 10) + 1,
                phase="training",
                time=t,
                step=heartbeat_step,
            )
            ops.run.heartbeat.write_bytes(hb.to_json())
            return None
        adir = ops.run.attempt_dir(len(ops.envs))
        adir.mkdir(parents=True, exist_ok=True)
        (adir / "error.json").write_text(f'{{"type": "RuntimeError", "message": "x", "step": {step}}}')
        return ExitStatus(1, None)

    return Script(tick)


def test_crash_loop_uses_the_step_from_the_error_file(tmp_path: Path) -> None:
    # Heartbeats polled at 27, 28, 29 would not look like a loop; the error file says 30 each time.
    scripts = [crashes_at(30, hb) for hb in (27, 28, 29, 26, 25)]
    runner, _, store = _runner(tmp_path, scripts, max_restarts=10)
    assert runner.run_job() == JobState.FAILED
    assert len(store.attempts("j")) == 3
    assert "crash loop" in (store.job("j").reason or "")
    assert [a.last_step for a in store.attempts("j")] == [30, 30, 30]


def test_kernel_oom_kill_evidence_makes_host_oom(tmp_path: Path) -> None:
    runner, ops, store = _runner(tmp_path, [exits_after(1, None, signal.SIGKILL), exits_after(1, 0)])
    ops.oom_evidence[1001] = "kernel OOM kill in cgroup /x (oom_kill=1)"
    assert runner.run_job() == JobState.SUCCEEDED
    first = store.attempts("j")[0]
    assert first.klass == AttemptClass.HOST_OOM and "oom_kill=1" in (first.evidence or "")


def test_bare_sigkill_is_killed_not_guessed(tmp_path: Path) -> None:
    runner, _ops, store = _runner(tmp_path, [exits_after(1, None, signal.SIGKILL), exits_after(1, 0)])
    assert runner.run_job() == JobState.SUCCEEDED
    assert store.attempts("j")[0].klass == AttemptClass.KILLED


def test_an_adopted_worker_is_watched_and_its_exit_code_file_read(tmp_path: Path) -> None:
    """A worker left by a previous daemon is not our child: its end has no status, its
    exit_code file has the code. Nothing is spawned for it; the next attempt is."""
    runner, ops, store = _runner(tmp_path, [exits_after(1, 0)])
    store.start_attempt("j", 555, 1.0)
    ops.live[555] = (exits_after(2, None), 0.0)  # ends without a status we could reap
    runner.run.attempt_dir(1).mkdir(parents=True)
    (runner.run.attempt_dir(1) / "exit_code").write_text("1")
    assert runner.run_job(Adopted(1, 555)) == JobState.SUCCEEDED
    first, second = store.attempts("j")
    assert (first.pid, first.klass, first.exit_code) == (555, AttemptClass.CRASH, 1)
    assert second.pid == 1001 and second.klass == AttemptClass.SUCCEEDED
    adopted = [e for e in runner.display.events if e["event"] == Event.WORKER_ADOPTED]  # type: ignore[attr-defined]
    assert adopted == [{"event": Event.WORKER_ADOPTED, "attempt": 1, "pid": 555}]

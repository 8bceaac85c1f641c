"""The runner and the memory tier, against the fake OS seam of test_supervisor_fake.py: the tier
goes when the job ends (and only then), each launch's memory.max leaves room for the tier, the
RSS watch counts the tier with the worker, measuring it every few seconds, and a failed removal
changes nothing of the job's end."""

from __future__ import annotations

import itertools
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ckptd.state.jobspec import JobSpec
from ckptd.state.protocol import Event
from ckptd.state.states import AttemptClass, JobState
from ckptd.state.store import Store
from ckptd.supervisor.process import ExitStatus
from ckptd.supervisor.runner import JobRunner, StopRequests
from ckptd.supervisor.tier import MEASURE_SECONDS

from .test_supervisor_fake import FakeOps, Script, _NullDisplay, _setup, exits_after

GiB, MiB = 1 << 30, 1 << 20


@dataclass
class FakeTier:
    """A tier whose size the test sets; counts its measures and removals."""

    size: int = 0
    fail: bool = False
    measures: list[float] = field(default_factory=list)
    removed: int = 0
    clock: FakeOps | None = None
    path: Path = Path("/dev/shm/ckptd-0/j")

    def bytes(self) -> int:
        self.measures.append(self.clock.now if self.clock else 0.0)
        return self.size

    def remove(self) -> None:
        if self.fail:
            raise OSError("Device or resource busy")
        self.removed += 1


@dataclass
class LimitOps(FakeOps):
    """FakeOps that also records each launch's memory limit (its cgroup's memory.max)."""

    limits: list[int | None] = field(default_factory=list)

    def spawn(self, *args: Any, **kwargs: Any) -> int:
        self.limits.append(kwargs.get("memory_limit"))  # the launcher passes it by name
        return super().spawn(*args, **kwargs)


def _runner(
    tmp_path: Path,
    scripts: list[Script],
    t: FakeTier | None,
    limit: int = 2 * GiB,
    stops: StopRequests | None = None,
) -> tuple[JobRunner, LimitOps, Store]:
    store, run, spec = _setup(tmp_path)
    spec = JobSpec.model_validate(
        spec.model_dump() | {"resources": spec.resources.model_dump() | {"memory_limit": limit}}
    )
    ops = LimitOps(run, scripts)
    if t is not None:
        t.clock = ops
    display = _NullDisplay()
    runner = JobRunner(store, "j", spec, run, ops, display, stops or StopRequests(), lambda: 0.0, tier=t)
    return runner, ops, store


def _stopped(cancel: bool) -> tuple[Script, StopRequests]:
    stops = StopRequests(cancel=cancel)

    def worker(ops: FakeOps, t: float) -> ExitStatus | None:
        if t > 1 and not stops.signals:
            stops.signals.append(signal.SIGTERM)
        return ExitStatus(75, None) if any(s == signal.SIGTERM for _, s in ops.sent) else None

    return Script(worker), stops


@pytest.mark.parametrize(
    ("end", "removed"),
    [(JobState.SUCCEEDED, 1), (JobState.FAILED, 1), (JobState.CANCELLED, 1), (JobState.INTERRUPTED, 0)],
)
def test_the_tier_goes_when_no_attempt_follows(tmp_path: Path, end: JobState, removed: int) -> None:
    stops = None
    if end == JobState.SUCCEEDED:
        scripts = [exits_after(1, 1), exits_after(1, 0)]  # a restart in between keeps it
    elif end == JobState.FAILED:
        scripts = [exits_after(1, 78)]  # a config error: never retried
    else:
        script, stops = _stopped(cancel=end == JobState.CANCELLED)
        scripts = [script]
    t = FakeTier(size=10 * MiB)
    runner, ops, _store = _runner(tmp_path, scripts, t, stops=stops)
    assert runner.run_job() == end
    assert t.removed == removed
    # The async saver's segment goes with it (a worker killed after its final commit leaves it).
    assert ops.segments_removed == [runner.run.checkpoint_dir(runner.spec.checkpoint.dir)] * removed


def test_a_job_without_a_tier_still_loses_its_segment_at_the_end(tmp_path: Path) -> None:
    runner, ops, _store = _runner(tmp_path, [exits_after(1, 0)], None)
    assert runner.run_job() == JobState.SUCCEEDED
    assert ops.segments_removed == [runner.run.checkpoint_dir(runner.spec.checkpoint.dir)]


def test_a_failed_removal_is_reported_and_the_job_still_succeeds(tmp_path: Path) -> None:
    t = FakeTier(fail=True)
    runner, _ops, store = _runner(tmp_path, [exits_after(1, 0)], t)
    assert runner.run_job() == JobState.SUCCEEDED
    assert store.job("j").state == JobState.SUCCEEDED
    failed = [e for e in runner.display.events if e["event"] == Event.MEMORY_TIER_REMOVE_FAILED]  # type: ignore[attr-defined]
    assert failed == [
        {"event": Event.MEMORY_TIER_REMOVE_FAILED, "tier": str(t.path), "error": "Device or resource busy"}
    ]


def test_each_launch_leaves_room_for_the_tier(tmp_path: Path) -> None:
    t = FakeTier(size=256 * MiB)

    def crash_after_snapshots(ops: FakeOps, elapsed: float) -> ExitStatus | None:
        if elapsed < 1:
            return None
        t.size = 1 * GiB  # attempt 1's snapshots outlive it
        return ExitStatus(1, None)

    runner, ops, _ = _runner(tmp_path, [Script(crash_after_snapshots), exits_after(1, 0)], t)
    assert runner.run_job() == JobState.SUCCEEDED
    assert ops.limits == [2 * GiB - 256 * MiB, 1 * GiB]


def test_without_a_tier_the_limit_is_the_jobs(tmp_path: Path) -> None:
    store, run, spec = _setup(tmp_path)
    ops = LimitOps(run, [exits_after(1, 0)])
    runner = JobRunner(store, "j", spec, run, ops, _NullDisplay(), StopRequests(), lambda: 0.0)
    assert runner.run_job() == JobState.SUCCEEDED
    assert ops.limits == [spec.resources.memory_limit]


def test_the_rss_watch_counts_the_tier_with_the_worker(tmp_path: Path) -> None:
    """1.5 GiB of worker fits a 2 GiB limit alone; with the tier's 1 GiB it does not."""
    t = FakeTier(size=0)
    ticks: list[float] = []

    def grows(ops: FakeOps, elapsed: float) -> ExitStatus | None:
        ticks.append(elapsed)
        t.size = 1 * GiB if elapsed > 20 else 0
        return None

    runner, ops, store = _runner(tmp_path, [Script(grows, rss=3 * GiB // 2), exits_after(1, 0)], t)
    assert runner.run_job() == JobState.SUCCEEDED
    first = store.attempts("j")[0]
    assert first.klass == AttemptClass.HOST_OOM
    assert f"{3 * GiB // 2} bytes + memory tier {GiB} bytes exceeded" in (first.evidence or "")
    # Killed within one measure of the tier's growth: not before it, not long after.
    assert 20 < ticks[-1] <= 20 + MEASURE_SECONDS + 0.5, ticks[-1]
    # The tier was walked every MEASURE_SECONDS while the worker ran, not at every poll.
    during = [m for m in t.measures if 0 < m <= ticks[-1]]  # attempt 1's watch
    gaps = [b - a for a, b in itertools.pairwise(during)]
    assert during and all(g >= MEASURE_SECONDS for g in gaps), t.measures
    polls = len([s for s in ops.sleeps if s > 0])
    assert len(t.measures) < polls / 10, (len(t.measures), polls)

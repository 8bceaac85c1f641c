"""The one watch loop of an attempt (ckptd.supervisor.attempt) against fake processes and a fake
clock: a single worker is watched by the same loop as a gang, only its hang verdict differs."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ckptd.state.jobspec import Restart
from ckptd.state.paths import RunDir
from ckptd.state.protocol import Event, Heartbeat, Phase
from ckptd.supervisor.attempt import (
    HANG_GRACE_SECONDS,
    IDLE_POLL_SECONDS,
    POLL_SECONDS,
    STOP_GRACE_SECONDS,
    AttemptWatch,
    LocalGroup,
    Member,
)
from ckptd.supervisor.process import ExitStatus

ATTEMPT = 3


@dataclass
class Proc:
    """A fake worker: beats every second while `beats`, exits at `exit_at`, or on `term` if set
    (a worker that saves and exits 75 when asked), or when killed."""

    run: RunDir
    beats: bool = True
    exit_at: float | None = None
    term: ExitStatus | None = None
    rss: int = 100
    stop_requested: int = 0


@dataclass
class FakeOps:
    procs: dict[int, Proc]
    now: float = 0.0
    sent: list[tuple[str, int, int]] = field(default_factory=list)
    sleeps: list[float] = field(default_factory=list)
    stopped_pids: set[int] = field(default_factory=set)
    enforced: bool = False

    def poll(self, pid: int) -> ExitStatus | None:
        proc = self.procs[pid]
        if ("group", pid, signal.SIGKILL) in self.sent:
            return ExitStatus(None, signal.SIGKILL)
        if proc.term is not None and ("group", pid, signal.SIGTERM) in self.sent:
            return proc.term
        if proc.exit_at is not None and self.now >= proc.exit_at:
            return ExitStatus(0, None)
        if proc.beats:
            hb = Heartbeat(pid=pid, attempt=ATTEMPT, seq=int(self.now), phase=Phase.TRAINING, time=self.now)
            hb.step, hb.stop_requested = int(self.now), proc.stop_requested
            proc.run.root.mkdir(parents=True, exist_ok=True)
            proc.run.heartbeat.write_bytes(hb.to_json())
        return None

    def signal_group(self, pid: int, sig: int) -> None:
        self.sent.append(("group", pid, sig))

    def signal_pid(self, pid: int, sig: int) -> None:
        self.sent.append(("pid", pid, sig))

    def stopped(self, pid: int) -> bool:
        return pid in self.stopped_pids

    def memory_enforced(self, pid: int) -> bool:
        return self.enforced

    def rss(self, pid: int) -> int | None:
        return self.procs[pid].rss

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Display:
    def __init__(self) -> None:
        self.events: list[dict[str, object]] = []
        self.beats = 0

    def heartbeat(self, hb: Heartbeat) -> None:
        self.beats += 1

    def event(self, ev: dict[str, object]) -> None:
        self.events.append(ev)

    def attempt_started(self, n: int, pid: int) -> None: ...
    def attempt_ended(self, n: int, klass: object, evidence: str) -> None: ...
    def restarting(self, delay: float, reason: str) -> None: ...


def _watch(
    tmp: Path, procs: list[Proc], stops: list[int] | None = None, memory_limit: int | None = None
) -> tuple[AttemptWatch, FakeOps, Display]:
    ops = FakeOps({100 + i: proc for i, proc in enumerate(procs)})
    members = [Member(i, 100 + i, RunDir(tmp).member(i), last_change=0.0) for i in range(len(procs))]
    display = Display()
    restart = Restart(heartbeat_timeout_seconds=4, startup_grace_seconds=6)
    asked = stops if stops is not None else []
    watch = AttemptWatch(
        ops,  # type: ignore[arg-type]
        restart,
        members,
        LocalGroup(ops, [m.pid for m in members]),  # type: ignore[arg-type]
        lambda: len(asked),
        ATTEMPT,
        display,
        solo=len(procs) == 1,
        memory_limit=memory_limit,
    )
    return watch, ops, display


def _member(tmp: Path, i: int, **kw: object) -> Proc:
    return Proc(RunDir(tmp).member(i), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("count", [1, 3])
def test_a_single_worker_and_a_gang_end_through_the_same_loop(tmp_path: Path, count: int) -> None:
    """Each member beats, then exits 0 of its own; the chief's heartbeats reach the display."""
    procs = [_member(tmp_path, i, exit_at=20.0 + i) for i in range(count)]
    watch, ops, display = _watch(tmp_path, procs)
    watch.run(lambda: None)
    assert [m.status for m in watch.members] == [ExitStatus(0, None)] * count
    assert [m.exit_order for m in watch.members] == list(range(count))
    assert watch.hang is None and ops.sent == []
    assert display.beats == 20  # the chief's, once a second
    assert watch.members[0].last_step == 19


@pytest.mark.parametrize(
    ("count", "stopped", "signals", "kill_after"),
    [
        # a lone worker: stacks, woken, asked to stop, killed after the hang grace
        (
            1,
            set(),
            [("pid", 100, signal.SIGUSR1), ("group", 100, signal.SIGCONT), ("group", 100, signal.SIGTERM)],
            HANG_GRACE_SECONDS,
        ),
        # a gang: every member's stacks, nobody woken, all killed once the stacks are written
        (2, set(), [("pid", 100, signal.SIGUSR1), ("pid", 101, signal.SIGUSR1)], 2.0),
        # a stopped member is left stopped (it would unblock the others) and named the root
        (2, {101}, [("pid", 100, signal.SIGUSR1)], 2.0),
    ],
)
def test_the_hang_verdict(
    tmp_path: Path, count: int, stopped: set[int], signals: list[tuple[str, int, int]], kill_after: float
) -> None:
    procs = [_member(tmp_path, i, beats=False) for i in range(count)]
    watch, ops, display = _watch(tmp_path, procs)
    ops.stopped_pids = stopped
    watch.run(lambda: None)
    verdict = [e for e in display.events if e["event"] == Event.HEARTBEAT_MISSED]
    assert len(verdict) == 1 and verdict[0]["phase"] == Phase.STARTING
    at = float(verdict[0]["silent_seconds"])  # type: ignore[arg-type]
    assert 6.0 <= at <= 6.0 + IDLE_POLL_SECONDS  # the start-up grace, not later
    kills = [s for s in ops.sent if s[2] == signal.SIGKILL]
    assert ops.sent[: len(signals)] == signals and len(kills) == count
    assert ops.now == pytest.approx(at + kill_after, abs=IDLE_POLL_SECONDS)
    assert watch.hang is not None and ("gang member" in watch.hang) == (count > 1)
    assert [m.stopped for m in watch.members] == [100 + i in stopped for i in range(count)]


def test_a_stop_asks_the_chief_then_kills_after_the_grace(tmp_path: Path) -> None:
    """The worker beats on and never exits: TERM at once, SIGKILL after STOP_GRACE_SECONDS."""
    stops = [signal.SIGTERM]
    watch, ops, _ = _watch(tmp_path, [_member(tmp_path, 0)], stops)
    watch.run(lambda: None)
    assert ops.sent == [("group", 100, signal.SIGTERM), ("group", 100, signal.SIGKILL)]
    assert ops.now == pytest.approx(STOP_GRACE_SECONDS, abs=4 * POLL_SECONDS)
    assert watch.hang is None  # a stopping worker is not judged hung


def test_asked_twice_kills_at_once(tmp_path: Path) -> None:
    stops: list[int] = []
    procs = [_member(tmp_path, i) for i in range(2)]
    watch, ops, _ = _watch(tmp_path, procs, stops)

    def observe() -> None:  # Ctrl-C at 1 s and again at 2 s
        if len(stops) < int(ops.now):
            stops.append(signal.SIGINT)

    watch.run(observe)
    assert ops.sent[0] == ("group", 100, signal.SIGTERM)
    assert sorted(ops.sent[1:]) == [("group", 100, signal.SIGKILL), ("group", 101, signal.SIGKILL)]
    assert ops.now < 2.5


def test_a_gang_is_ended_once_its_chief_has_saved_for_a_stop(tmp_path: Path) -> None:
    """The chief saves and exits 75; the other member, waiting in a collective, is killed a
    moment later, long before the stop grace."""
    procs = [_member(tmp_path, 0, term=ExitStatus(75, None)), _member(tmp_path, 1)]
    watch, ops, _ = _watch(tmp_path, procs, [signal.SIGTERM])
    watch.run(lambda: None)
    assert ops.sent == [("group", 100, signal.SIGTERM), ("group", 101, signal.SIGKILL)]
    assert watch.members[0].exit_order == 0 and watch.members[1].killed
    assert ops.now < 2.0


@pytest.mark.parametrize(("enforced", "killed"), [(False, True), (True, False)])
def test_the_memory_watch_kills_where_no_cgroup_enforces_the_limit(
    tmp_path: Path, enforced: bool, killed: bool
) -> None:
    watch, ops, _ = _watch(tmp_path, [_member(tmp_path, 0, rss=300, exit_at=3.0)], memory_limit=200)
    ops.enforced = enforced
    watch.run(lambda: None)
    assert (("group", 100, signal.SIGKILL) in ops.sent) is killed
    assert (watch.members[0].oom is not None) is killed
    if killed:
        assert "exceeded resources.memory_limit 200" in (watch.members[0].oom or "")


@pytest.mark.parametrize(("count", "noticed_by", "relayed"), [(2, 1, True), (1, 0, False), (2, 0, False)])
def test_only_a_members_stop_notice_is_relayed_to_the_chief(
    tmp_path: Path, count: int, noticed_by: int, relayed: bool
) -> None:
    """A member's preemption notice: the chief is asked to save, once. The chief's own notice
    is its own business (it already saves); relaying it would ask it twice."""
    procs = [_member(tmp_path, i, exit_at=5.0) for i in range(count)]
    procs[noticed_by].stop_requested = signal.SIGTERM
    watch, ops, _ = _watch(tmp_path, procs)
    watch.run(lambda: None)
    terms = [s for s in ops.sent if s[2] == signal.SIGTERM]
    assert terms == ([("group", 100, signal.SIGTERM)] if relayed else [])


def test_polls_often_only_while_a_reaction_is_due(tmp_path: Path) -> None:
    watch, ops, _ = _watch(tmp_path, [_member(tmp_path, 0, exit_at=30.0)])
    watch.run(lambda: None)
    early = [s for s, t in zip(ops.sleeps, _times(ops.sleeps), strict=True) if t < 5.0]
    late = [s for s, t in zip(ops.sleeps, _times(ops.sleeps), strict=True) if t >= 5.0]
    assert set(early) == {POLL_SECONDS} and set(late) == {IDLE_POLL_SECONDS}
    assert ops.now < 30.0 + IDLE_POLL_SECONDS + 1e-9  # the exit noticed within one idle poll


def _times(sleeps: list[float]) -> list[float]:
    """When each sleep began."""
    out, t = [], 0.0
    for s in sleeps:
        out.append(t)
        t += s
    return out

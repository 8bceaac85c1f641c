"""A gang's decisions (ckptd.supervisor.gang): which member's ending is the attempt's, what the
others are recorded as, what a member's error says. Pure functions, table-driven."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ckptd.state.jobspec import Restart
from ckptd.state.paths import RunDir
from ckptd.state.protocol import Heartbeat, Phase
from ckptd.state.states import AttemptClass as C
from ckptd.supervisor.attempt import AttemptWatch, Member
from ckptd.supervisor.gang import (
    MemberEnd,
    free_ports,
    gang_root,
    member_class,
    peer_error,
    tf_config,
)
from ckptd.supervisor.process import ExitStatus


@pytest.mark.parametrize(
    ("ends", "root"),
    [
        # member 1 SIGKILLed first; the chief failed after it, naming the aborted collective
        ([MemberEnd(0, 1, peer_error=True), MemberEnd(1, 0)], 1),
        # the chief noticed first, but only because member 1 was gone: still member 1
        ([MemberEnd(0, 0, peer_error=True), MemberEnd(1, 1)], 1),
        # member 1 crashed of its own; the chief was ended by the supervisor
        ([MemberEnd(0, None), MemberEnd(1, 0)], 1),
        # two own endings: the first
        ([MemberEnd(0, 1), MemberEnd(1, 0), MemberEnd(2, None)], 1),
        # every member blamed a peer: the first to go
        ([MemberEnd(0, 1, peer_error=True), MemberEnd(1, 0, peer_error=True)], 1),
        # a silent gang (all ended by the supervisor): the stopped member
        ([MemberEnd(0, None, last_step=30), MemberEnd(1, None, stopped=True, last_step=30)], 1),
        # none stopped: the one furthest behind
        ([MemberEnd(0, None, last_step=29), MemberEnd(1, None, last_step=30)], 0),
        # same step: the one silent longest
        (
            [
                MemberEnd(0, None, last_step=30, silent_seconds=9.0),
                MemberEnd(1, None, last_step=30, silent_seconds=9.5),
            ],
            1,
        ),
        # a member that never beat (no step) is behind every one that did
        ([MemberEnd(0, None, last_step=3), MemberEnd(1, None, last_step=None)], 1),
    ],
)
def test_gang_root(ends: list[MemberEnd], root: int) -> None:
    assert gang_root(ends) == root


@pytest.mark.parametrize(
    ("root", "index", "own", "recorded"),
    [
        (1, 1, C.KILLED, C.KILLED),  # the root keeps its class
        (1, 0, C.CRASH, C.PEER_LOST),  # the chief died of the aborted collective
        (1, 0, C.KILLED, C.PEER_LOST),  # or was ended by the supervisor
        (1, 0, C.SUCCEEDED, C.SUCCEEDED),  # finished before the peer went: a clean end stays one
        (0, 2, C.CONFIG_ERROR, C.CONFIG_ERROR),  # a configuration error is never a peer's fault
    ],
)
def test_member_class(root: int, index: int, own: C, recorded: C) -> None:
    assert member_class(root, index, own) is recorded


@pytest.mark.parametrize(
    ("etype", "message", "peer"),
    [
        (
            "tensorflow.python.framework.errors_impl.UnavailableError",
            "Collective ops is aborted by: ...",
            True,
        ),
        ("tensorflow.python.framework.errors_impl.DeadlineExceededError", "Collective ops timed out", True),
        ("RuntimeError", "injected fault at step 27", False),
        ("tensorflow.python.framework.errors_impl.InternalError", "CUDA_ERROR_ECC_UNCORRECTABLE", False),
        (None, None, False),
    ],
)
def test_peer_error(etype: str | None, message: str | None, peer: bool) -> None:
    assert peer_error(etype, message) is peer


def test_tf_config_and_ports() -> None:
    ports = free_ports(3)
    assert len(set(ports)) == 3
    hosts = [f"127.0.0.1:{p}" for p in ports]
    assert json.loads(tf_config(hosts, 2)) == {
        "cluster": {"worker": hosts},
        "task": {"type": "worker", "index": 2},
    }


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class _Launch:
    """Members that exit 0 at `end` seconds; records what the watch asked of them."""

    def __init__(self, clock: _Clock, count: int, end: float) -> None:
        self.clock, self.count, self.end = clock, count, end
        self.asked: list[str] = []
        self.done = False

    def ended(self) -> list[tuple[int, Any, bool]]:
        if self.done or self.clock.now < self.end:
            return []
        self.done = True
        return [(i, ExitStatus(0, None), True) for i in range(self.count)]

    def stop_chief(self) -> None:
        self.asked.append("stop")

    def dump_stacks(self, index: int) -> None:
        self.asked.append(f"stacks {index}")

    def stopped(self, index: int) -> bool:
        return False

    def kill(self, index: int) -> None:
        self.asked.append(f"kill {index}")


def test_the_previous_attempts_heartbeats_are_not_this_gangs(tmp_path: Path) -> None:
    """At a restart the members' heartbeat files still hold the last attempt's (phase training):
    taken as this gang's, a slow start (TensorFlow's import on a loaded box) would be a hang
    after heartbeat_timeout instead of startup_grace."""
    run = RunDir(tmp_path)
    for i in range(2):
        hb = Heartbeat(pid=1, attempt=1, seq=9, phase=Phase.TRAINING, time=0.0, step=27)
        run.member(i).root.mkdir(parents=True, exist_ok=True)
        run.member(i).heartbeat.write_bytes(hb.to_json())
    clock = _Clock()
    restart = Restart(heartbeat_timeout_seconds=4, startup_grace_seconds=300)
    members = [Member(i, 100 + i, run.member(i), last_change=0.0) for i in range(2)]
    launch = _Launch(clock, 2, end=60.0)  # a minute to start: within the start-up grace
    watch = AttemptWatch(clock, restart, members, launch, lambda: 0, 2)  # type: ignore[arg-type]
    watch.run(lambda: None)
    assert watch.hang is None and launch.asked == [], launch.asked
    assert [m.phase for m in members] == [Phase.STARTING, Phase.STARTING]


@pytest.mark.parametrize("member,relayed", [(1, ["stop"]), (None, [])])
def test_a_members_preemption_notice_is_relayed_to_the_chief_once(
    tmp_path: Path, member: int | None, relayed: list[str]
) -> None:
    """A SIGTERM that reached a member other than the chief (its node is being preempted): the
    chief saves for the gang, so the supervisor asks it, once, as for its own notice."""
    run = RunDir(tmp_path)
    for i in range(2):
        hb = Heartbeat(pid=1, attempt=2, seq=3, phase=Phase.TRAINING, time=0.0, step=5)
        hb.stop_requested = 15 if i == member else 0
        run.member(i).root.mkdir(parents=True, exist_ok=True)
        run.member(i).heartbeat.write_bytes(hb.to_json())
    clock = _Clock()
    members = [Member(i, 100 + i, run.member(i), last_change=0.0) for i in range(2)]
    launch = _Launch(clock, 2, end=3.0)
    watch = AttemptWatch(clock, Restart(), members, launch, lambda: 0, 2)  # type: ignore[arg-type]
    watch.run(lambda: None)
    assert launch.asked == relayed

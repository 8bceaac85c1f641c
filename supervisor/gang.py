"""A multi_worker job's attempt: a gang of member workers that train in step through
TensorFlow's collectives, supervised as one.

TensorFlow cannot re-admit one restarted member, so the unit of restart is the whole gang: the
first member to fail gives the attempt its class, the others died of the aborted collective
(`peer_lost`, which spends no restart budget: the gang's attempt is one attempt). A stuck
member freezes every other one inside a collective, so all heartbeats stop together; the root
cause is the member that is stopped, else the one with the lowest step, else the one silent
longest. Decisions here are pure functions; `GangWatch` only observes and acts.
"""

from __future__ import annotations

import json
import re
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ckptd.state import protocol as p
from ckptd.state.jobspec import Restart
from ckptd.state.paths import RunDir
from ckptd.state.states import AttemptClass
from ckptd.supervisor.policy import ExitObservation, classify_exit, silence_limit
from ckptd.supervisor.process import ExitStatus, ProcessOps

# What a member says when a peer is gone: the collective was aborted or timed out, or the
# coordination service lost a task. Such a member did not cause the attempt's end.
_PEER_ERROR = re.compile(
    r"Collective ops is aborted|collective.*(abort|cancel|timed out|timeout)|"
    r"UnavailableError|DeadlineExceeded|coordination service|heartbeat timeout|"
    r"failed to connect|Socket closed|Connection reset|peer",
    re.I,
)
DUMP_SECONDS = 2.0  # after SIGUSR1, time for every member's faulthandler to write its stacks
PEER_EXIT_SECONDS = 1.0  # after a member's error exit, the others may still exit of themselves


def peer_error(error_type: str | None, message: str | None) -> bool:
    return bool(_PEER_ERROR.search(f"{error_type or ''}: {message or ''}"))


@dataclass(frozen=True)
class MemberEnd:
    """What is known of one member when the gang's attempt is over."""

    index: int
    exit_order: int | None  # 0 for the first to exit on its own; None if the supervisor ended it
    peer_error: bool = False  # its error names a lost peer or an aborted collective
    stopped: bool = False  # SIGSTOPped (or traced) when the gang was found silent
    last_step: int | None = None
    silent_seconds: float = 0.0


def gang_root(ends: list[MemberEnd]) -> int:
    """The member whose ending is the attempt's: the first that ended of its own cause; if all
    were still there (a silent gang), the stopped one, the furthest behind, the silent longest."""
    own = [e for e in ends if e.exit_order is not None and not e.peer_error]
    if own:
        return min(own, key=lambda e: e.exit_order or 0).index
    exited = [e for e in ends if e.exit_order is not None]
    if exited and len(exited) == len(ends):  # every one blamed a peer: the first to go
        return min(exited, key=lambda e: e.exit_order or 0).index

    def behind(e: MemberEnd) -> tuple[int, int, float, int]:
        step = e.last_step if e.last_step is not None else -1
        return (0 if e.stopped else 1, step, -e.silent_seconds, e.index)

    return min(ends, key=behind).index


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` ports free right now on `host` (the local engine's cluster): bound together so that
    they differ, then released for TensorFlow's servers to take."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def tf_config(hosts: list[str], index: int) -> str:
    return json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}})


@dataclass
class Member:
    index: int
    pid: int
    run: RunDir
    last_change: float
    host: str = ""
    last_seq: int = -1
    phase: str = p.Phase.STARTING
    last_step: int | None = None
    status: ExitStatus | None = None
    exit_order: int | None = None
    silent: float = 0.0
    stopped: bool = False
    killed: bool = False  # by the supervisor, as the gang ended
    kill_sent: bool = False


class Launch(Protocol):
    """How the supervisor reaches a gang's members: each a local process (engine local), or
    tasks of one `srun` (engine slurm)."""

    def ended(self) -> list[tuple[int, ExitStatus, bool]]:
        """Members that ended since the last call: (index, status, of its own accord)."""
        ...

    def stop_chief(self) -> None: ...
    def dump_stacks(self, index: int) -> None: ...
    def stopped(self, index: int) -> bool: ...
    def kill(self, index: int) -> None: ...


@dataclass
class GangWatch:
    """Watches the members until all have ended; ends the gang when one of them does."""

    ops: ProcessOps
    restart: Restart
    members: list[Member]
    launch: Launch
    stop_requests: Callable[[], int]  # how many stop requests (signals) so far
    attempt: int  # heartbeats of earlier attempts (still in the files at start) are not news
    hang: str | None = None
    ended: int = 0
    _term_sent: bool = False
    _relayed: bool = False
    _kill_at: float | None = None
    _stops_seen: int = 0

    def run(self, observe: Callable[[], None], poll_seconds: float) -> None:
        while any(m.status is None for m in self.members):
            self._poll()
            self._heartbeats()
            observe()
            self._enforce()
            self.ops.sleep(poll_seconds)

    def _poll(self) -> None:
        for index, status, own in self.launch.ended():
            m = self.members[index]
            m.status = status
            if own and not m.killed:  # its error file says whether a peer's end caused it
                m.exit_order = self.ended
            self.ended += 1
        first = next((m for m in self.members if m.exit_order == 0), None)
        if first is not None and self._kill_at is None:
            # A clean end: the others finish their last step and exit too; any other end: the
            # rest are waiting in a collective that will never complete.
            # A member killed by a signal did not see a peer go first: the rest are ended at
            # once. One that exited with an error may have died of a peer that is still on its
            # way out: a moment for that one to say so itself (its error file names the cause).
            ended = first.status
            assert ended is not None
            if ended.exit_code == p.EXIT_OK:
                grace = self.restart.startup_grace_seconds
            else:
                grace = 0.0 if ended.signal is not None else PEER_EXIT_SECONDS
            self._kill_at = self.ops.monotonic() + grace

    def _heartbeats(self) -> None:
        now = self.ops.monotonic()
        for m in self.members:
            hb = p.Heartbeat.read(m.run.heartbeat, m.run.root)
            if hb is not None and hb.attempt == self.attempt and hb.seq != m.last_seq:
                m.last_seq, m.phase, m.last_change = hb.seq, hb.phase, now
                if hb.host and not m.host.startswith("127.0.0.1"):  # placed by Slurm: its node
                    m.host = hb.host
                m.last_step = hb.step if hb.step is not None else m.last_step
                if hb.stop_requested and not self._relayed:
                    # A preemption notice that reached a member only: the chief saves for the
                    # gang, as if it had been asked itself (restarted, not stopped).
                    self._relayed = True
                    self.launch.stop_chief()
            m.silent = now - m.last_change

    def _enforce(self) -> None:
        now = self.ops.monotonic()
        if self.stop_requests() > self._stops_seen:
            # The chief saves for the gang (no collective takes part); the others wait in
            # their next step and are ended once it has left. Asked twice: end them all now.
            self._stops_seen = self.stop_requests()
            if self._term_sent:
                self._kill_at = now
            self.launch.stop_chief()
            self._term_sent = True
        alive = [m for m in self.members if m.status is None]
        if self.hang is None and self._kill_at is None and alive:
            silent = [m for m in alive if m.silent > silence_limit(m.phase, self.restart)]
            if silent:
                self._declare_hang(silent, now)
        if self._kill_at is not None and now >= self._kill_at:
            for m in alive:
                m.killed = True
                if not m.kill_sent:
                    m.kill_sent = True
                    self.launch.kill(m.index)

    def _declare_hang(self, silent: list[Member], now: float) -> None:
        for m in self.members:
            m.stopped = m.status is None and self.launch.stopped(m.index)
        worst = max(silent, key=lambda m: m.silent)
        self.hang = (
            f"no progress heartbeat for {worst.silent:.1f}s from gang member {worst.index} in phase "
            f"{worst.phase} (last step {worst.last_step}); every member's Python stacks in its "
            "attempt's stderr.log"
        )
        for m in self.members:
            # faulthandler dumps every stack. Not SIGCONT to a stopped member: it would go on
            # and unblock the others, and the gang would train on after the verdict.
            if m.status is None and not m.stopped:
                self.launch.dump_stacks(m.index)
            m.killed = m.status is None  # whatever happens next, the supervisor ends it
        self._kill_at = now + DUMP_SECONDS

    def ends(self, peer_errors: dict[int, bool]) -> list[MemberEnd]:
        return [
            MemberEnd(
                m.index, m.exit_order, peer_errors.get(m.index, False), m.stopped, m.last_step, m.silent
            )
            for m in self.members
        ]


@dataclass
class LocalLaunch:
    """Engine local: one process (and process group) per member."""

    ops: ProcessOps
    pids: list[int]
    _done: set[int] = field(default_factory=set)

    def ended(self) -> list[tuple[int, ExitStatus, bool]]:
        out = []
        for i, pid in enumerate(self.pids):
            if i not in self._done and (status := self.ops.poll(pid)) is not None:
                self._done.add(i)
                out.append((i, status, True))
        return out

    def stop_chief(self) -> None:
        self.ops.signal_group(self.pids[0], signal.SIGTERM)

    def dump_stacks(self, index: int) -> None:
        self.ops.signal_pid(self.pids[index], signal.SIGUSR1)

    def stopped(self, index: int) -> bool:
        return self.ops.stopped(self.pids[index])

    def kill(self, index: int) -> None:
        self.ops.signal_group(self.pids[index], signal.SIGKILL)


def member_class(root: int, index: int, own: AttemptClass) -> AttemptClass:
    """A member's class in the gang's record: its own for the root cause and for a clean end,
    peer_lost for the members that died because the root did."""
    if index == root or own in (AttemptClass.SUCCEEDED, AttemptClass.CONFIG_ERROR):
        return own
    return AttemptClass.PEER_LOST


def spawn_local(
    ops: ProcessOps, run: RunDir, n: int, count: int, argv: list[str], gpus: list[int]
) -> tuple[list[Member], LocalLaunch]:
    """The local engine: `count` members of attempt `n` on 127.0.0.1, member 0 the chief, each
    with its own share of `gpus` (none: CPU only)."""
    hosts = [f"127.0.0.1:{port}" for port in free_ports(count)]
    per = len(gpus) // count
    members = []
    for i in range(count):
        env = {p.MEMBER_ENV: str(i), "TF_CONFIG": tf_config(hosts, i)}
        if per:
            env |= {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus[i * per : (i + 1) * per]))
        adir = run.member(i).attempt_dir(n)
        pid = ops.spawn(argv, run.root, adir / "stdout.log", adir / "stderr.log", env=env)
        members.append(Member(i, pid, run.member(i), last_change=ops.monotonic(), host=hosts[i]))
    return members, LocalLaunch(ops, [m.pid for m in members])


@dataclass(frozen=True)
class Verdict:
    root: int
    classes: dict[int, tuple[AttemptClass, str]]  # each member's class and evidence
    attempt: tuple[AttemptClass, str]  # the gang attempt's


def judge(watch: GangWatch, errors: dict[int, dict[str, Any]], n: int) -> Verdict:
    """Each member's class from what it left behind; the attempt's: the chief's if it finished
    (its final commit is durable), else the root cause's, named."""
    root = gang_root(watch.ends({i: peer_error(e.get("type"), e.get("message")) for i, e in errors.items()}))
    classes = {}
    for m in watch.members:
        assert m.status is not None
        last = p.Heartbeat.read(m.run.heartbeat, m.run.root)
        obs = ExitObservation(
            m.status.exit_code,
            m.status.signal,
            errors[m.index].get("type"),
            errors[m.index].get("message"),
            hang=watch.hang if m.index == root else None,
            finished=last is not None and last.attempt == n and last.phase == p.Phase.DONE,
        )
        klass, evidence = classify_exit(obs)
        classes[m.index] = (member_class(root, m.index, klass), evidence)
    if classes[0][0] == AttemptClass.SUCCEEDED or root == 0:
        return Verdict(root, classes, classes[0])
    klass, evidence = classes[root]
    return Verdict(root, classes, (klass, f"gang member {root}: {evidence}"))

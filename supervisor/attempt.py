"""The one watch loop of an attempt, over its group of workers: a single worker is a group of
one, a gang (`distribute: multi_worker`) a group of K members watched as one.

The loop owns what every attempt needs until all its workers have ended: their heartbeats, the
hang verdict, stop escalation (TERM, then KILL after a grace), ending the rest of a gang once
one member has ended, and the memory watch where no cgroup enforces `resources.memory_limit`.
It only observes and acts; what an end means is decided afterwards (policy.classify_exit,
gang.judge). How the workers are reached — local processes or the tasks of one `srun` — is the
`Group` it is given (ckptd.supervisor.launch, ckptd.supervisor.slurm).
"""

from __future__ import annotations

import math
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ckptd.state import protocol as p
from ckptd.state.jobspec import Restart
from ckptd.state.paths import RunDir
from ckptd.state.states import AttemptClass
from ckptd.supervisor.policy import silence_limit
from ckptd.supervisor.process import ExitStatus, ProcessOps

POLL_SECONDS = 0.05  # while a reaction is due soon: a stop or kill pending, a worker starting
IDLE_POLL_SECONDS = 0.25  # otherwise: heartbeats come every second or so, silence limits are long
FAST_START_SECONDS = 5.0  # a worker's first seconds: a config error exits at once, restart it soon
STOP_GRACE_SECONDS = 60.0  # a polite stop waits this long for the final save before SIGKILL
HANG_GRACE_SECONDS = 10.0  # a lone hung worker, woken and asked to stop, may still exit itself
DUMP_SECONDS = 2.0  # after SIGUSR1, time for every member's faulthandler to write its stacks
PEER_EXIT_SECONDS = 1.0  # after a member's error exit, the others may still exit of themselves


class Display(Protocol):
    def heartbeat(self, hb: p.Heartbeat) -> None: ...
    def event(self, ev: dict[str, Any]) -> None: ...
    def attempt_started(self, n: int, pid: int) -> None: ...
    def attempt_ended(self, n: int, klass: AttemptClass, evidence: str) -> None: ...
    def restarting(self, delay: float, reason: str) -> None: ...


@dataclass
class Member:
    """One worker of the attempt: the single worker, or gang member `index` (0 the chief)."""

    index: int
    pid: int
    run: RunDir
    last_change: float
    host: str = ""
    last_seq: int = -1
    phase: str = p.Phase.STARTING
    last_step: int | None = None
    restored_step: int | None = None
    memory_step: int | None = None  # its newest memory snapshot's step
    status: ExitStatus | None = None
    exit_order: int | None = None  # 0 for the first to exit on its own
    silent: float = 0.0
    stopped: bool = False  # SIGSTOPped (or traced) when the group was found silent
    killed: bool = False  # by the supervisor, as the attempt ended
    kill_sent: bool = False
    oom: str | None = None  # the memory watch's verdict


@dataclass
class Progress:
    """What attempt `n` achieved, for its record and for decide_restart."""

    n: int
    restored_step: int | None = None
    committed_step: int | None = None
    last_step: int | None = None
    memory_step: int | None = None  # its newest memory snapshot's step


class Group(Protocol):
    """How the supervisor reaches an attempt's workers: each a local process (a single worker,
    engine local), or tasks of one `srun` (engine slurm)."""

    def ended(self) -> list[tuple[int, ExitStatus, bool]]:
        """Members that ended since the last call: (index, status, of its own accord)."""
        ...

    def stop_chief(self) -> None: ...
    def dump_stacks(self, index: int) -> None: ...
    def stopped(self, index: int) -> bool: ...
    def kill(self, index: int) -> None: ...


@dataclass
class LocalGroup:
    """One local process (and process group) per member."""

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


@dataclass
class AttemptWatch:
    """Watches the members of attempt `attempt` until all have ended; ends the rest once one has.

    `solo`: a single worker. Its hang verdict wakes it (SIGCONT) and asks it to stop (SIGTERM)
    after the stack dump, and kills it only after HANG_GRACE_SECONDS; a gang's member is never
    woken (it would unblock the others, and the gang would train on after the verdict)."""

    ops: ProcessOps
    restart: Restart
    members: list[Member]
    group: Group
    stop_requests: Callable[[], int]  # how many stop requests (signals) so far
    attempt: int  # heartbeats of earlier attempts (still in the files at start) are not news
    display: Display | None = None
    solo: bool = False
    memory_limit: int | None = None  # watched by RSS where no cgroup enforces it
    tier_bytes: Callable[[], int] | None = None  # the job's memory tier: counted with the RSS
    hang: str | None = None
    ended: int = 0
    _term_sent: float | None = None
    _relayed: bool = False
    _first_seen: bool = False
    _kill_at: float | None = None
    _stops_seen: int = 0

    def run(self, observe: Callable[[], None]) -> None:
        started = self.ops.monotonic()
        while True:
            self._poll()
            if all(m.status is not None for m in self.members):
                return
            self._heartbeats()
            observe()
            self._memory()
            self._enforce()
            self.ops.sleep(self.interval(self.ops.monotonic() - started))

    def interval(self, elapsed: float) -> float:
        """Poll often only while a reaction is due soon; otherwise the daemon's CPU per live job
        is mostly this loop's."""
        pending = self._term_sent is not None or self._kill_at is not None
        return POLL_SECONDS if pending or elapsed < FAST_START_SECONDS else IDLE_POLL_SECONDS

    def _poll(self) -> None:
        for index, status, own in self.group.ended():
            m = self.members[index]
            m.status = status
            if own and not m.killed:  # its error file says whether a peer's end caused it
                m.exit_order = self.ended
            self.ended += 1
        first = next((m for m in self.members if m.exit_order == 0), None)
        if first is not None and not self._first_seen:
            # A clean end: the others finish their last step and exit too; any other end: the
            # rest are waiting in a collective that will never complete.
            # A member killed by a signal did not see a peer go first: the rest are ended at
            # once. One that exited with an error may have died of a peer that is still on its
            # way out: a moment for that one to say so itself (its error file names the cause).
            self._first_seen = True
            ended = first.status
            assert ended is not None
            if ended.exit_code == p.EXIT_OK:
                grace = self.restart.startup_grace_seconds
            else:
                grace = 0.0 if ended.signal is not None else PEER_EXIT_SECONDS
            self._kill_by(self.ops.monotonic() + grace)

    def _kill_by(self, when: float) -> None:
        self._kill_at = min(self._kill_at if self._kill_at is not None else math.inf, when)

    def _heartbeats(self) -> None:
        now = self.ops.monotonic()
        for m in self.members:
            hb = p.Heartbeat.read(m.run.heartbeat, m.run.root)
            if hb is not None and hb.attempt == self.attempt and hb.seq != m.last_seq:
                m.last_seq, m.phase, m.last_change = hb.seq, hb.phase, now
                if hb.host and not m.host.startswith("127.0.0.1"):  # placed by Slurm: its node
                    m.host = hb.host
                m.last_step = hb.step if hb.step is not None else m.last_step
                if hb.restored_step is not None:
                    m.restored_step = hb.restored_step
                if hb.memory_step is not None:
                    m.memory_step = hb.memory_step
                if m.index == 0 and self.display is not None:
                    self.display.heartbeat(hb)
                if hb.stop_requested and m.index != 0 and not self._relayed:
                    # A preemption notice that reached a member only: the chief saves for the
                    # gang, as if it had been asked itself (restarted, not stopped).
                    self._relayed = True
                    self.group.stop_chief()
            m.silent = now - m.last_change

    def _memory(self) -> None:
        limit = self.memory_limit
        for m in self.members:
            if not limit or m.status is not None or m.oom is not None or self.ops.memory_enforced(m.pid):
                continue
            rss = self.ops.rss(m.pid)
            if rss is None:
                continue
            # The tier's tmpfs pages outlive the worker but are the job's memory all the same.
            tier = self.tier_bytes() if self.tier_bytes is not None else 0
            if rss + tier > limit:
                used = f"anonymous memory (RssAnon+RssShmem) {rss} bytes"
                if tier:
                    used += f" + memory tier {tier} bytes"
                m.oom = f"{used} exceeded resources.memory_limit {limit}"
                m.kill_sent = True
                self.group.kill(m.index)

    def _enforce(self) -> None:
        now = self.ops.monotonic()
        if self.stop_requests() > self._stops_seen:
            # The chief saves (for the gang: no collective takes part; the others wait in their
            # next step and are ended once it has left). Asked twice: end them all now.
            self._stops_seen = self.stop_requests()
            if self._term_sent is None:
                self.group.stop_chief()
                self._term_sent = now
                self._kill_by(now + STOP_GRACE_SECONDS)
            else:
                self._kill_at = now
        alive = [m for m in self.members if m.status is None]
        if self.hang is None and self._kill_at is None and alive:
            silent = [m for m in alive if now - m.last_change > silence_limit(m.phase, self.restart)]
            if silent:
                self._declare_hang(silent, now)
        if self._kill_at is not None and now >= self._kill_at:
            for m in alive:
                m.killed = True
                if not m.kill_sent:
                    m.kill_sent = True
                    self.group.kill(m.index)

    def _declare_hang(self, silent: list[Member], now: float) -> None:
        for m in self.members:
            m.silent = now - m.last_change
            m.stopped = m.status is None and self.group.stopped(m.index)
        worst = max(silent, key=lambda m: m.silent)
        self.hang = self._hang_text(worst)
        self._missed(worst)
        for m in self.members:
            # faulthandler dumps every stack (a stopped lone worker's once it is woken).
            if m.status is None and (self.solo or not m.stopped):
                self.group.dump_stacks(m.index)
            m.killed = m.status is None  # whatever happens next, the supervisor ends it
        if self.solo:
            self.ops.signal_group(worst.pid, signal.SIGCONT)  # a stopped worker must see TERM
            self.ops.signal_group(worst.pid, signal.SIGTERM)
            self._term_sent = now
        self._kill_at = now + (HANG_GRACE_SECONDS if self.solo else DUMP_SECONDS)

    def _hang_text(self, worst: Member) -> str:
        silent = f"no progress heartbeat for {worst.silent:.1f}s"
        where = f"in phase {worst.phase} (last step {worst.last_step})"
        if self.solo:
            return f"{silent} {where}; Python stacks in {worst.run.attempt_dir(self.attempt) / 'stderr.log'}"
        stacks = "every member's Python stacks in its attempt's stderr.log"
        return f"{silent} from gang member {worst.index} {where}; {stacks}"

    def _missed(self, worst: Member) -> None:
        if self.display is None:
            return
        ev: dict[str, Any] = {"event": p.Event.HEARTBEAT_MISSED, "attempt": self.attempt, "pid": worst.pid}
        if not self.solo:
            ev["member"] = worst.index
        ev |= {"phase": worst.phase, "last_step": worst.last_step, "silent_seconds": round(worst.silent, 1)}
        self.display.event(ev)

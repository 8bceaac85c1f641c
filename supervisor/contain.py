"""Every process an attempt starts is the attempt's, and ends with it.

A worker's child that calls setsid() or double-forks leaves the worker's process group, and
killing the group no longer reaches it: it outlived `ckptd cancel` and the job, as its owner. As
Slurm's proctrack/cgroup does, each attempt gets a cgroup of its own, and at the attempt's end
(exit, cancel, stop, a daemon restart) everything in it is killed:

- cgroup v2 (a delegated unit's subtree, or the unified hierarchy of a hybrid host when we are
  root): `cgroup.kill` (Linux 5.14+), else freeze, SIGKILL each member, thaw, until empty;
- cgroup v1's freezer hierarchy (root on a v1 host): freeze, SIGKILL each member, thaw;
- neither (an ordinary user's `ckptd run` on a host that delegates nothing): the supervisor
  becomes a child subreaper, so orphaned descendants are re-parented to it rather than to init,
  and at the attempt's end it kills every process that was seen descending from the worker or
  that carries the attempt's token in its environment. Best effort: a process that forked away
  between two looks and cleared its environment escapes it, which the start-up event says.

The decision is `choose` (pure, table-tested); the rest is mechanism.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from ckptd.state.protocol import CGROUP_PREFIX
from ckptd.supervisor import cgroups

TOKEN_ENV = "CKPTD_ATTEMPT_TOKEN"
PREFIX = CGROUP_PREFIX
PR_SET_CHILD_SUBREAPER = 36
KILL_ROUNDS = 50


@dataclass(frozen=True)
class Choice:
    kind: str  # "cgroup-v2" | "cgroup-v1" | "subreaper"
    base: Path | None
    why: str


def choose(override: str | None, v2_base: Path | None, v1_freezer: Path | None) -> Choice:
    """Where attempts are contained, from what this host lets us create."""
    if override == "subreaper":
        return Choice("subreaper", None, "CKPTD_CONTAINMENT=subreaper")
    if v2_base is not None:
        return Choice("cgroup-v2", v2_base, f"each attempt gets a child cgroup of {v2_base}")
    if v1_freezer is not None:
        return Choice("cgroup-v1", v1_freezer, f"each attempt gets a freezer cgroup in {v1_freezer}")
    return Choice(
        "subreaper",
        None,
        "no cgroup this uid may create (not root, nothing delegated): the supervisor is a child "
        "subreaper and kills every descendant it saw or that carries the attempt's token; a "
        "process that escapes both between two looks is not contained",
    )


def _writable_dir(path: Path) -> Path | None:
    """`path` if a child cgroup can be made in it (tried, then removed)."""
    probe = path / f"{PREFIX}probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError:
        return None
    return path


def _v1_path(proc_cgroup: str, controller: str) -> str | None:
    for line in proc_cgroup.splitlines():
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        if controller in controllers.split(","):
            return path
    return None


def detect() -> Choice:
    override = os.environ.get("CKPTD_CONTAINMENT")
    if override == "subreaper":
        return choose(override, None, None)
    try:
        text = Path("/proc/self/cgroup").read_text()
    except OSError:
        return choose(None, None, None)
    v2, _ = cgroups._own_paths(text)
    v2_base = None
    if v2 is not None:
        limited = cgroups.parent_cgroup()  # a delegated unit: beside the supervisor's leaf
        candidates = [limited[0]] if limited and limited[1] == 2 else []
        candidates += [m / v2.lstrip("/") for m in (cgroups.ROOT, cgroups.ROOT / "unified")]
        v2_base = next((b for b in candidates if (b / "cgroup.procs").exists() and _writable_dir(b)), None)
    freezer = _v1_path(text, "freezer")
    v1_base = _writable_dir(cgroups.ROOT / "freezer" / freezer.lstrip("/")) if freezer is not None else None
    return choose(override, v2_base, v1_base)


@dataclass
class Tree:
    """One attempt's processes: its cgroup, or (subreaper) what was seen of its descendants."""

    root_pid: int
    token: str
    cgroup: Path | None = None
    version: int = 0
    seen: dict[int, float] = field(default_factory=dict)  # pid -> create_time

    def members(self) -> list[int]:
        if self.cgroup is not None:
            with contextlib.suppress(OSError, ValueError):
                return [int(p) for p in (self.cgroup / "cgroup.procs").read_text().split()]
            return []
        return [pid for pid, _ in self._alive_seen()] + list(self._token_holders())

    def known(self) -> list[int]:
        """The members known without a scan of every process (for the RSS watch)."""
        if self.cgroup is not None:
            return self.members()
        return [self.root_pid, *(pid for pid, _ in self._alive_seen())]

    def look(self) -> None:
        """Remember the worker's descendants now (the subreaper's only view of its tree)."""
        if self.cgroup is not None:
            return
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.root_pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    self.seen.setdefault(child.pid, child.create_time())

    def _alive_seen(self) -> Iterable[tuple[int, float]]:
        for pid, born in list(self.seen.items()):
            with contextlib.suppress(psutil.Error):
                if abs(psutil.Process(pid).create_time() - born) < 0.5:  # not a reused pid
                    yield pid, born

    def _token_holders(self) -> Iterable[int]:
        if not self.token:  # a warm worker's tree: started before its job had a token
            return
        me = os.getpid()
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if proc.pid != me and proc.environ().get(TOKEN_ENV) == self.token:
                    yield proc.pid

    def kill(self) -> int:
        """SIGKILL every member until none is left (bounded); how many were killed."""
        if self.cgroup is not None and (self.cgroup / "cgroup.kill").exists():
            before = len(self.members())
            with contextlib.suppress(OSError):
                (self.cgroup / "cgroup.kill").write_text("1\n")
                _wait_empty(self)
                return before
        killed = 0
        for _ in range(KILL_ROUNDS):
            pids = self.members()
            if not pids:
                break
            with self._frozen():
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
                        killed += 1
            _reap(pids)
            time.sleep(0.02)
        return killed

    @contextlib.contextmanager
    def _frozen(self):  # type: ignore[no-untyped-def]
        """No fork can race the kills while the cgroup is frozen (where it can be)."""
        knob = None
        if self.cgroup is not None:
            knob = (
                (self.cgroup / "cgroup.freeze", "1", "0")
                if self.version == 2
                else (self.cgroup / "freezer.state", "FROZEN", "THAWED")
            )
        with contextlib.suppress(OSError):
            if knob is not None:
                knob[0].write_text(knob[1])
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                if knob is not None:
                    knob[0].write_text(knob[2])  # SIGKILLed members die only once thawed

    def remove(self) -> None:
        if self.cgroup is not None:
            with contextlib.suppress(OSError):
                self.cgroup.rmdir()


def _wait_empty(tree: Tree, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while tree.members() and time.monotonic() < deadline:
        time.sleep(0.01)


def _reap(pids: Iterable[int]) -> None:
    """Orphans re-parented to us (a subreaper) become our zombies once killed: collect them.
    Only these pids: waitpid(-1) would steal the exit status of subprocess's own children."""
    me = os.getpid()
    for pid in pids:
        with contextlib.suppress(psutil.Error, ChildProcessError, OSError):
            if psutil.Process(pid).ppid() == me:
                os.waitpid(pid, os.WNOHANG)


def become_subreaper() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


class Containment:
    """Makes and ends attempts' trees the way `choice` says."""

    def __init__(self, choice: Choice | None = None) -> None:
        self.choice = choice or detect()
        if self.choice.kind == "subreaper":
            become_subreaper()

    def token(self) -> str:
        return uuid.uuid4().hex

    def start(self, pid: int, token: str, existing: Path | None = None) -> Tree:
        """Put the just-spawned worker `pid` in a tree of its own (its children follow it).
        `existing`: its cgroup v2 memory cgroup, which then holds the tree too (a process is in
        one v2 cgroup only)."""
        if existing is not None:
            return Tree(pid, token, existing, 2)
        tree = Tree(pid, token)
        if self.choice.base is None:
            return tree
        path = self.choice.base / cgroup_name(pid)
        try:
            path.mkdir(exist_ok=True)
            (path / "cgroup.procs").write_text(f"{pid}\n")
        except OSError:
            with contextlib.suppress(OSError):
                path.rmdir()
            return tree  # too late (it exited) or refused: its descendants are looked at instead
        tree.cgroup, tree.version = path, 2 if self.choice.kind == "cgroup-v2" else 1
        return tree

    def of(self, pid: int, started: float | None) -> Tree:
        """The tree of a worker an earlier supervisor started (found by its cgroup's name: the
        pid and its start time, so a reused pid never names another worker's)."""
        if self.choice.base is not None:
            for path in self.choice.base.glob(f"{PREFIX}{pid}-*"):
                with contextlib.suppress(ValueError):
                    born = int(path.name.rsplit("-", 1)[1])
                    if started is None or abs(born - started) <= 2:
                        return Tree(pid, "", path, 2 if self.choice.kind == "cgroup-v2" else 1)
        return Tree(pid, "")


def cgroup_name(pid: int) -> str:
    """`ckptd-attempt-PID-STARTTIME`: the memory cgroup and the containment cgroup share it."""
    try:
        born = int(psutil.Process(pid).create_time())
    except psutil.Error:
        born = 0
    return f"{PREFIX}{pid}-{born}"


_INSTANCE: Containment | None = None
_LOCK = threading.Lock()


def instance() -> Containment:
    """This process's containment, decided once (a subreaper stays one)."""
    global _INSTANCE
    with _LOCK:
        if _INSTANCE is None:
            _INSTANCE = Containment()
        return _INSTANCE

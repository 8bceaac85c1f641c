"""The one OS seam of the supervisor: start a worker, poll it, signal its process group.

Supervisor tests replace `ProcessOps` with a fake; everything else in the loop is plain logic.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil

from ckptd.state.paths import remove_segment
from ckptd.state.protocol import CONTAINED_ENV
from ckptd.state.submissions import Owner
from ckptd.supervisor import cgroups, contain, identity, kmsg, nvml, warm, zygote
from ckptd.supervisor.warm import WarmPool

# Never hand these to a worker: systemd's notify socket and watchdog belong to the daemon.
_STRIP_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


@dataclass(frozen=True)
class ExitStatus:
    exit_code: int | None
    signal: int | None


class ProcessOps(Protocol):
    def spawn(
        self,
        argv: list[str],
        cwd: Path,
        stdout: Path,
        stderr: Path,
        spare: bool = False,
        env: dict[str, str] | None = None,
        memory_limit: int | None = None,
    ) -> int: ...
    def assign(self, pid: int, attempt: int) -> bool: ...
    def take_warm(
        self, run_dir: Path, mode: str, env: dict[str, str], memory_limit: int | None = None
    ) -> int | None: ...
    def fork(
        self, run_dir: Path, mode: str, env: dict[str, str], memory_limit: int | None = None
    ) -> int | None: ...
    def memory_enforced(self, pid: int) -> bool: ...
    def memory_evidence(self, pid: int) -> str | None: ...
    def gpu_problems(self, devices: list[int]) -> dict[int, str]: ...
    def poll(self, pid: int) -> ExitStatus | None: ...
    def start_time(self, pid: int) -> float | None: ...
    def signal_group(self, pid: int, sig: int) -> None: ...
    def signal_pid(self, pid: int, sig: int) -> None: ...
    def rss(self, pid: int) -> int | None: ...  # what counts against memory_limit
    def stopped(self, pid: int) -> bool: ...  # SIGSTOPped or held by a tracer
    def remove_segment(self, checkpoint_dir: Path) -> bool: ...  # a killed worker's, at the end
    def monotonic(self) -> float: ...
    def sleep(self, seconds: float) -> None: ...


def worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _STRIP_ENV}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def worker_module() -> str:
    # CKPTD_WORKER_MODULE is a test seam: daemon tests run a protocol-speaking fake worker.
    return os.environ.get("CKPTD_WORKER_MODULE", "ckptd.worker")


def worker_argv(run_dir: Path, attempt: int | None) -> list[str]:
    """A worker for `attempt`, or a hot spare (None) that waits on stdin for its attempt."""
    return [
        sys.executable,
        "-m",
        worker_module(),
        str(run_dir),
        "--spare" if attempt is None else str(attempt),
    ]


class RealProcessOps:
    def __init__(
        self,
        warm: WarmPool | None = None,
        first: subprocess.Popen[bytes] | None = None,
        owner: Owner | None = None,
        launch_dir: Path | None = None,
    ) -> None:
        """`warm`: the daemon's pool of warm workers; `first`: one it set aside for this job.
        `owner`: whose rights workers run with (None: ours, as `ckptd run`); then `launch_dir`,
        the daemon's own directory for the job, takes what a worker prints before it opens its
        attempt's logs itself (an interpreter that fails to start)."""
        self.warm, self.first = warm, first
        self.owner = owner or identity.me()
        self.launch_dir = launch_dir
        self._procs: dict[int, subprocess.Popen[bytes] | zygote.Forked] = {}
        self._cgroups: dict[int, cgroups.MemoryCgroup] = {}
        self._oom: dict[int, str] = {}
        self._spawned_at: dict[int, float] = {}  # CLOCK_MONOTONIC, to match kernel-log records
        self._outer: dict[int, tuple[cgroups.MemoryCgroup, int]] = {}  # enclosing cgroup, oom_kill
        self._rss_base: dict[int, int] = {}  # a warm worker's RSS at hand-over (its import)
        self.containment = contain.instance()
        self._trees: dict[int, contain.Tree] = {}  # every process of the attempt (ckptd.supervisor.contain)
        self._tokens: dict[int, str] = {}
        self._zygote: zygote.Zygote | None = None  # the job's fork server, once started
        self._no_zygote = not zygote.wanted(worker_module())

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
        if self.launch_dir is not None:  # the run directory is the owner's: never open there
            stdout = stderr = self.launch_dir / "launch.log"
        stdout.parent.mkdir(parents=True, exist_ok=True)
        token, env = self._contained(env or {})
        with open(stdout, "ab") as out, open(stderr, "ab") as err:
            # Own session and process group: a terminal's Ctrl-C reaches only the supervisor,
            # which asks the worker to save; and killing the group leaves no orphan behind.
            try:
                proc = subprocess.Popen(
                    argv,
                    cwd=cwd,
                    stdin=subprocess.PIPE if spare else subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    env=worker_env() | identity.owner_env(self.owner) | (env or {}),
                    close_fds=True,
                    start_new_session=True,
                    **identity.popen_kwargs(self.owner),
                )
            except PermissionError as e:
                raise PermissionError(
                    e.errno,
                    f"cannot start the worker {argv[0]} as uid "
                    f"{self.owner.uid}: {e.strerror}; install ckptd where "
                    "every user can read and execute it",
                    e.filename,
                ) from e
        self._track(proc, memory_limit, token)
        return proc.pid

    def _contained(self, env: dict[str, str]) -> tuple[str, dict[str, str]]:
        """A new attempt's token, and `env` with it: the subreaper's mark on the tree, and (with
        cgroups) the word to wait until it is in its cgroup (see _track)."""
        token = self.containment.token()
        env = {**env, contain.TOKEN_ENV: token}
        if self.containment.choice.base is not None:
            env[CONTAINED_ENV] = "1"
        return token, env

    def fork(
        self, run_dir: Path, mode: str, env: dict[str, str], memory_limit: int | None = None
    ) -> int | None:
        """Attempt `mode`'s worker, forked by the job's fork server (ckptd.supervisor.zygote),
        started on first use; None if there is none (the caller then starts one cold)."""
        server = self._server(run_dir)
        if server is None:
            return None
        token, env = self._contained(env)
        pid = server.fork(run_dir, mode, env)
        if pid is None:  # it died: attempts start cold from now on
            self.close()
            self._no_zygote = True
            return None
        self._track(zygote.Forked(pid, server), memory_limit, token)
        if memory_limit and pid not in self._cgroups:  # the import is the zygote's, as a warm worker's
            self._rss_base[pid] = self._raw_rss(pid) or 0
        return pid

    def _server(self, run_dir: Path) -> zygote.Zygote | None:
        if self._zygote is None and not self._no_zygote:
            log = self.launch_dir / "launch.log" if self.launch_dir else run_dir / "attempts" / "zygote.log"
            env = worker_env() | identity.owner_env(self.owner)
            self._zygote = zygote.start(
                worker_module(), run_dir, log, env, **identity.popen_kwargs(self.owner)
            )
            self._no_zygote = self._zygote is None
        return self._zygote

    def close(self) -> None:
        """The job ended: its fork server goes (the workers it forked are gone or on their own)."""
        if self._zygote is not None:
            self._zygote.close()
            self._zygote = None

    def release_unused(self) -> None:
        """The warm worker set aside for this job was never used (it failed before starting)."""
        if self.first is not None:
            warm.kill(self.first, self.warm.dir_of(self.owner) if self.warm else None)
            self.first = None

    def _track(
        self, proc: subprocess.Popen[bytes] | zygote.Forked, memory_limit: int | None, token: str = ""
    ) -> None:
        self._procs[proc.pid] = proc
        self._spawned_at[proc.pid] = time.monotonic()
        outer = cgroups.enclosing()  # the worker's too, unless _limit moves it into its own
        if outer is not None:
            self._outer[proc.pid] = (outer, outer.oom_kills())
        if memory_limit:
            self._limit(proc.pid, memory_limit)
        cg = self._cgroups.get(proc.pid)
        self._trees[proc.pid] = self.containment.start(
            proc.pid, token, cg.path if cg is not None and cg.version == 2 else None
        )

    def end_tree(self, pid: int, started: float | None = None) -> int:
        """Kill whatever the attempt of `pid` left running (a setsid or double-forked child
        included) and remove its cgroup; how many were killed. For a worker this object did not
        start (adopted, or a lost supervisor's), its tree is found by pid and start time."""
        tree = self._trees.pop(pid, None) or self.containment.of(pid, started)
        killed = tree.kill()
        tree.remove()
        return killed

    def take_warm(
        self, run_dir: Path, mode: str, env: dict[str, str], memory_limit: int | None = None
    ) -> int | None:
        """Hand the run to a warm worker (None if there is none). The memory it charged while
        importing stays with the daemon's cgroup; the limit applies to what the job allocates."""
        proc, self.first = self.first or (self.warm.take(self.owner) if self.warm else None), None
        if proc is None or proc.stdin is None:
            return None
        self._track(proc, memory_limit)  # contained before it learns its job (and may fork)
        try:
            proc.stdin.write(warm.assignment(run_dir, mode, env, self.owner))
            proc.stdin.flush()
            if mode != "--spare":  # a job's spare waits for a second line: its attempt
                proc.stdin.close()
        except OSError:  # it died meanwhile
            proc.wait()
            self.poll(proc.pid)  # its tree and cgroups go with it
            return None
        if memory_limit and proc.pid not in self._cgroups:
            # The RSS watch counts what the job allocates, as a cgroup does: not the import
            # the warm worker made for nobody in particular.
            self._rss_base[proc.pid] = self._raw_rss(proc.pid) or 0
        return proc.pid

    def _limit(self, pid: int, limit: int) -> None:
        """Move the worker into its own memory cgroup; without one, the runner watches RSS.
        (Moved right after the fork: the interpreter has allocated little by then.)"""
        cg = cgroups.create(contain.cgroup_name(pid), limit)
        if cg is None:
            return
        try:
            cg.add(pid)
        except OSError:
            cg.remove()
            return
        self._cgroups[pid] = cg

    def memory_enforced(self, pid: int) -> bool:
        return pid in self._cgroups

    def memory_evidence(self, pid: int) -> str | None:
        """After exit: why the kernel killed it, if its cgroup recorded an OOM kill."""
        return self._oom.pop(pid, None)

    def gpu_problems(self, devices: list[int]) -> dict[int, str]:
        return nvml.device_problems(devices)

    def _release_cgroup(self, pid: int) -> None:
        cg = self._cgroups.pop(pid, None)
        if cg is None:
            return
        kills = cg.oom_kills()
        if kills:
            self._oom[pid] = (
                f"kernel OOM kill in cgroup {cg.path} (oom_kill={kills}, "
                f"limit {cg.limit} bytes = resources.memory_limit)"
            )
        cg.remove()

    def assign(self, pid: int, attempt: int) -> bool:
        """Hand attempt `attempt` to the hot spare `pid`; False if it is gone."""
        proc = self._procs.get(pid)
        if proc is None or proc.stdin is None or proc.poll() is not None:
            return False
        try:
            proc.stdin.write(f"{attempt}\n".encode())
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            return False
        return True

    def start_time(self, pid: int) -> float | None:
        try:
            return float(psutil.Process(pid).create_time())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return None

    def poll(self, pid: int) -> ExitStatus | None:
        proc = self._procs.get(pid)
        if proc is None:  # adopted after a daemon restart: not our child, no exit status
            try:
                alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                alive = False
            if not alive:
                self.end_tree(pid)
            return None if alive else ExitStatus(None, None)
        rc = proc.poll()
        if rc is None and isinstance(proc, zygote.Forked) and proc.lost():
            del self._procs[pid]  # its zygote died first: as for an adopted worker, no exit code
            self.end_tree(pid)
            self._release_cgroup(pid)
            return ExitStatus(None, None)
        if rc is None:
            if (tree := self._trees.get(pid)) is not None:
                tree.look()
            return None
        del self._procs[pid]
        self.signal_group(pid, signal.SIGKILL)  # reap anything the worker left in its group
        tree = self._trees.pop(pid, None)
        if tree is not None:
            tree.kill()  # a setsid or double-forked child too: the whole attempt ends with it
        self._release_cgroup(pid)  # its OOM evidence first, then the memory cgroup
        if tree is not None:
            tree.remove()
        self._rss_base.pop(pid, None)
        spawned_at, outer = self._spawned_at.pop(pid, 0.0), self._outer.pop(pid, None)
        if rc == -signal.SIGKILL and pid not in self._oom:
            evidence = kmsg.outside_oom_evidence(pid, spawned_at, outer)
            if evidence:
                self._oom[pid] = evidence
        return ExitStatus(rc, None) if rc >= 0 else ExitStatus(None, -rc)

    def signal_group(self, pid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)

    def signal_pid(self, pid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)

    def stopped(self, pid: int) -> bool:
        try:
            return psutil.Process(pid).status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return False

    def rss(self, pid: int) -> int | None:
        """The whole tree's, as a memory cgroup would count it: a child that forked away from
        the worker allocates against the job's limit too."""
        raw = self._raw_rss(pid)
        if raw is None:
            return None
        tree = self._trees.get(pid)
        if tree is not None:
            tree.look()
            raw += sum(self._raw_rss(m) or 0 for m in tree.known() if m != pid)
        return max(0, raw - self._rss_base.get(pid, 0))

    @staticmethod
    def _raw_rss(pid: int) -> int | None:
        """The worker's anonymous and shared-memory pages (RssAnon + RssShmem): what a memory
        cgroup would charge it. Not its mapped files (RssFile, ~0.4 GB of TensorFlow's shared
        libraries): those are page cache, charged once to whoever read them first, and
        counting them killed cold workers under limits their cgroup kept to."""
        try:
            fields = dict(
                line.split(":", 1)
                for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if ":" in line
            )
            return sum(int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssShmem"))
        except (OSError, KeyError, ValueError):
            pass
        try:
            info = psutil.Process(pid).memory_info()
            return int(info.rss - getattr(info, "shared", 0))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return None

    def remove_segment(self, checkpoint_dir: Path) -> bool:
        return remove_segment(checkpoint_dir, self.owner.uid)

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

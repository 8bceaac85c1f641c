"""The supervisor's end of a job's fork server (ckptd.worker.zygote has the protocol).

A single-worker job's attempts are forked from one process that imported TensorFlow once: a
restart then costs a fork, not a ~5 s import (~3 CPU-seconds and ~0.5 GB each time on a
2-core box). The forked worker is the zygote's child, so its exit code comes from the zygote
(`Forked.poll`); everything else — its cgroup, its process group, its containment, its RSS
watch — works on its pid as for a cold worker. If the zygote cannot start or dies, attempts
start cold again; a worker whose zygote died before reporting its end is treated like an
adopted one (no exit code: its own records say how it ended).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil


def wanted(module: str) -> bool:
    """Whether attempts fork from a job's fork server: not for a test's fake worker module, nor
    where an operator turned it off (CKPTD_ZYGOTE=0, or false/no/off: every attempt imports
    TensorFlow afresh)."""
    off = os.environ.get("CKPTD_ZYGOTE", "1").strip().lower() in ("0", "false", "no", "off")
    return module == "ckptd.worker" and not off


def start(module: str, run_dir: Path, log: Path, env: dict[str, str], **popen: Any) -> Zygote | None:
    """A fork server for `run_dir`'s attempts, ready; None if it cannot start (the cold start that
    follows then says why, e.g. an interpreter the job's owner may not run). With
    $CKPTD_FORK_SERVER, and no change of user to make, the shared one listening there."""
    shared = os.environ.get(SHARED_ENV)
    if shared and set(popen) == {"umask"}:  # its user is ours: it may fork our workers
        with contextlib.suppress(OSError, psutil.Error):
            server = SharedZygote.connect(Path(shared), env, popen["umask"])
            if server is not None:
                return server
    try:
        return Zygote.start([sys.executable, "-m", module, "--zygote"], run_dir, log, env, **popen)
    except OSError:
        return None


# A fork server shared by the supervisors of one user (ckptd.worker.zygote, --listen): the test
# suite's, so that each test does not pay an import its attempts then fork from.
SHARED_ENV = "CKPTD_FORK_SERVER"

# The import, on a loaded box: the default heartbeat timeout, within which a cold worker must
# show a first sign of life too (a zygote that hangs in its import is given up, and the attempt
# starts cold, where a hang is judged as usual).
READY_SECONDS = 120.0
FORK_SECONDS = 60.0


class Zygote:
    def __init__(self, proc: subprocess.Popen[bytes] | None) -> None:
        self.proc = proc
        if proc is not None:
            assert proc.stdout is not None
            self._out = proc.stdout.fileno()
            os.set_blocking(self._out, False)
        self._pending = b""
        self._messages: list[dict[str, Any]] = []
        self._exits: dict[int, int] = {}
        self._eof = False

    @classmethod
    def start(cls, argv: list[str], cwd: Path, log: Path, env: dict[str, str], **popen: Any) -> Zygote | None:
        """Start one and wait until it has imported TensorFlow; None if it fails to."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as err:
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
                close_fds=True,
                start_new_session=True,  # its own group: an attempt's kill never reaches it
                **popen,
            )
        zygote = cls(proc)
        if zygote._await("ready", READY_SECONDS) is None:
            zygote.close()
            return None
        return zygote

    def fork(self, run_dir: Path, mode: str, env: dict[str, str]) -> int | None:
        """The pid of a new worker for attempt `mode` with `env` added; None if the zygote is gone."""
        try:
            self._send((json.dumps(self._request(run_dir, mode, env)) + "\n").encode())
        except OSError:
            return None
        return self._await("forked", FORK_SECONDS)

    def _request(self, run_dir: Path, mode: str, env: dict[str, str]) -> dict[str, Any]:
        return {"run": str(run_dir), "mode": mode, "env": env}

    def _send(self, data: bytes) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def _read(self) -> bytes:
        return os.read(self._out, 65536)

    def returncode(self, pid: int) -> int | None:
        """A forked worker's exit code (subprocess's convention), once the zygote reported it."""
        self._pump(0)
        return self._exits.get(pid)

    def alive(self) -> bool:
        self._pump(0)
        return not self._eof and self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        """Kill it (only it: each worker it forked has a session of its own) and reap it."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if pipe is not None:
                    pipe.close()

    def _await(self, key: str, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while True:
            for i, message in enumerate(self._messages):
                if key in message:
                    del self._messages[i]
                    return int(message[key])
            left = deadline - time.monotonic()
            if self._eof or left <= 0:
                return None
            self._pump(min(left, 1.0))

    def _pump(self, wait: float) -> None:
        """Read what the zygote said (waiting up to `wait` seconds for something)."""
        if self._eof:
            return
        if wait > 0 and not select.select([self._out], [], [], wait)[0]:
            return
        while True:
            try:
                chunk = self._read()
            except BlockingIOError:
                break
            if not chunk:
                self._eof = True
                break
            self._pending += chunk
        while b"\n" in self._pending:
            line, self._pending = self._pending.split(b"\n", 1)
            message = json.loads(line)
            if "exited" in message:
                self._exits[int(message["exited"])] = int(message["code"])
            else:
                self._messages.append(message)


class SharedZygote(Zygote):
    """The shared fork server ($CKPTD_FORK_SERVER), spoken to over a connection of this job's:
    its requests carry the whole environment a job's own zygote would have been started with."""

    def __init__(self, sock: socket.socket, environ: dict[str, str], umask: int) -> None:
        super().__init__(None)
        self.sock, self.environ, self.umask = sock, environ, umask
        self._out = sock.fileno()

    @classmethod
    def connect(cls, path: Path, environ: dict[str, str], umask: int) -> SharedZygote | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(FORK_SECONDS)
            sock.connect(str(path))
            # No timeout from here: with one, Python waits it out where a MSG_DONTWAIT read of
            # an empty socket should raise BlockingIOError (reads follow a select anyway).
            sock.settimeout(None)
        except OSError:
            sock.close()
            raise
        zygote = cls(sock, environ, umask)
        pid = zygote._await("ready", FORK_SECONDS)
        if pid is None or not same_context(pid):
            zygote.close()
            return None
        return zygote

    def _request(self, run_dir: Path, mode: str, env: dict[str, str]) -> dict[str, Any]:
        return super()._request(run_dir, mode, env) | {"environ": self.environ, "umask": self.umask}

    def _send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read(self) -> bytes:
        return self.sock.recv(65536, socket.MSG_DONTWAIT)

    def alive(self) -> bool:
        self._pump(0)
        return not self._eof

    def close(self) -> None:
        """Hang up (the server lives on; the workers it forked for this job are on their own)."""
        self.sock.close()


NAMESPACES = ("mnt", "net", "pid", "ipc", "uts", "user", "cgroup")
RLIMITS = [getattr(resource, n) for n in dir(resource) if n.startswith("RLIMIT_")]


def same_context(pid: int) -> bool:
    """Whether a worker forked by `pid` runs where one forked by a zygote of ours would: the
    same user, namespaces (a test's private tmpfs is a mount namespace of its supervisor's),
    cgroup (an enclosing memory limit), resource limits and niceness."""
    me, other = psutil.Process(), psutil.Process(pid)
    if me.uids() != other.uids() or me.gids() != other.gids() or me.nice() != other.nice():
        return False
    for ns in NAMESPACES:
        if os.stat(f"/proc/self/ns/{ns}").st_ino != os.stat(f"/proc/{pid}/ns/{ns}").st_ino:
            return False
    if Path("/proc/self/cgroup").read_text() != Path(f"/proc/{pid}/cgroup").read_text():
        return False
    return all(me.rlimit(r) == other.rlimit(r) for r in RLIMITS)


class Forked:
    """A worker the zygote forked, watched as a subprocess.Popen is (pid, poll, no stdin)."""

    stdin = None

    def __init__(self, pid: int, zygote: Zygote) -> None:
        self.pid, self.zygote = pid, zygote

    def poll(self) -> int | None:
        return self.zygote.returncode(self.pid)

    def lost(self) -> bool:
        """Ended, or orphaned, with its zygote gone before it said how: no exit code will come."""
        if self.zygote.returncode(self.pid) is not None or self.zygote.alive():
            return False
        try:
            return psutil.Process(self.pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

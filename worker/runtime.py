"""Process plumbing of a worker: stop signals, the directory lock, heartbeats, the error file,
and how many threads TensorFlow may start."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Literal

from ckptd.state.durable import atomic_write_text, write_nondurable
from ckptd.state.jobspec import JobSpec
from ckptd.state.protocol import ERROR_FILE, Heartbeat, Phase
from ckptd.worker.errors import ConfigError, DirLocked


class StopFlag:
    """SIGTERM/SIGINT only record the request; the step loop saves at the next step boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> None:
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._record)

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None


@dataclass(frozen=True)
class ThreadPlan:
    """TensorFlow's thread pools for one worker. Left alone, each member of a gang on one host
    sizes every pool to the whole box and its gRPC client keeps 64 completion queues with a
    polling thread each (TF_GRPC_WORKER_CACHE_QUEUES): ~110 threads per member, most idle."""

    intra_op: int
    inter_op: int
    grpc_queues: int  # TF_GRPC_WORKER_CACHE_QUEUES: one polling thread each
    grpc_threads: int  # TF_GRPC_WORKER_CACHE_THREADS: the pool that runs their callbacks


def members_here(spec: JobSpec) -> int:
    """Workers of this job sharing this host's CPUs. Under Slurm each task's CPU affinity is
    already its own share, so it counts as one."""
    d = spec.distribute
    if d.is_gang and not d.on_slurm:
        return d.members
    return 1


def thread_plan(setting: int | Literal["auto"], cpus: int, members: int) -> ThreadPlan:
    """`resources.threads`: a number as given, or `auto`, this worker's CPU share (at least 1)."""
    n = setting if isinstance(setting, int) else max(1, cpus // max(1, members))
    return ThreadPlan(intra_op=n, inter_op=n, grpc_queues=n, grpc_threads=n)


def output_dir(directory: Path, field: str) -> None:
    """Create an output directory with the job owner's rights (the worker's); a refusal is the
    job's configuration, not a crash to retry."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(directory))
    except OSError as e:
        hint = (
            " (read-only for jobs here: under the systemd unit, ProtectSystem=strict and "
            "ProtectHome=read-only leave only /var/lib/ckptd writable; an operator can add "
            "ReadWritePaths= in a drop-in)"
            if e.errno == errno.EROFS
            else ""
        )
        raise ConfigError(
            f"{field}: cannot create or write {directory}: {e.strerror}{hint} (the "
            f"job runs as uid {os.geteuid()}); choose a directory it can write"
        ) from e


def log_to(directory: Path) -> None:
    """From now on, stdout and stderr go to `directory`'s log files, opened with the worker's own
    rights (a daemon never opens files in a job owner's run directory for it)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, fd in (("stdout.log", 1), ("stderr.log", 2)):
        with contextlib.suppress(ValueError, OSError):
            sys.stdout.flush()
            sys.stderr.flush()
        target = os.open(
            directory / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640
        )
        os.dup2(target, fd)
        os.close(target)


def lock_dir(directory: Path) -> int:
    """Take the exclusive single-writer lock of a checkpoint directory; held until exit."""
    output_dir(directory, "checkpoint.dir")
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        os.close(fd)
        raise DirLocked(
            f"{directory} is in use by another ckptd worker (only one writer per "
            "checkpoint directory); stop it or give this job another checkpoint.dir"
        ) from e
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


EXPECT_FLOOR = 5.0  # seconds: below this, silence is scheduling noise on a loaded box


class Beater:
    """Writes the heartbeat file from the training loop, at most every `interval` seconds
    (phase changes always go out at once)."""

    def __init__(self, path: Path, attempt: int, interval: float = 0.25) -> None:
        self.path, self.interval = path, interval
        self.hb = Heartbeat(
            pid=os.getpid(),
            attempt=attempt,
            seq=0,
            phase=Phase.STARTING,
            time=time.time(),
            host=socket.gethostname(),
        )
        self._last = 0.0
        self._call = 0.0  # the previous beat() of this phase (written or not)
        self._gap: float | None = None  # its recent gaps, smoothed

    def beat(self, phase: str | None = None, force: bool = False, **fields: Any) -> None:
        for k, v in fields.items():
            setattr(self.hb, k, v)
        now = time.monotonic()
        changed = phase is not None and phase != self.hb.phase
        self._expect(now, changed)
        if phase is not None:
            self.hb.phase = phase
        if not (force or changed or now - self._last >= self.interval):
            return
        self._last = now
        self.hb.seq += 1
        self.hb.time = time.time()
        self.hb.rss_bytes = _rss()
        try:
            write_nondurable(self.path, self.hb.to_json())
        except OSError:  # a full disk: the next beat tries again (a long outage reads as a hang)
            self._last = 0.0

    def _expect(self, now: float, changed: bool) -> None:
        """What is normal for this phase: 10x the smoothed gap between its beats (steps, batches)."""
        if changed:
            self._gap = None
        elif self._call:
            gap = now - self._call
            self._gap = gap if self._gap is None else 0.8 * self._gap + 0.2 * gap
        self._call = now
        self.hb.expect_seconds = None if self._gap is None else round(max(EXPECT_FLOOR, 10 * self._gap), 3)


def write_error_file(attempt_dir: Path, exc: BaseException, **context: Any) -> None:
    """torchelastic-style error record: the supervisor shows it instead of a bare exit code."""
    record = {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
        "time": time.time(),
        "pid": os.getpid(),
        **context,
    }
    # A full disk must not hide the original error: it is on stderr too.
    with contextlib.suppress(OSError):
        atomic_write_text(attempt_dir / ERROR_FILE, json.dumps(record, indent=1, default=str))

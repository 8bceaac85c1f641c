"""Warm workers: one idle process per free daemon slot, TensorFlow already imported.

A job that starts in a free slot, or a job whose worker failed, takes one instead of paying the
~5 s import (`python -m ckptd.worker --warm` waits for one JSON line naming the run directory,
the mode — an attempt number or `--spare` — and the environment to add: the GPU assignment,
which CUDA reads only when TensorFlow first touches a device). A job's own hot spare
(`restart.hot_spare`) goes further: it has the model built and primed too.

The pool belongs to the daemon; its main loop sizes it, job threads take from it (under a lock).
A warm worker whose daemon dies sees EOF on stdin and exits: no orphan.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from structlog.typing import FilteringBoundLogger

from ckptd.state.submissions import Owner

WARM_DIR = "warm"


def warm_argv() -> list[str]:
    from ckptd.supervisor.process import worker_module

    return [sys.executable, "-m", worker_module(), "--warm"]


def assignment(run_dir: Path, mode: str, env: dict[str, str], owner: Owner | None = None) -> bytes:
    """The one line a warm worker waits for; with `owner`, it becomes that user first."""
    from ckptd.supervisor.identity import owner_to_json

    return (
        json.dumps(
            {"run": str(run_dir), "mode": mode, "env": env, "owner": owner_to_json(owner) if owner else None}
        )
        + "\n"
    ).encode()


class WarmPool:
    def __init__(self, state_dir: Path, log: FilteringBoundLogger) -> None:
        self.dir = state_dir / WARM_DIR
        self.log = log
        self._lock = threading.Lock()
        self._procs: list[subprocess.Popen[bytes]] = []

    def size(self) -> int:
        with self._lock:
            return len(self._procs)

    def take(self) -> subprocess.Popen[bytes] | None:
        """A live warm worker, now the caller's to assign (and to reap)."""
        with self._lock:
            while self._procs:
                proc = self._procs.pop(0)
                if proc.poll() is None:
                    return proc
        return None

    def reconcile(self, wanted: int) -> None:
        """Called by the daemon's loop: reap dead ones, start or stop to have `wanted`."""
        with self._lock:
            self._procs = [p for p in self._procs if p.poll() is None]
            while len(self._procs) > wanted:
                kill(self._procs.pop(), self.dir)
            while len(self._procs) < wanted:
                proc = self._spawn()
                if proc is None:
                    return
                self._procs.append(proc)
                self.log.info("warm.started", pid=proc.pid)

    def stop(self) -> None:
        with self._lock:
            for proc in self._procs:
                kill(proc, self.dir)
            self._procs = []

    def _spawn(self) -> subprocess.Popen[bytes] | None:
        from ckptd.supervisor.process import worker_env

        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(self.dir / "output.log", "ab") as out:
                return subprocess.Popen(
                    warm_argv(),
                    cwd=self.dir,
                    stdin=subprocess.PIPE,
                    stdout=out,
                    stderr=out,
                    env=worker_env(),
                    close_fds=True,
                    start_new_session=True,
                )
        except OSError as e:  # a full disk or no memory: run without warm workers this time
            self.log.error("warm.spawn_failed", error=f"{type(e).__name__}: {e}")
            return None


def kill(proc: subprocess.Popen[bytes], directory: Path | None = None) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: anything it started goes too
    proc.wait()
    if directory is not None:
        (directory / f"{proc.pid}.ready").unlink(missing_ok=True)

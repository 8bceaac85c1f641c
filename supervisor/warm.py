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
    """Warm workers, each started as the user whose job will take it (never with the daemon's
    identity and capabilities while it waits): `take(owner)` gives one of that owner's."""

    def __init__(self, state_dir: Path, log: FilteringBoundLogger) -> None:
        self.dir = state_dir / WARM_DIR
        self.log = log
        self._lock = threading.Lock()
        self._procs: list[tuple[Owner, subprocess.Popen[bytes]]] = []

    def size(self) -> int:
        with self._lock:
            return len(self._procs)

    def take(self, owner: Owner) -> subprocess.Popen[bytes] | None:
        """A live warm worker of `owner`, now the caller's to assign (and to reap)."""
        with self._lock:
            for i, (who, proc) in enumerate(self._procs):
                if who == owner and proc.poll() is None:
                    del self._procs[i]
                    return proc
        return None

    def reconcile(self, wanted: list[Owner]) -> None:
        """Called by the daemon's loop: reap dead ones, start or stop to have `wanted` (one
        warm worker per entry, as that owner)."""
        with self._lock:
            self._procs = [(w, p) for w, p in self._procs if p.poll() is None]
            need = list(wanted)
            keep = []
            for who, proc in self._procs:
                if who in need:
                    need.remove(who)
                    keep.append((who, proc))
                else:
                    kill(proc, self.dir_of(who))
            self._procs = keep
            for who in need:
                started = self._spawn(who)
                if started is None:
                    return
                self._procs.append((who, started))
                self.log.info("warm.started", pid=started.pid, uid=who.uid)

    def stop(self) -> None:
        with self._lock:
            for who, proc in self._procs:
                kill(proc, self.dir_of(who))
            self._procs = []

    def dir_of(self, owner: Owner) -> Path:
        return self.dir / str(owner.uid)

    def _spawn(self, owner: Owner) -> subprocess.Popen[bytes] | None:
        from ckptd.supervisor import identity
        from ckptd.supervisor.process import worker_env

        where = self.dir_of(owner)
        try:
            where.mkdir(parents=True, exist_ok=True)
            if identity.needs_switch(owner):  # its ready marker is its own to write
                os.chown(where, owner.uid, owner.gid)
            with open(where / "output.log", "ab") as out:
                return subprocess.Popen(
                    warm_argv(),
                    cwd=where,
                    stdin=subprocess.PIPE,
                    stdout=out,
                    stderr=out,
                    env=worker_env() | identity.owner_env(owner),
                    close_fds=True,
                    start_new_session=True,
                    **identity.popen_kwargs(owner),
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

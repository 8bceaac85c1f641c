"""A job's fork server: `python -m ckptd.worker --zygote` imports TensorFlow once, then forks
each attempt's worker on request, so a restart costs a fork instead of a ~5 s, ~3 CPU-second
import (ckptd.supervisor.zygote is the other end).

The protocol is one JSON object per line. The supervisor writes `{"run", "mode", "env"}` on
stdin; the zygote answers `{"ready": pid}` once, then `{"forked": pid}` per request and
`{"exited": pid, "code": returncode}` when a child ends (a negative code is a signal, as in
subprocess). EOF on stdin (the supervisor is gone) ends the zygote; its children live on, as a
cold worker would.

The zygote only imports: nothing initialises TensorFlow's runtime (devices, thread pools)
before the fork, so each child starts as a cold worker would, and reads its own environment
(CUDA_VISIBLE_DEVICES, the attempt's token) when it first uses it. The import leaves one native
thread of TensorFlow's, idle on a condition variable (so holding no lock) — the state in which
every worker already forks its async writer (ckptd.worker.checkpoint.writer).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
from typing import Any

STDIN, STDOUT = 0, 1


def serve() -> tuple[str, str] | None:
    """The zygote's loop. In a forked child it returns the (run directory, attempt) the child is
    to work on, with the child detached from the zygote; in the zygote, None once the supervisor
    is gone."""
    import tensorflow  # noqa: F401  (and Keras with it: the import each attempt would pay)

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)  # SIGCHLD wakes the select below
    signal.signal(signal.SIGCHLD, lambda *_: None)
    _say({"ready": os.getpid()})
    pending = b""
    while True:
        readable, _, _ = select.select([STDIN, wake_r], [], [])
        if wake_r in readable:
            os.read(wake_r, 4096)
        _reap()
        if STDIN not in readable:
            continue
        chunk = os.read(STDIN, 65536)
        if not chunk:
            return None
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                _detach(request, (wake_r, wake_w))
                return request["run"], request["mode"]
            _say({"forked": pid})


def _reap() -> None:
    """Report every child that ended: the supervisor cannot wait for a grandchild itself."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _say({"exited": pid, "code": os.waitstatus_to_exitcode(status)})


def _detach(request: dict[str, Any], wake: tuple[int, int]) -> None:
    """In the child: what a cold start gives a worker — its own session and process group, no
    stdin, the attempt's environment, the run directory as its working directory (by which a
    restarted daemon recognises it, as a warm worker's). Its logs open in ckptd.worker.main."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for fd in wake:
        os.close(fd)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (STDIN, STDOUT):  # the zygote's pipes: the child must not hold them open
        os.dup2(devnull, fd)
    os.close(devnull)
    os.environ.update(request["env"])
    os.chdir(request["run"])


def _say(message: dict[str, Any]) -> None:
    data = (json.dumps(message) + "\n").encode()
    with contextlib.suppress(BrokenPipeError):
        while data:
            data = data[os.write(STDOUT, data) :]

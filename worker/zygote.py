"""A job's fork server: `python -m ckptd.worker --zygote` imports TensorFlow once, then forks
each attempt's worker on request, so a restart costs a fork instead of a ~5 s, ~3 CPU-second
import (ckptd.supervisor.zygote is the other end).

The protocol is one JSON object per line. The supervisor writes `{"run", "mode", "env"}` on
stdin; the zygote answers `{"ready": pid}` once, then `{"forked": pid}` per request and
`{"exited": pid, "code": returncode}` when a child ends (a negative code is a signal, as in
subprocess). EOF on stdin (the supervisor is gone) ends the zygote; its children live on, as a
cold worker would.

`--zygote --listen SOCKET` is one fork server shared by many supervisors of one user (the test
suite's, $CKPTD_FORK_SERVER): each connection speaks the same protocol, and its requests carry
the whole environment (`environ`) and `umask` the supervisor would have started its own zygote
with. EOF on stdin ends it; a connection's EOF only forgets that supervisor's children.

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
import socket
from typing import Any

STDIN, STDOUT = 0, 1


class _Peer:
    """One supervisor: where its requests come from and its answers go."""

    def __init__(self, rfd: int, wfd: int, sock: socket.socket | None = None) -> None:
        self.rfd, self.wfd, self.sock = rfd, wfd, sock
        self.pending = b""

    def say(self, message: dict[str, Any]) -> None:
        data = (json.dumps(message) + "\n").encode()
        with contextlib.suppress(OSError):  # a supervisor gone: nobody to tell
            while data:
                data = data[os.write(self.wfd, data) :]

    def requests(self, chunk: bytes) -> list[dict[str, Any]]:
        self.pending += chunk
        lines = self.pending.split(b"\n")
        self.pending = lines.pop()
        return [json.loads(line) for line in lines if line.strip()]


class ListenError(Exception):
    """`--listen SOCKET` cannot bind there: one line for its caller, not a traceback."""


class _Server:
    def __init__(self, listen: str | None) -> None:
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)  # SIGCHLD wakes the select below
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.listener: socket.socket | None = None
        self.peers: dict[int, _Peer] = {}
        self.owners: dict[int, _Peer] = {}  # a forked child: whom to tell of its end
        if listen is None:
            self.peers[STDIN] = _Peer(STDIN, STDOUT)
        else:
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.listener.bind(listen)
            except OSError as e:
                self.listener.close()
                raise ListenError(
                    f"--listen {listen}: {e.strerror}; remove a stale socket there or choose another path"
                ) from None
            self.listener.listen(64)

    def run(self) -> tuple[str, str] | None:
        _Peer(STDIN, STDOUT).say({"ready": os.getpid()})
        while True:
            watched = [self.wake_r, *self.peers]
            if self.listener is not None:
                watched += [self.listener.fileno(), STDIN]
            readable = select.select(watched, [], [])[0]
            if self.wake_r in readable:
                os.read(self.wake_r, 4096)
            self._reap()
            if self.listener is not None and self.listener.fileno() in readable:
                self._accept(self.listener)
            if self.listener is not None and STDIN in readable and not os.read(STDIN, 4096):
                return None  # whoever started the shared server is gone
            for fd in [fd for fd in readable if fd in self.peers]:
                work = self._serve(self.peers[fd])
                if work is not None or (self.listener is None and not self.peers):
                    return work

    def _accept(self, listener: socket.socket) -> None:
        conn, _ = listener.accept()
        peer = _Peer(conn.fileno(), conn.fileno(), conn)
        self.peers[conn.fileno()] = peer
        peer.say({"ready": os.getpid()})

    def _serve(self, peer: _Peer) -> tuple[str, str] | None:
        """Fork what `peer` asked for. In the child: the work; here, None (and, at the peer's
        EOF, the peer forgotten: the zygote of a job ends with it)."""
        chunk = os.read(peer.rfd, 65536)
        if not chunk:
            del self.peers[peer.rfd]
            if peer.sock is not None:
                peer.sock.close()
            return None
        for request in peer.requests(chunk):
            pid = os.fork()
            if pid == 0:
                self._detach(request)
                return request["run"], request["mode"]
            self.owners[pid] = peer
            peer.say({"forked": pid})
        return None

    def _reap(self) -> None:
        """Report every child that ended: the supervisor cannot wait for a grandchild itself."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            peer = self.owners.pop(pid, None)
            if peer is not None and self.peers.get(peer.rfd) is peer:
                peer.say({"exited": pid, "code": os.waitstatus_to_exitcode(status)})

    def _detach(self, request: dict[str, Any]) -> None:
        """In the child: what a cold start gives a worker — its own session and process group,
        no stdin, the attempt's environment, the run directory as its working directory (by
        which a restarted daemon recognises it, as a warm worker's). Its logs open in
        ckptd.worker.main."""
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in (self.wake_r, self.wake_w):
            os.close(fd)
        for peer in self.peers.values():  # the zygote's pipes and sockets are not the child's
            if peer.sock is not None:
                peer.sock.close()
        if self.listener is not None:
            self.listener.close()
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (STDIN, STDOUT):
            os.dup2(devnull, fd)
        os.close(devnull)
        if "environ" in request:  # a shared server's child: the environment its supervisor gives
            os.environ.clear()
            os.environ.update(request["environ"])
            os.umask(int(request["umask"]))
        os.environ.update(request["env"])
        os.chdir(request["run"])


def serve(listen: str | None = None) -> tuple[str, str] | None:
    """The zygote's loop. In a forked child it returns the (run directory, attempt) the child is
    to work on, with the child detached from the zygote; in the zygote, None once its
    supervisor (or, shared, whoever started it) is gone."""
    server = _Server(listen)  # a path it cannot listen on fails now, not after the import
    import tensorflow  # noqa: F401  (and Keras with it: the import each attempt would pay)

    return server.run()

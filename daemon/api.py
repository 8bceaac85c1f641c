"""HTTP/JSON API on the daemon's Unix socket (stdlib http.server, one thread per request).

    GET  /v1/health                      the daemon's pid, queue and running counts
    GET  /v1/jobs                        the caller's jobs (every job for admins), summaries
    POST /v1/jobs                        submit: {"spec_json", "job_file", "raw", "priority", "key"}
    GET  /v1/jobs/ID                     one job with attempts and outputs
    POST /v1/jobs/ID/cancel              cancel (queued, running, backing off, interrupted, failed)
    GET  /v1/jobs/ID/checkpoints[?all=1] committed checkpoints
    GET  /v1/jobs/ID/events?offset=W:S   the worker's and the supervisor's events from the offsets
    POST /v1/drain                       admins: start no job; {"running": "stop"|"finish"}
    POST /v1/undrain                     admins: start jobs again
                                         the previous answer gave (for `ckptd logs -f`)

The caller's uid, gid and groups come from SO_PEERCRED and SO_PEERGROUPS, never from the request:
they become the job's owner, whose rights the job runs with. Only the owner, root or a member of the
admin group may see a job's details, events and checkpoints, or cancel it.
"""

from __future__ import annotations

import contextlib
import json
import re
import selectors
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from ckptd.state.store import Store

MAX_BODY = 2 * 1024 * 1024


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13+; Python names it from 3.13


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


class ApiError(Exception):
    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.extra = status, extra


class Backend(Protocol):
    def store(self) -> AbstractContextManager[Store]: ...
    def health(self) -> dict[str, Any]: ...
    def submit(self, store: Store, peer: Peer, body: dict[str, Any]) -> tuple[int, dict[str, Any]]: ...
    def cancel(self, store: Store, peer: Peer, job_id: str) -> tuple[int, dict[str, Any]]: ...
    def job(self, store: Store, peer: Peer, job_id: str, detail: bool) -> dict[str, Any]: ...
    def jobs(self, store: Store, peer: Peer) -> list[dict[str, Any]]: ...
    def checkpoints(
        self, store: Store, peer: Peer, job_id: str, include_retired: bool
    ) -> list[dict[str, Any]]: ...
    def events(self, store: Store, peer: Peer, job_id: str, cursor: str) -> dict[str, Any]: ...
    def drain(self, peer: Peer, body: dict[str, Any]) -> dict[str, Any]: ...
    def undrain(self, peer: Peer) -> dict[str, Any]: ...


def peer_of(sock: socket.socket) -> Peer:
    """Who is calling, as the kernel says (never the request): uid, gid and the supplementary
    groups the caller held when it connected."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    try:
        data = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)  # up to 256 groups
        groups = struct.unpack(f"{len(data) // 4}I", data[: len(data) // 4 * 4])
    except OSError:  # an old kernel: the account database's groups stand in (ckptd.state)
        from ckptd.state.submissions import account_owner

        groups = account_owner(uid).groups
    return Peer(pid, uid, gid, tuple(sorted(set(groups))))


MAX_CONNECTIONS = 64  # requests being served at once, one thread each
MAX_WAITING = 4096  # accepted connections that have not sent anything yet (no thread each)
MAX_PER_UID = 16  # one user's connections at once (root's aside): the rest stay for everyone else
REQUEST_SECONDS = 10.0  # a whole request, from accept to the last byte of the answer


@dataclass
class _Conn:
    uid: int
    since: float
    serving: bool = False


def _peer_uid(sock: socket.socket) -> int:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", raw)[1])


class ApiServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A thread per request, but only once the client has sent something: a silent connection
    waits in a selector, costing a descriptor. Every connection has REQUEST_SECONDS in all (a
    client dribbling a byte every few seconds never trips a per-read timeout, and 70 of them held
    every thread), and one uid at most MAX_PER_UID connections: one user cannot take the API
    from the others, nor `health` from anyone."""

    daemon_threads = True
    allow_reuse_address = False
    request_queue_size = 1024  # connections not yet accepted (the kernel caps it at somaxconn)

    def __init__(
        self,
        path: str,
        backend: Backend,
        request_seconds: float = REQUEST_SECONDS,
        max_per_uid: int = MAX_PER_UID,
    ) -> None:
        self.backend = backend
        self.request_seconds, self.max_per_uid = request_seconds, max_per_uid
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._conns: dict[socket.socket, _Conn] = {}
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        super().__init__(path, Handler, bind_and_activate=True)
        threading.Thread(target=self._waiting_room, name="api-waiting", daemon=True).start()

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            uid = _peer_uid(request)
        except OSError:
            self.shutdown_request(request)
            return
        with self._lock:
            waiting = sum(not c.serving for c in self._conns.values())
            mine = sum(c.uid == uid for c in self._conns.values())
            if waiting >= MAX_WAITING or (uid != 0 and mine >= self.max_per_uid):
                refuse = True
            else:
                refuse = False
                self._conns[request] = _Conn(uid, time.monotonic())
                self._selector.register(request, selectors.EVENT_READ)
        if refuse:
            _too_many(request, self.max_per_uid)
            self.shutdown_request(request)
            return
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _waiting_room(self) -> None:
        while True:
            events = self._selector.select(timeout=0.25)
            ready: list[socket.socket] = []
            with self._lock:
                for key, _ in events:
                    if key.fileobj is self._wake_r:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                        continue
                    conn: socket.socket = key.fileobj  # type: ignore[assignment]
                    self._unwatch(conn)
                    self._conns[conn].serving = True
                    ready.append(conn)
                self._expire(time.monotonic())
            for conn in ready:
                self._slots.acquire()  # only clients that spoke wait for a thread
                threading.Thread(target=self.process_request_thread, args=(conn, None), daemon=True).start()

    def _expire(self, now: float) -> None:
        """Connections past their whole-request time: a waiting one is closed here; a served one
        is shut down under its thread, whose read or write then fails and ends the request."""
        for conn, c in list(self._conns.items()):
            if now - c.since <= self.request_seconds:
                continue
            if c.serving:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            else:
                self._unwatch(conn)
                self._conns.pop(conn, None)
                with contextlib.suppress(OSError):
                    conn.close()

    def _unwatch(self, conn: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client gone, or cut at its whole-request time, is not news; anything else is."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._conns.pop(request, None)
            self._slots.release()


def _too_many(conn: socket.socket, limit: int) -> None:
    """A short refusal the client can show, written without waiting on it."""
    body = json.dumps({"error": f"too many connections from your uid (at most {limit} at once); retry"})
    head = (
        f"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    )
    with contextlib.suppress(OSError):
        conn.setblocking(False)
        conn.send((head + "Connection: close\r\n\r\n" + body).encode())


class Handler(BaseHTTPRequestHandler):
    server: ApiServer
    _body_read = False  # whether a route read the request's body
    timeout = REQUEST_SECONDS  # no single read outlasts the whole request's time either
    protocol_version = "HTTP/1.1"
    server_version = "ckptd"

    def address_string(self) -> str:  # a Unix socket has no client address
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:
        """Requests are not logged one by one; the daemon logs what they change."""

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        self._body_read = False
        try:
            peer = peer_of(self.request)
            with self.server.backend.store() as store:
                status, payload = self._route(method, store, peer)
        except ApiError as e:
            status, payload = e.status, {"error": str(e), **e.extra}
        except Exception as e:  # the daemon must keep serving whatever one request does
            status, payload = 500, {"error": f"internal error: {type(e).__name__}: {e}"}
        self._discard_body()
        self._reply(status, payload)

    def _discard_body(self) -> None:
        """Read a body no route read (`undrain`, a 403 or 404) before answering: a client sends
        its body after its headers, and one descheduled between the two would find the socket
        closed and see a broken pipe instead of the answer."""
        length = self._content_length()
        if self._body_read or length is None:
            return
        with contextlib.suppress(OSError):
            self.rfile.read(length)

    def _content_length(self) -> int | None:
        """The request's Content-Length, if it is a number of at most MAX_BODY bytes."""
        length = self.headers.get("Content-Length", "")
        return int(length) if length.isdigit() and int(length) <= MAX_BODY else None

    def _route(self, method: str, store: Store, peer: Peer) -> tuple[int, Any]:
        url = urlsplit(self.path)
        parts = [p for p in url.path.split("/") if p]
        query = parse_qs(url.query)
        b = self.server.backend
        if parts[:1] != ["v1"]:
            raise ApiError(404, f"no such endpoint {url.path}; the API lives under /v1")
        route = (method, *["ID" if i == 2 else p for i, p in enumerate(parts[1:], start=1)])
        if route == ("GET", "health"):
            return 200, b.health()
        if route == ("GET", "jobs"):
            return 200, b.jobs(store, peer)
        if route == ("POST", "jobs"):
            return b.submit(store, peer, self._body())
        if route in (("POST", "drain"), ("POST", "undrain")):
            return 200, b.drain(peer, self._body()) if route[1] == "drain" else b.undrain(peer)
        if len(parts) < 3 or parts[1] != "jobs":
            raise ApiError(404, f"no such endpoint {method} {url.path}")
        job_id = parts[2]
        if route == ("GET", "jobs", "ID"):
            return 200, b.job(store, peer, job_id, detail=True)
        if route == ("POST", "jobs", "ID", "cancel"):
            return b.cancel(store, peer, job_id)
        if route == ("GET", "jobs", "ID", "checkpoints"):
            return 200, b.checkpoints(store, peer, job_id, query.get("all", ["0"])[0] == "1")
        if route == ("GET", "jobs", "ID", "events"):
            offset = query.get("offset", ["0"])[0]
            if not re.fullmatch(r"\d{1,18}(:\d{1,18})?", offset):
                raise ApiError(400, "offset: the `offset` of the previous answer (N or N:M)")
            return 200, b.events(store, peer, job_id, offset)
        raise ApiError(404, f"no such endpoint {method} {url.path}")

    def _body(self) -> dict[str, Any]:
        length = self._content_length()
        if length is None:
            raise ApiError(400, f"a JSON body of at most {MAX_BODY} bytes with Content-Length")
        self._body_read = True
        try:
            body = json.loads(self.rfile.read(length))
        except ValueError as e:
            raise ApiError(400, f"the body is not JSON: {e}") from e
        except RecursionError as e:  # [[[[…]]]] a million deep
            raise ApiError(400, "the body nests too deeply to be a job submission") from e
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def _reply(self, status: int, payload: Any) -> None:
        self.close_connection = True  # one request per connection: none idles on a thread
        data = (json.dumps(payload, indent=1, default=str) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


def iter_lines(data: bytes) -> Iterator[dict[str, Any]]:
    """Complete JSON lines of an events file chunk (a torn last line is left for next time)."""
    for line in data.split(b"\n"):
        if line.strip():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict):
                yield ev

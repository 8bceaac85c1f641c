"""The CLI's side of the API: HTTP over the daemon's Unix socket (stdlib http.client)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from ckptd.daemon.config import SOCKET_NAME

SYSTEM_SOCKET = Path("/run/ckptd") / SOCKET_NAME


def service_home() -> Path:
    """The system unit's state directory (its `--home`); $CKPTD_SERVICE_HOME moves it (tests,
    a unit installed with another StateDirectory)."""
    return Path(os.environ.get("CKPTD_SERVICE_HOME", "/var/lib/ckptd"))


def service_socket() -> Path:
    """The system unit's socket (RuntimeDirectory=ckptd); $CKPTD_SERVICE_SOCKET moves it (tests,
    a unit installed with another RuntimeDirectory or `socket:`)."""
    return Path(os.environ.get("CKPTD_SERVICE_SOCKET") or SYSTEM_SOCKET)


def _user_unit_socket() -> Path | None:
    runtime = os.environ.get("XDG_RUNTIME_DIR")  # systemd/user/ckptd.service: RuntimeDirectory=ckptd
    return Path(runtime) / "ckptd" / SOCKET_NAME if runtime else None


def uses_own_home(home: Path) -> bool:
    """Whether `home` is a per-user state directory its user works with: one they chose
    (--home, $CKPTD_HOME: not the default) or the default once `ckptd run`/`ckptd daemon` made a
    store there. Not the service's state directory, even when named with --home."""
    if home == service_home():
        return False
    xdg = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return home != Path(xdg, "ckptd").absolute() or (home / "ckptd.db").exists()


class DaemonUnavailable(Exception):
    pass


class SocketDenied(DaemonUnavailable):
    """A daemon answers there, but this user may not talk to it."""


class ApiRefused(Exception):
    def __init__(self, status: int, payload: dict[str, Any]) -> None:
        super().__init__(str(payload.get("error", f"HTTP {status}")))
        self.status, self.payload = status, payload


def find_socket(home: Path) -> Path:
    """$CKPTD_SOCKET, else the state directory's socket, else your user unit's, else the system
    service's: the first that exists. If none does (systemd removes a stopped service's socket
    with its RuntimeDirectory), the service's for whoever uses it rather than a home of their
    own, so that what is down is named; else the state directory's."""
    if os.environ.get("CKPTD_SOCKET"):
        return Path(os.environ["CKPTD_SOCKET"])
    local, service = home / SOCKET_NAME, service_socket()
    candidates = [local, *filter(None, [_user_unit_socket()]), service]
    found = next((c for c in candidates if c.exists()), None)
    if found is not None:
        return found
    return service if service_home().is_dir() and not uses_own_home(home) else local


def down_message(path: Path) -> str:
    """Why nothing answers on `path`, and what to do: whose daemon it is decides the advice."""
    if path == service_socket():
        return f"the ckptd service is not answering at {path}: is it running? `systemctl status ckptd`"
    if path == _user_unit_socket():
        return (
            f"your ckptd user service is not answering at {path}: is it running? "
            "`systemctl --user status ckptd`"
        )
    if os.environ.get("CKPTD_SOCKET"):
        return f"no ckptd daemon answers at {path} ($CKPTD_SOCKET): is the one you meant running?"
    return (
        f"the ckptd daemon is not running (nothing answers on {path}); start yours with "
        "`ckptd daemon`, or use `ckptd run` without a daemon"
    )


def _exchange(
    conn: _UnixConnection, method: str, url: str, data: bytes | None, headers: dict[str, str]
) -> http.client.HTTPResponse:
    """Send the request, then read the answer. A daemon may answer before it has read the
    request (a 429 written at accept) and close: the send then fails on a broken pipe, but the
    answer is in this socket's buffer, and it is what the user needs to see."""
    try:
        conn.request(method, url, body=data, headers=headers)
    except (BrokenPipeError, ConnectionResetError):
        if conn.sock is None:
            raise
        early = http.client.HTTPResponse(conn.sock, method=method)
        early.begin()  # no answer there: the same OSError/HTTPException as before
        return early
    return conn.getresponse()


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("ckptd", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        deadline = time.monotonic() + (self.timeout or 30.0)
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.settimeout(self.timeout)
            try:
                sock.connect(str(self.socket_path))
            except BlockingIOError:  # EAGAIN: the daemon's accept queue is full for a moment
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
                continue
            except BaseException:
                sock.close()
                raise
            self.sock = sock
            return


class Client:
    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.path, self.timeout = path, timeout

    def call(self, method: str, url: str, body: dict[str, Any] | None = None) -> Any:
        """The decoded JSON answer; ApiRefused for 4xx/5xx, DaemonUnavailable if nobody answers."""
        conn = _UnixConnection(self.path, self.timeout)
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            resp = _exchange(conn, method, url, data, headers)
            payload = json.loads(resp.read() or b"{}")
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise DaemonUnavailable(down_message(self.path)) from e
        except PermissionError as e:
            raise SocketDenied(
                f"permission denied on {self.path}: ask an administrator to add you to the "
                "socket's group (ckptd-users)"
            ) from e
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise DaemonUnavailable(f"the daemon on {self.path} did not answer properly: {e}") from e
        finally:
            conn.close()
        if resp.status >= 400:
            raise ApiRefused(resp.status, payload if isinstance(payload, dict) else {})
        return payload

    def available(self) -> bool:
        """Whether a daemon answers. SocketDenied propagates: a daemon that refuses this user
        must not be mistaken for none (and its jobs for this user's local store)."""
        try:
            self.call("GET", "/v1/health")
            return True
        except SocketDenied:
            raise
        except (DaemonUnavailable, ApiRefused):
            return False

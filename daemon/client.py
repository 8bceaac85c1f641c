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
    service's (the first that exists; the state directory's if none does)."""
    if os.environ.get("CKPTD_SOCKET"):
        return Path(os.environ["CKPTD_SOCKET"])
    local = home / SOCKET_NAME
    candidates = [local]
    if os.environ.get("XDG_RUNTIME_DIR"):  # systemd/user/ckptd.service: RuntimeDirectory=ckptd
        candidates.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "ckptd" / SOCKET_NAME)
    candidates.append(SYSTEM_SOCKET)
    return next((c for c in candidates if c.exists()), local)


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
            conn.request(method, url, body=data, headers=headers)
            resp = conn.getresponse()
            payload = json.loads(resp.read() or b"{}")
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise DaemonUnavailable(
                f"the ckptd daemon is not running (nothing answers on {self.path}); start it with "
                "`systemctl start ckptd` or `ckptd daemon`, or use `ckptd run` without a daemon"
            ) from e
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

"""The API socket's path: never follow a symlink, never steal a live socket, replace a stale one."""

from __future__ import annotations

import contextlib
import grp
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

SOCKET_MODE = 0o660
T = TypeVar("T")


class SocketError(Exception):
    pass


def _is_live(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def prepare_path(path: Path) -> None:
    """Make `path` free for bind(), or say clearly why it cannot be."""
    if len(os.fsencode(path)) >= 108:
        raise SocketError(
            f"socket path {path} is longer than the 107 bytes Unix sockets allow; "
            "set `socket:` in the daemon config"
        )
    try:
        st = path.lstat()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return
    if stat.S_ISLNK(st.st_mode):
        raise SocketError(f"{path} is a symlink; refusing to follow it (remove it if it is yours)")
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketError(f"{path} exists and is not a socket; refusing to replace it")
    if _is_live(path):
        raise SocketError(f"{path} is a live socket: another daemon answers there; stop it first")
    path.unlink()  # stale: left by a daemon that was killed


def bound(path: Path, bind: Callable[[], T], group: str | None) -> T:
    """bind() under umask 0117, so the socket is born 0660: no window where others connect."""
    prepare_path(path)
    old = os.umask(0o117)
    try:
        result = bind()
    finally:
        os.umask(old)
    secure_socket(path, group)
    return result


def secure_socket(path: Path, group: str | None) -> None:
    """After bind(): mode 0660 and the API group (members may submit; others get EACCES)."""
    os.chmod(path, SOCKET_MODE)
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError as e:
            raise SocketError(
                f"socket_group {group!r} does not exist; create it "
                "(sysusers.d/ckptd.conf does) or fix the daemon config"
            ) from e
        with contextlib.suppress(PermissionError):
            os.chown(path, -1, gid)

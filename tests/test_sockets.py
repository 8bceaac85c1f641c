"""ckptd.daemon.sockets: the API socket's path is never a symlink, a file or a live socket."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from ckptd.daemon.sockets import SocketError, prepare_path

ROOT = Path(__file__).resolve().parent.parent


# -- socket path -----------------------------------------------------------------------------------


def test_socket_path_refuses_symlinks_files_and_live_sockets(tmp_path: Path) -> None:
    link = tmp_path / "link.sock"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SocketError, match="symlink"):
        prepare_path(link)
    plain = tmp_path / "plain.sock"
    plain.write_text("x")
    with pytest.raises(SocketError, match="not a socket"):
        prepare_path(plain)
    live = tmp_path / "live.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(live))
    server.listen()
    with pytest.raises(SocketError, match="live socket"):
        prepare_path(live)
    server.close()  # now stale: replaced
    prepare_path(live)
    assert not live.exists()
    with pytest.raises(SocketError, match="107 bytes"):
        prepare_path(tmp_path / ("x" * 120))

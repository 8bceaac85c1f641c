"""ckptd.daemon.notify: sd_notify (READY, WATCHDOG, STATUS, STOPPING) and its socket kept from workers."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest

from ckptd.daemon.notify import Notifier
from ckptd.supervisor.process import worker_env

from .daemonproc import start_daemon

ROOT = Path(__file__).resolve().parent.parent


# -- sd_notify -------------------------------------------------------------------------------------


def test_sd_notify_ready_watchdog_status_stopping(tmp_path: Path) -> None:
    addr = tmp_path / "notify.sock"
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(str(addr))
    sink.settimeout(30)
    d = start_daemon(tmp_path / "home", NOTIFY_SOCKET=str(addr), WATCHDOG_USEC="400000")
    got: list[str] = []

    def until(field: str) -> None:
        while not any(m.startswith(field) for m in got):
            got.extend(sink.recv(4096).decode().splitlines())

    try:
        until("READY=1")
        until("STATUS=")
        assert "STATUS=0 running, 0 queued" in got
        got.clear()
        until("WATCHDOG=1")
        got.clear()
        until("WATCHDOG=1")  # keeps pinging from the main loop
    finally:
        d.stop()
    until("STOPPING=1")
    sink.close()


def test_the_loop_stops_pinging_when_blocked(tmp_path: Path) -> None:
    """Control for the test above: a stopped daemon (SIGSTOP) sends no WATCHDOG=1."""
    addr = tmp_path / "notify.sock"
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(str(addr))
    d = start_daemon(tmp_path / "home", NOTIFY_SOCKET=str(addr), WATCHDOG_USEC="200000")
    try:
        sink.settimeout(10)
        while b"WATCHDOG=1" not in sink.recv(4096):
            pass
        os.kill(d.proc.pid, signal.SIGSTOP)
        sink.settimeout(0.05)
        while True:  # drain what was sent before the stop
            try:
                sink.recv(4096)
            except TimeoutError:
                break
        sink.settimeout(1.0)
        with pytest.raises(TimeoutError):
            sink.recv(4096)
        os.kill(d.proc.pid, signal.SIGCONT)
    finally:
        d.stop()
        sink.close()


def test_notifier_understands_abstract_sockets_and_watchdog_pid() -> None:
    n = Notifier(
        {"NOTIFY_SOCKET": "@ckptd-test", "WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}
    )
    assert n.address == "\0ckptd-test" and n.watchdog_interval == 5.0
    assert Notifier({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert not Notifier({}).enabled


def test_workers_do_not_inherit_the_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "1")
    env = worker_env()
    assert "NOTIFY_SOCKET" not in env and "WATCHDOG_USEC" not in env

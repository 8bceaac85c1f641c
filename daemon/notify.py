"""sd_notify(3) without libsystemd: one datagram per message to $NOTIFY_SOCKET.

The daemon sends READY=1 once the store is open and recovery is done, WATCHDOG=1 from its main
loop only (a blocked loop stops the pings and systemd restarts it), STATUS= with queue counts and
STOPPING=1 on shutdown. Workers never see NOTIFY_SOCKET (ckptd.supervisor.process strips it).
"""

from __future__ import annotations

import contextlib
import os
import socket


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        # An abstract socket is written "@name"; the kernel wants a leading NUL byte.
        self.address = "\0" + addr[1:] if addr.startswith("@") else addr
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        watched = usec.isdigit() and (not pid or pid == str(os.getpid()))
        # Ping at half the timeout, as sd_watchdog_enabled(3) advises.
        self.watchdog_interval = int(usec) / 2e6 if watched else None
        self._last_ping = float("-inf")
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *fields: str) -> None:
        if not self.address:
            return
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # systemd may be restarting or the socket gone in a test: never fail the daemon for it.
        with contextlib.suppress(OSError):
            self._sock.sendto("\n".join(fields).encode(), self.address)

    def watchdog(self, now: float) -> None:
        """Call every loop iteration: pings when half the watchdog interval has passed."""
        if self.watchdog_interval is not None and now - self._last_ping >= self.watchdog_interval:
            self._last_ping = now
            self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

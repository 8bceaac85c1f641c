"""A child that escapes its parent's process group twice over, for the containment tests: a
setsid() child and a double-forked grandchild, both ignoring SIGTERM, their pids written to
`escapees.txt` in the given directory. Then the caller goes on (or returns)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def _linger() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    os.closerange(3, 1024)
    while True:
        time.sleep(1)


def escape(where: Path) -> list[int]:
    r, w = os.pipe()
    if os.fork() == 0:  # setsid child: its own session and group
        os.close(r)
        os.setsid()
        if os.fork() == 0:  # double fork: the grandchild is re-parented when its parent exits
            os.write(w, f"{os.getpid()}\n".encode())
            _linger()
        os.write(w, f"{os.getpid()}\n".encode())
        if os.environ.get("ESCAPER_FIRST_EXITS") == "1":
            os._exit(0)
        _linger()
    os.close(w)
    pids: list[int] = []
    with os.fdopen(r) as f:
        for line in f:
            pids.append(int(line))
            if len(pids) == 2:
                break
    tmp = where / ".escapees.tmp"
    tmp.write_text(" ".join(map(str, pids)))
    tmp.rename(where / "escapees.txt")
    return pids


def _wait_contained() -> None:
    """As the worker does (ckptd.state.protocol.wait_contained), with the standard library only:
    another uid runs this with the system's Python."""
    deadline = time.monotonic() + 5
    while os.environ.get("CKPTD_CONTAINED") == "1" and time.monotonic() < deadline:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        if any(line.rsplit("/", 1)[-1].startswith("ckptd-attempt-") for line in lines):
            return
        time.sleep(0.002)


if __name__ == "__main__":
    _wait_contained()
    escape(Path(sys.argv[1]))
    if len(sys.argv) > 2:  # stay, as a worker that is still training
        time.sleep(float(sys.argv[2]))

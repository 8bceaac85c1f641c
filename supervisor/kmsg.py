"""Kernel-log evidence of OOM kills, for workers that die of SIGKILL outside ckptd's own memory
cgroups: the host ran out of memory, or a limit ckptd did not set (a systemd slice, a container)
was reached. ckptd's per-attempt cgroups have their own evidence (ckptd.supervisor.cgroups);
`outside_oom_evidence` also reads the oom_kill counter of the cgroup the worker runs in.

/dev/kmsg returns one record per read(): "PRIORITY,SEQUENCE,MICROSECONDS,FLAGS;MESSAGE", the
timestamp on the CLOCK_MONOTONIC time line. Reading it needs CAP_SYSLOG where
kernel.dmesg_restrict=1 (systemd/ckptd.service grants it); where it cannot be read there is no
evidence, and a bare SIGKILL stays `killed`: never guessed.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ckptd.supervisor.cgroups import MemoryCgroup

KMSG = Path("/dev/kmsg")
# Kernels since 5.0 write "Out of memory: Killed process PID (comm) ..." for the host and
# "Memory cgroup out of memory: Killed process PID (comm) ..." for a cgroup's limit; older ones
# "Out of memory: Kill process PID (comm) score N or sacrifice child" and then "Killed process".
_KILLED = re.compile(r"\bKill(?:ed)? process (?P<pid>\d+) \((?P<comm>[^)]*)\)")
# The kill is logged before the signal is sent, against the kernel's clock; a little slack
# covers the gap between that clock and ours at spawn time.
CLOCK_SLACK_SECONDS = 2.0
MAX_RECORD_BYTES = 8192
MAX_EVIDENCE_CHARS = 240


@dataclass(frozen=True)
class OomKill:
    pid: int
    seconds: float  # kernel timestamp, CLOCK_MONOTONIC
    message: str


def parse_record(record: str) -> OomKill | None:
    """One /dev/kmsg record → the OOM kill it reports, or None."""
    header, sep, message = record.partition(";")
    fields = header.split(",")
    if not sep or len(fields) < 3 or "out of memory" not in message.lower():
        return None
    match = _KILLED.search(message)
    if match is None:
        return None
    try:
        micros = int(fields[2])
    except ValueError:
        return None
    return OomKill(int(match["pid"]), micros / 1e6, message.splitlines()[0].strip())


def evidence_for(kills: Iterable[OomKill], pid: int, since: float) -> str | None:
    """The kernel's own words for an OOM kill of `pid` logged after `since` (our spawn time on
    CLOCK_MONOTONIC): a pid reused since an older kill is not confused with it."""
    mine = [k for k in kills if k.pid == pid and k.seconds >= since - CLOCK_SLACK_SECONDS]
    if not mine:
        return None
    text = mine[-1].message
    if len(text) > MAX_EVIDENCE_CHARS:
        text = text[:MAX_EVIDENCE_CHARS] + "…"
    return f"kernel log: {text}"


def read_oom_kills(path: Path = KMSG) -> list[OomKill]:
    """Every OOM kill still in the kernel's ring buffer; [] where it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # EPERM without CAP_SYSLOG, ENOENT in some containers
        return []
    kills = []
    try:
        while True:
            try:
                raw = os.read(fd, MAX_RECORD_BYTES)
            except BrokenPipeError:  # the record we were at was overwritten: go on
                continue
            except OSError:  # EAGAIN: no more records (or EINVAL on a regular file's end)
                break
            if not raw:
                break
            kill = parse_record(raw.decode("utf-8", "replace"))
            if kill is not None:
                kills.append(kill)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    return kills


def outside_oom_evidence(pid: int, spawned_at: float, outer: tuple[MemoryCgroup, int] | None) -> str:
    """Outside ckptd's own cgroups (the host's memory, a unit's or container's limit), what tells
    an OOM kill of `pid` from an operator's kill -9: the kernel log names the pid; the enclosing
    cgroup's oom_kill counter (readable without CAP_SYSLOG) says one of its members was killed."""
    found = []
    if (line := evidence_for(read_oom_kills(), pid, spawned_at)) is not None:
        found.append(line)
    if outer is not None and (now := outer[0].oom_kills()) > outer[1]:
        found.append(f"oom_kill of enclosing cgroup {outer[0].path} rose {outer[1]}→{now} during the attempt")
    return "; ".join(found)

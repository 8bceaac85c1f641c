"""Outputs on a mount the daemon's workers cannot write: found at submit time, not by a crash.

The system unit's sandbox (`ProtectSystem=strict`, `ProtectHome=read-only`) mounts most of the
file system read-only for the daemon and its workers, while the submitter's shell sees it
writable: the CLI's own check passes and the job would only fail in its worker. The daemon
reads its own mount table (/proc/self/mountinfo; nothing of the submitter's is opened) and
matches the output paths lexically; the worker's check at start-up stays the backstop for
paths a symlink leads elsewhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ckptd.state.jobspec import JobSpec

MOUNTINFO = Path("/proc/self/mountinfo")
HOME_PREFIXES = ("/home", "/root", "/run/user")  # what ProtectHome= covers


@dataclass(frozen=True)
class Mount:
    point: str
    read_only: bool


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 6:
            continue
        super_opts = right.split()[2].split(",") if len(right.split()) >= 3 else []
        mounts.append(Mount(_unescape(fields[4]), "ro" in fields[5].split(",") or "ro" in super_opts))
    return mounts


def mount_of(path: str, mounts: list[Mount]) -> Mount | None:
    """The mount a lexically normalised absolute path lands on: the longest mount point that
    contains it, the last one listed among mounts stacked on one point."""
    norm = os.path.normpath(path)
    best: Mount | None = None
    for m in mounts:
        inside = norm == m.point or norm.startswith(m.point.rstrip("/") + "/")
        if inside and (best is None or len(m.point) >= len(best.point)):
            best = m
    return best


def read_only_outputs(spec: JobSpec, source: str, mounts: list[Mount], under_systemd: bool) -> list[str]:
    """One problem per absolute output path that lands on a read-only mount."""
    outputs = [("checkpoint.dir", spec.checkpoint.dir)]
    if spec.best:
        outputs.append(("best.filepath", str(Path(spec.best.filepath).parent)))
    problems = []
    for field, value in outputs:
        if not value.startswith("/"):
            continue  # under the run directory, which the daemon's state directory holds
        m = mount_of(value, mounts)
        if m is None or not m.read_only:
            continue
        why = f"{value} is on a read-only mount ({m.point}) for the ckptd daemon and its workers"
        if under_systemd:
            setting = "ProtectHome=read-only" if m.point.startswith(HOME_PREFIXES) else "ProtectSystem=strict"
            why += (
                f": the unit's {setting} makes it so. Use a path relative to the run "
                f"directory, or let the service write there: create {value} first (systemd "
                f"refuses to start the unit over a ReadWritePaths= entry that does not "
                f"exist), then `systemctl edit ckptd`, add [Service] ReadWritePaths={value} "
                f"and restart the service"
            )
        problems.append(f"{source}: {field}: {why}")
    return problems


def check_outputs(spec: JobSpec, source: str) -> list[str]:
    """read_only_outputs against this process's mount table (none readable: no problems)."""
    try:
        text = MOUNTINFO.read_text()
    except OSError:
        return []
    return read_only_outputs(spec, source, parse_mountinfo(text), under_systemd="INVOCATION_ID" in os.environ)

"""What an ended attempt left behind, read from a directory its owner controls."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ckptd.state import protocol as p
from ckptd.state.safeopen import read_under
from ckptd.supervisor import limits


def file_size(path: Path) -> int:
    try:
        return int(path.lstat().st_size)  # the owner's directory: never follow a symlink
    except OSError:
        return 0


def read_error(root: Path, path: Path) -> dict[str, Any]:
    """The worker's error file; without one, what its stderr says of an abort the error file
    could not record (a thread that could not be created: ckptd.supervisor.limits)."""
    try:
        data = json.loads(read_under(root, path, limit=p.MAX_RECORD))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        pass
    stderr = path.parent / "stderr.log"
    try:
        tail = read_under(root, stderr, offset=max(0, file_size(stderr) - limits.TAIL_BYTES)).decode(
            errors="replace"
        )
    except OSError:
        return {}
    line = limits.thread_abort(tail)
    if line is None:
        return {}
    return {"type": limits.THREAD_ABORT, "message": f"{line}; {limits.in_force(limits.own_pids_cgroup())}"}


def error_summary(err: dict[str, Any]) -> str | None:
    if not err:
        return None
    return f"{str(err.get('type', '')).rsplit('.', 1)[-1]}: {err.get('message', '')}"[:1000]

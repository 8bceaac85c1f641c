"""What an ended attempt left behind, read from a directory its owner controls."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ckptd.state import protocol as p
from ckptd.state.safeopen import read_under


def file_size(path: Path) -> int:
    try:
        return int(path.lstat().st_size)  # the owner's directory: never follow a symlink
    except OSError:
        return 0


def read_error(root: Path, path: Path) -> dict[str, Any]:
    try:
        data = json.loads(read_under(root, path, limit=p.MAX_RECORD))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def error_summary(err: dict[str, Any]) -> str | None:
    if not err:
        return None
    return f"{str(err.get('type', '')).rsplit('.', 1)[-1]}: {err.get('message', '')}"[:1000]

"""What the supervisor benchmarks share: the Pima job file they run and the heartbeat they poll."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "pima"


def pima_job(directory: Path, name: str, epochs: int, checkpoint: str, restart: str) -> Path:
    """The Pima example as `name`; `checkpoint` and `restart` are the inner YAML of those sections."""
    job = directory / f"{name}.yaml"
    job.write_text(
        f"name: {name}\n"
        f"model: {EXAMPLE / 'model.py'}:build\n"
        f"params: {{csv: {EXAMPLE / 'pima-indians-diabetes.csv'}}}\n"
        f"train: {{epochs: {epochs}, batch_size: 10, validation_split: 0.33, seed: 7}}\n"
        f"checkpoint: {{{checkpoint}}}\n"
        f"restart: {{{restart}}}\n"
    )
    return job


def heartbeat(run: Path) -> dict[str, Any] | None:
    """The run directory's latest heartbeat, or None while there is none (or it is mid-write)."""
    try:
        data: dict[str, Any] = json.loads((run / "heartbeat.json").read_text())
        return data
    except (OSError, ValueError):
        return None

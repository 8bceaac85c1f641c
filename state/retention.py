"""Which committed checkpoints to keep: a pure function, so retention is table-tested.

ckptd deletes old checkpoints itself, and only after a newer one is committed: TensorFlow's own
rotation unlinks old files right after writing the new ones and before anything is synced, which a
power cut can turn into zero valid checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Committed:
    number: int
    wall_time: float


def to_delete(committed: list[Committed], max_to_keep: int, keep_every_n_hours: float | None) -> list[int]:
    """Numbers of checkpoints to delete: all but the newest `max_to_keep`, except those preserved
    by `keep_every_n_hours` (the first checkpoint, then the first one at least N hours after the
    last preserved one, as TensorFlow's CheckpointManager does)."""
    ordered = sorted(committed, key=lambda c: c.number)
    keep = {c.number for c in ordered[-max_to_keep:]} if max_to_keep > 0 else set()
    if keep_every_n_hours is not None and ordered:
        last = ordered[0].wall_time
        keep.add(ordered[0].number)
        for c in ordered[1:]:
            if c.wall_time - last >= keep_every_n_hours * 3600:
                keep.add(c.number)
                last = c.wall_time
    return [c.number for c in ordered if c.number not in keep]

"""What the saving side of checkpointing and its callers (the save schedule, the fit loop, custom
loops' sessions) exchange: why a save is made, how it went, the attempt's save figures.

A leaf module without TensorFlow: the schedule and its tests use it without the saver.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum


class SaveReason(StrEnum):
    """Why a commit is made; the values are those written into events (`reason`)."""

    INTERVAL = "interval"  # checkpoint.every_steps / every_seconds (may fail: training goes on)
    FINAL = "final"  # training finished
    PREEMPTED = "preempted"  # SIGTERM/SIGINT: saved, then the worker stops


class Saved(StrEnum):
    DONE = "done"  # committed (sync) or handed to the writer (async)
    BUSY = "busy"  # async interval save: the writer is busy or paces; try again later
    FAILED = "failed"  # an interval save that failed (reported); training goes on


@dataclass
class SaveStats:
    """Per attempt: time in the step loops and how long saves stalled them (benchmarks read it,
    and the training.done event carries it)."""

    due: int = 0  # interval saves that fell due
    saves: int = 0  # interval saves made
    stall_seconds: float = 0.0  # what the step loop waited for them
    poll_seconds: float = 0.0  # looking at the async writer
    loop_seconds: float = 0.0
    steps: int = 0
    coalesced: int | None = None  # saves coalesced into a pending one (once any was)
    save_cost_seconds: float | None = None  # mean cost of an async save (once measured)

    def as_dict(self) -> dict[str, float]:
        """The figures set so far (the optional ones once they are)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

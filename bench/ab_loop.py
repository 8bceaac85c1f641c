"""Interval saves switched on and off in alternating blocks of steps of the worker's own Loop,
for bench/overhead_ab.py, through the Loop's public hooks (`before_step`, `ck.on_commit`,
`ck.schedule.set_enabled`). Imports TensorFlow: only its child process uses this."""

from __future__ import annotations

import time
from typing import Any

from ckptd.state.ckptfiles import Manifest
from ckptd.worker.fit.loop import Loop

# ABBA: on, off, off, on, on, off, off, on, ...
PATTERN = (True, False, False, True)


def block_steps(steps_per_epoch: int, target: int) -> int:
    """The block length: the whole number of epochs closest to `target` steps (at least one), so
    every block holds the same number of epoch ends."""
    return max(1, round(target / steps_per_epoch)) * steps_per_epoch


class ABBlocks:
    """Attached to a built Loop: records each block's steps, seconds and interval commits."""

    def __init__(self, loop: Loop, target: int) -> None:
        self.schedule = loop.ck.schedule
        self.block_len = block_steps(loop.data.steps_per_epoch, target)
        self.blocks: list[dict[str, Any]] = []
        self.block_start: float | None = None
        self.in_block = 0
        self.commits = 0
        self.first_commit: float | None = None
        loop.before_step.append(self.step)
        loop.ck.on_commit.append(self.committed)

    @property
    def on(self) -> bool:
        return PATTERN[len(self.blocks) % len(PATTERN)]

    def committed(self, _m: Manifest, reason: str) -> None:
        if reason == "interval":
            self.commits += 1
            if self.first_commit is None:
                self.first_commit = time.monotonic()

    def step(self) -> None:
        if self.block_start is None:
            self.block_start = time.monotonic()
        elif self.in_block >= self.block_len:
            self._end_block()
        self.in_block += 1

    def _end_block(self) -> None:
        if self.on:  # the save in flight is charged to this block
            self.schedule.settle()
        assert self.block_start is not None
        self.blocks.append(
            {
                "on": self.on,
                "start": self.block_start,
                "steps": self.in_block,
                "seconds": time.monotonic() - self.block_start,
                "commits": self.commits,
            }
        )
        self.schedule.set_enabled(self.on)  # self.on is the next block's now
        self.block_start, self.in_block, self.commits = time.monotonic(), 0, 0

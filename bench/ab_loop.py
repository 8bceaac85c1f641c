"""The worker's training Loop with interval saves switched on and off in alternating blocks of
steps, for bench/overhead_ab.py (imports TensorFlow: only its child process uses this)."""

from __future__ import annotations

import time
from typing import Any

from ckptd.worker.checkpointing import Checkpointing
from ckptd.worker.loop import Loop

# ABBA: on, off, off, on, on, off, off, on, ...
PATTERN = (True, False, False, True)


def block_steps(steps_per_epoch: int, target: int) -> int:
    """The block length: the whole number of epochs closest to `target` steps (at least one), so
    every block holds the same number of epoch ends."""
    return max(1, round(target / steps_per_epoch)) * steps_per_epoch


class ABCheckpointing(Checkpointing):
    """Interval saves only while the current block is an on-block; counts its commits."""

    on = True
    commits = 0
    first_commit: float | None = None

    def save(self, reason: str) -> bool:
        if reason == "interval" and not self.on:
            return False
        return super().save(reason)

    def _committed(self, m: Any, reason: str, seconds: float, retired: list[Any]) -> None:
        super()._committed(m, reason, seconds, retired)
        if reason == "interval":
            self.commits += 1
            if self.first_commit is None:
                self.first_commit = time.monotonic()


class ABLoop(Loop):
    checkpointing_class = ABCheckpointing

    def set_blocks(self, target: int) -> None:
        self.block_len = block_steps(self.data.steps_per_epoch, target)
        self.blocks: list[dict[str, Any]] = []
        self.block_start: float | None = None
        self.in_block = 0
        self.on_ended_at: float | None = None

    @property
    def first_commit(self) -> float | None:
        return self.ck.first_commit  # type: ignore[attr-defined, no-any-return]

    @property
    def on(self) -> bool:
        return PATTERN[len(self.blocks) % len(PATTERN)]

    def _train_step(self, data: Any) -> dict[str, Any]:
        if self.block_start is None:
            self.block_start = time.monotonic()
        elif self.in_block >= self.block_len:
            self._end_block()
        self.in_block += 1
        return super()._train_step(data)

    def _end_block(self) -> None:
        ck = self.ck
        if self.on:  # the save in flight is charged to this block
            ck.drain_async(block=True)
            ck.save_pending = False
        now = time.monotonic()
        if self.on:
            self.on_ended_at = now
        assert self.block_start is not None
        self.blocks.append(
            {
                "on": self.on,
                "start": self.block_start,
                "steps": self.in_block,
                "seconds": now - self.block_start,
                "commits": ck.commits,
            }
        )  # type: ignore[attr-defined]
        if self.on:
            self._resume_pacing()
        ck.on = self.on  # type: ignore[attr-defined]
        self.block_start, self.in_block = time.monotonic(), 0
        ck.commits = 0  # type: ignore[attr-defined]

    def _resume_pacing(self) -> None:
        """Before an on-block: move the pacing clocks on by the time checkpointing was off, so
        the block continues the previous on-block's pacing as if the off-blocks had not been.
        (Otherwise every on-block would begin with a save the pacing would not have allowed.)"""
        saver, now = self.ck.async_saver, time.monotonic()
        if saver is not None and self.on_ended_at is not None:
            shift = now - self.on_ended_at
            if saver.last_start is not None:
                saver.last_start += shift
            if saver.last_done is not None:
                saver.last_done += shift

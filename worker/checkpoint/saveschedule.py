"""When the step loop takes an interval save: the decisions, apart from how a save is made
(ckptd.worker.checkpoint.saver, reached through the ScheduleLink's callbacks).

- A save is due at every `every_steps`-th step and whenever `every_seconds` have passed.
- In the fit loop, a save due on an epoch's last step waits for the epoch end (after validation
  and callbacks), so that the last epoch's interval and final saves are one commit, not two of
  one step.
- In async mode a save due while the previous one is still being written is pending: the step
  loop looks at the writer now and then and takes it as soon as the writer is free. Saves that
  fall due meanwhile coalesce into that one; ckptd says so (`checkpoint.coalesced`: the interval
  asked for and the one achieved), because the job file's interval was not met. Every due save
  is made, failed (`checkpoint.failed`) or coalesced: also one due at an epoch end while another
  is pending, and one still pending when the final or preemption save takes its place; the
  reports are throttled to one a minute, and the last ones go out before that final save.
- `every_steps: auto`: every step is due, and the writer's pacing (ckptd.state.pacing) decides.

Benchmarks switch interval saves off and on with `set_enabled` (bench/ab_loop.py).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from ckptd.state.jobspec import Checkpoint
from ckptd.state.protocol import Event
from ckptd.worker.checkpoint.savetypes import Saved, SaveReason, SaveStats

# While a save is in flight the step loop looks at the writer (a pipe poll) at most this often:
# a poll every step costs a measurable share of a small model's step; a reply noticed 2 ms late
# changes nothing.
ASYNC_POLL_SECONDS = 0.002
REPORT_SECONDS = 60.0  # checkpoint.coalesced: at most once a minute after the first


class Due(StrEnum):
    NO = "no"
    NOW = "now"
    EPOCH_END = "epoch_end"  # at this epoch's end, once its row is recorded
    PENDING = "pending"  # already waiting for the writer: it stays one save


class Meter(Protocol):
    def step(self, seconds: float, in_flight: bool) -> None: ...
    def stalled(self, seconds: float) -> None: ...


class PacedWriter(Protocol):
    """What the schedule reads of the async writer's link (ckptd.worker.checkpoint.asyncsave.AsyncSaver)."""

    @property
    def meter(self) -> Meter: ...
    def saving(self) -> bool: ...
    def busy(self) -> bool: ...
    def next_look(self, now: float, pending: bool, poll: float) -> float: ...
    def shift_clocks(self, seconds: float) -> None: ...


@dataclass
class ScheduleLink:
    """The schedule's hold on the saver: callbacks and what it reads, not the saver itself."""

    take: Callable[[SaveReason], Saved]  # make an interval save now (or find the writer busy)
    drain: Callable[[bool], bool]  # collect the async writer's reply (wait for it if True)
    writer: Callable[[], PacedWriter | None]  # the async writer's link, once opened
    step: Callable[[], int]
    committed_step: Callable[[], int | None]
    event: Callable[..., None]
    stats: SaveStats


def interval_due(
    step: int, since_last_save: float, every_steps: int | str | None, every_seconds: float | None
) -> bool:
    if every_steps == "auto":  # the pacer holds it back (AsyncSaver.busy)
        return True
    return bool(isinstance(every_steps, int) and step % every_steps == 0) or bool(
        every_seconds and since_last_save >= every_seconds
    )


def when_due(step_in_epoch: int, epoch_steps: int | None, pending: bool) -> Due:
    """Where a due save goes: the epoch's end if this is its last step (fit loop only)."""
    if epoch_steps is not None and step_in_epoch >= epoch_steps:
        return Due.EPOCH_END
    return Due.PENDING if pending else Due.NOW


def _asked(spec: Checkpoint) -> str:
    parts = [f"{spec.every_steps} steps"] if isinstance(spec.every_steps, int) else []
    return " or ".join(parts + ([f"{spec.every_seconds:g} s"] if spec.every_seconds else [])) or "?"


class SaveSchedule:
    def __init__(self, spec: Checkpoint, link: ScheduleLink) -> None:
        self.spec, self.link = spec, link
        # Set by the fit loop only: custom loops (sessions) have no epoch end to defer to.
        self.epoch_steps: int | None = None
        self.last_save = time.monotonic()
        self.pending = False
        self.due_at_epoch_end = False
        self.poll_at = 0.0
        self.enabled = True
        self._off_since: float | None = None
        # Saves that fell due while one was pending (coalesced into it), since the last report.
        self.coalesced = 0
        self._taken_step: int | None = None
        self._reported_at: float | None = None

    def start(self) -> None:
        """Training starts now: every_seconds counts from here, not from the process start."""
        self.last_save = time.monotonic()

    def after_step(self, step_seconds: float) -> None:
        writer = self.link.writer()
        if writer is not None:
            self._look_at_writer(writer, step_seconds)

    def interval(self, step: int, step_in_epoch: int) -> None:
        """The step is counted (and a stop request dealt with): take the save if due."""
        now = time.monotonic()
        if not interval_due(step, now - self.last_save, self.spec.every_steps, self.spec.every_seconds):
            return
        self.link.stats.due += 1
        where = when_due(step_in_epoch, self.epoch_steps, self.pending)
        if where is Due.EPOCH_END:
            self.due_at_epoch_end = True
        elif where is Due.NOW:
            self._take()
        else:
            self._coalesce()
        self.last_save = time.monotonic()

    def epoch_recorded(self) -> None:
        """The fit loop's epoch end is complete: the save due on its last step is taken now."""
        if self.due_at_epoch_end:
            self.due_at_epoch_end = False
            if self.pending:
                self._coalesce()
            else:
                self._take()

    def closing(self) -> None:
        """The final or preemption save comes next: a save still pending is coalesced into it,
        and what was coalesced since the last report is reported now, unthrottled."""
        if self.pending:
            self.pending = False
            self._coalesce()
        self._report_coalesced(final=True)

    def _coalesce(self) -> None:
        if self.spec.every_steps != "auto":  # pacing holds saves back on purpose: not news
            self.coalesced += 1

    def _take(self) -> None:
        if not self.enabled:
            return
        outcome = self.link.take(SaveReason.INTERVAL)
        if outcome is not Saved.FAILED:
            # Busy: the writer has one in flight or paces, save when it may. Either way the
            # next step works out when to look at the writer again.
            self.pending = outcome is Saved.BUSY
            self.poll_at = 0.0
        if outcome is Saved.DONE:
            self._report_coalesced()

    def _report_coalesced(self, final: bool = False) -> None:
        """The interval the job asked for was not met: say what was achieved (at once the
        first time, then at most once a minute, and before the final save)."""
        step, now = self.link.step(), time.monotonic()
        since, self._taken_step = self._taken_step, step
        if not self.coalesced:
            return
        if since is None:  # nothing taken yet in this attempt: since the restored commit
            since = self.link.committed_step() or 0
        if not final and self._reported_at is not None and now - self._reported_at < REPORT_SECONDS:
            return
        asked = _asked(self.spec)
        self.link.event(
            Event.CHECKPOINT_COALESCED,
            step=step,
            since_step=since,
            asked_every_steps=self.spec.every_steps,
            asked_every_seconds=self.spec.every_seconds,
            coalesced=self.coalesced,
            reason=f"asked for a commit every {asked}, achieved {step - since} steps (the writer "
            f"could not keep up: {self.coalesced} save(s) coalesced); a faster disk, a longer "
            "interval, or every_steps: auto",
        )
        if self._reported_at is None:
            print(
                f"ckptd: checkpoint interval not met: every {asked} asked, {step - since} steps "
                "achieved (saves coalesced while the writer was busy)",
                file=sys.stderr,
                flush=True,
            )
        self.link.stats.coalesced = (self.link.stats.coalesced or 0) + self.coalesced
        self.coalesced, self._reported_at = 0, now

    def _look_at_writer(self, saver: PacedWriter, step_seconds: float) -> None:
        saver.meter.step(step_seconds, saver.saving())
        now = time.monotonic()
        if now < self.poll_at:
            return
        self.link.drain(False)
        may_save = self.pending and not saver.busy()
        self.poll_at = saver.next_look(now, self.pending and not may_save, ASYNC_POLL_SECONDS)
        looked = time.monotonic() - now
        self.link.stats.poll_seconds += looked
        saver.meter.stalled(looked)
        if may_save:
            self._take()

    def settle(self) -> None:
        """Benchmarks: wait for the save in flight and drop a pending one, so that a block of
        steps is charged with the saves it started."""
        self.link.drain(True)
        self.pending = False

    def set_enabled(self, on: bool) -> None:
        """Benchmarks: interval saves off or back on. Turning them on moves the async pacing
        clocks on by the time they were off, so pacing continues as if the off period had not
        been (otherwise every on-period would begin with a save pacing would not have allowed)."""
        now = time.monotonic()
        if not on and self.enabled:
            self.settle()
            self._off_since = now
        elif on and not self.enabled and self._off_since is not None:
            saver = self.link.writer()
            if saver is not None:
                saver.shift_clocks(now - self._off_since)
        self.enabled = on

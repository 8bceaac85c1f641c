"""When interval saves are due (ckptd.worker.checkpoint.saveschedule): pure decisions, table-driven."""

from __future__ import annotations

import pytest

from ckptd.state.jobspec import Checkpoint
from ckptd.state.protocol import Event
from ckptd.worker.checkpoint.saveschedule import Due, SaveSchedule, ScheduleLink, interval_due, when_due
from ckptd.worker.checkpoint.savetypes import Saved, SaveReason, SaveStats


@pytest.mark.parametrize(
    ("step", "since", "every_steps", "every_seconds", "due"),
    [
        (100, 0.0, 100, None, True),
        (200, 0.0, 100, 60.0, True),
        (99, 0.0, 100, None, False),
        (101, 59.9, 100, 60.0, False),
        (101, 60.0, 100, 60.0, True),  # time alone makes it due
        (7, 61.0, None, 60.0, True),
        (7, 1.0, None, 60.0, False),
        (5, 1e9, 5, None, True),
        (4, 1e9, 5, None, False),  # no every_seconds: time never makes it due
        (7, 0.0, "auto", None, True),  # auto: every step is due, the writer's pacing decides
        (1, 0.0, "auto", 60.0, True),
    ],
)
def test_interval_due(
    step: int, since: float, every_steps: int | str | None, every_seconds: float | None, due: bool
) -> None:
    assert interval_due(step, since, every_steps, every_seconds) is due


@pytest.mark.parametrize(
    ("step_in_epoch", "epoch_steps", "pending", "where"),
    [
        (3, 10, False, Due.NOW),
        (3, 10, True, Due.PENDING),  # already waiting for the writer: stays one save
        (10, 10, False, Due.EPOCH_END),  # the epoch's last step: after validation, one commit
        (10, 10, True, Due.EPOCH_END),
        (10, None, False, Due.NOW),  # a custom loop (session) has no epoch end to wait for
        (12, 10, False, Due.EPOCH_END),  # a plan longer than steps_per_epoch still ends there
    ],
)
def test_when_due(step_in_epoch: int, epoch_steps: int | None, pending: bool, where: Due) -> None:
    assert when_due(step_in_epoch, epoch_steps, pending) is where


class _Meter:
    def step(self, seconds: float, in_flight: bool) -> None:
        pass

    def stalled(self, seconds: float) -> None:
        pass


class _Writer:
    """One save in flight at a time; the test frees it."""

    def __init__(self) -> None:
        self.in_flight: int | None = None
        self.meter = _Meter()

    def saving(self) -> bool:
        return self.in_flight is not None

    def busy(self) -> bool:
        return self.in_flight is not None

    def next_look(self, now: float, pending: bool, poll: float) -> float:
        return 0.0

    def shift_clocks(self, seconds: float) -> None:
        pass


class _Ck:
    """The saver's side of the schedule's link: saves go to a writer the test frees."""

    def __init__(self) -> None:
        self.async_saver = _Writer()
        self.stats = SaveStats()
        self.step, self.made = 0, 0
        self.events: list[dict[str, object]] = []

    def link(self) -> ScheduleLink:
        return ScheduleLink(
            take=self.save,
            drain=self.drain_async,
            writer=lambda: self.async_saver,
            step=lambda: self.step,
            committed_step=lambda: None,
            event=self.event,
            stats=self.stats,
        )

    def save(self, reason: SaveReason) -> Saved:
        assert reason is SaveReason.INTERVAL
        if self.async_saver.busy():
            return Saved.BUSY
        self.async_saver.in_flight, self.made = self.step, self.made + 1
        return Saved.DONE

    def drain_async(self, block: bool) -> bool:
        return True

    def event(self, kind: Event, **data: object) -> None:
        self.events.append({"event": kind, **data})


# ops: an int = one step taken (every step is due), "free" = the writer finishes its save,
# "epoch" = the fit loop's epoch end, "close" = the final save comes next.
@pytest.mark.parametrize(
    ("ops", "epoch_steps", "made", "coalesced"),
    [
        ([1, "free", 2, "free", 3, "close"], None, 3, 0),  # a free writer: every due save made
        ([1, 2, 3, "free", 4, "close"], None, 2, 2),  # 2 pending then taken late, 3 and 4 coalesced
        ([1, 2, 3, "close"], None, 1, 2),  # 2 pending, 3 coalesced into it, then into the final
        ([1, 2, "epoch", "close"], 2, 1, 1),  # due at the epoch end while 1 is in flight
        ([1, "free", 2, "epoch", "close"], 2, 2, 0),  # the epoch end's save made
        ([1, 2, "epoch", "free", 3, 4, "epoch", "close"], 2, 2, 2),
    ],
)
def test_every_due_save_is_made_or_reported(
    ops: list[int | str], epoch_steps: int | None, made: int, coalesced: int
) -> None:
    ck = _Ck()
    sched = SaveSchedule(Checkpoint(every_steps=1, every_seconds=None), ck.link())
    sched.epoch_steps = epoch_steps
    for op in ops:
        if op == "free":
            ck.async_saver.in_flight = None
            sched.after_step(0.0)
        elif op == "epoch":
            sched.epoch_recorded()
        elif op == "close":
            sched.closing()
        else:
            ck.step = int(op)
            sched.interval(ck.step, (ck.step - 1) % (epoch_steps or 10**9) + 1)
    reported = sum(int(str(e["coalesced"])) for e in ck.events)
    assert (ck.made, reported) == (made, coalesced)
    assert ck.made + reported == ck.stats.due
    assert all(e["event"] == Event.CHECKPOINT_COALESCED for e in ck.events)

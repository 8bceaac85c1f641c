"""When interval saves are due (ckptd.worker.saveschedule): pure decisions, table-driven."""

from __future__ import annotations

import pytest

from ckptd.worker.saveschedule import Due, interval_due, when_due


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

"""Which batches each epoch of a fit call takes (Keras's EpochIterator rules), as a pure table."""

from __future__ import annotations

import pytest

from ckptd.worker.data.fitplan import EpochPlan, epoch_plan, should_validate, validations_between


@pytest.mark.parametrize(
    ("epochs_done", "num_batches", "steps_per_epoch", "plan"),
    [
        # no steps_per_epoch: every epoch is a whole new pass
        (0, 10, None, EpochPlan(0, 0, 10)),
        (3, 10, None, EpochPlan(3, 0, 10)),
        (2, None, None, EpochPlan(2, 0, None)),  # unknown size: until the data runs out
        # steps_per_epoch divides the pass: the iterator continues, a new pass after 2 epochs
        (0, 10, 5, EpochPlan(0, 0, 5)),
        (1, 10, 5, EpochPlan(0, 5, 5)),
        (2, 10, 5, EpochPlan(1, 0, 5)),
        # it does not: the pass runs out mid-epoch, which ends that epoch early (3 batches)
        (0, 15, 12, EpochPlan(0, 0, 12)),
        (1, 15, 12, EpochPlan(0, 12, 3)),
        (2, 15, 12, EpochPlan(1, 0, 12)),
        (5, 15, 12, EpochPlan(2, 12, 3)),
        # steps_per_epoch larger than the data: each epoch is one short pass
        (4, 3, 5, EpochPlan(4, 0, 3)),
        # infinite or unknown size with steps_per_epoch: one iterator, never restarted
        (3, None, 7, EpochPlan(0, 21, 7)),
    ],
)
def test_epoch_plan(
    epochs_done: int, num_batches: int | None, steps_per_epoch: int | None, plan: EpochPlan
) -> None:
    assert epoch_plan(epochs_done, num_batches, steps_per_epoch) == plan


def test_epoch_plans_cover_each_pass_once() -> None:
    """Walking the plans epoch by epoch visits every batch of every pass exactly once."""
    seen = []
    for e in range(12):
        p = epoch_plan(e, 15, 4)
        seen += [(p.pass_index, b) for b in range(p.first_batch, p.first_batch + (p.steps or 0))]
    assert seen == [(pi, b) for pi in range(3) for b in range(15)]


@pytest.mark.parametrize(
    ("epoch", "freq", "expected"),
    [
        (0, 1, True),
        (0, 2, False),
        (1, 2, True),
        (2, 3, True),
        (5, 3, True),
        (4, 3, False),
    ],
)
def test_should_validate_follows_keras_one_based_epochs(epoch: int, freq: int, expected: bool) -> None:
    assert should_validate(epoch, freq) is expected


@pytest.mark.parametrize("first", [0, 1, 3])
@pytest.mark.parametrize("freq", [1, 2, 3])
def test_validations_between_counts_should_validate(first: int, freq: int) -> None:
    for epoch in range(first, 12):
        expected = sum(should_validate(e, freq) for e in range(first, epoch))
        assert validations_between(first, epoch, freq) == expected

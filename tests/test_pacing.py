"""The async writer's pacing decision (ckptd.state.pacing), table-driven."""

from __future__ import annotations

import math

import pytest

from ckptd.state.pacing import (
    budget_start_time,
    ewma,
    next_look,
    paced_start_time,
    save_cost,
    writer_start_time,
)


@pytest.mark.parametrize(
    ("now", "last_done", "write_seconds", "share", "expected"),
    [
        (0.0, None, 0.0, 0.1, True),  # nothing written yet this attempt
        (100.0, 99.0, 5.0, 1.0, True),  # share 1.0: no limit
        (10.0, 9.0, 0.2, 0.1, False),  # 0.2 s write at share 0.1: wait 1.8 s
        (10.79, 9.0, 0.2, 0.1, False),
        (10.8, 9.0, 0.2, 0.1, True),
        (9.61, 9.0, 0.2, 0.25, True),  # share 0.25: wait 0.6 s
        (9.59, 9.0, 0.2, 0.25, False),
        (9.0, 9.0, 0.0, 0.1, True),  # an instant write never holds the next one back
        (9.0, 9.0, 1.0, 0.5, False),  # share 0.5: wait as long as the write took
        (10.0, 9.0, 1.0, 0.5, True),
    ],
)
def test_writer_may_start(
    now: float, last_done: float | None, write_seconds: float, share: float, expected: bool
) -> None:
    assert (now >= writer_start_time(last_done, write_seconds, share)) is expected


@pytest.mark.parametrize(
    ("last_done", "write_seconds", "share", "expected"),
    [
        (None, 0.2, 0.1, -math.inf),  # nothing written yet this attempt
        (9.0, 5.0, 1.0, -math.inf),  # no limit
        (9.0, 0.2, 0.1, 10.8),
        (9.0, 0.2, 0.25, 9.6),
        (9.0, 0.0, 0.1, 9.0),
    ],
)
def test_writer_start_time(
    last_done: float | None, write_seconds: float, share: float, expected: float
) -> None:
    assert writer_start_time(last_done, write_seconds, share) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("now", "in_flight", "pending", "start", "expected"),
    [
        (5.0, True, False, -math.inf, 5.002),  # collect the reply soon
        (5.0, True, True, 9.0, 5.002),  # in flight wins: its reply comes first
        (5.0, False, False, -math.inf, math.inf),  # idle: the next due save looks again
        (5.0, False, False, 9.0, math.inf),
        (5.0, False, True, 9.0, 9.0),  # a due save waits for the pacing deadline
        (5.0, False, True, 4.0, 5.0),  # deadline passed: look now
        (5.0, False, True, -math.inf, 5.0),
    ],
)
def test_next_look(now: float, in_flight: bool, pending: bool, start: float, expected: float) -> None:
    assert next_look(now, in_flight, pending, start, 0.002) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("last_start", "cost", "budget", "expected"),
    [
        (None, 0.002, 0.02, -math.inf),  # no save begun yet this attempt
        (9.0, None, 0.02, -math.inf),  # cost not measured yet
        (9.0, 0.002, 1.0, -math.inf),  # budget 1.0: no limit
        (9.0, 0.002, 0.02, 9.1),  # 2 ms per save at 2 %: one save per 100 ms
        (9.0, 0.08, 0.02, 13.0),  # 80 ms per save: one per 4 s
        (9.0, 0.0, 0.02, 9.0),  # free saves are never held back
        (9.0, -0.001, 0.02, 9.0),  # a negative estimate counts as free
    ],
)
def test_budget_start_time(
    last_start: float | None, cost: float | None, budget: float, expected: float
) -> None:
    assert budget_start_time(last_start, cost, budget) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("stall", "flight_seconds", "flight_steps", "idle", "expected"),
    [
        (0.0005, 0.0077, 10, 0.0006, 0.0022),  # 10 steps of 0.77 ms against 0.6 ms idle
        (0.0005, 0.0050, 10, 0.0006, 0.0005),  # in-flight steps faster than idle: noise, no credit
        (0.0005, 0.0077, 10, None, 0.0005),  # idle step time unknown: the stall only
        (0.0, 0.0, 0, 0.0006, 0.0),  # nothing in flight, no stall
    ],
)
def test_save_cost(
    stall: float, flight_seconds: float, flight_steps: int, idle: float | None, expected: float
) -> None:
    assert save_cost(stall, flight_seconds, flight_steps, idle) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("previous", "value", "weight", "expected"),
    [
        (None, 3.0, 0.25, 3.0),  # first value taken as is
        (2.0, 4.0, 0.25, 2.5),
        (2.0, 4.0, 1.0, 4.0),
        (2.0, 4.0, 0.0, 2.0),
    ],
)
def test_ewma(previous: float | None, value: float, weight: float, expected: float) -> None:
    assert ewma(previous, value, weight) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("writer", "budget", "last_start", "longest", "expected"),
    [
        (-math.inf, -math.inf, None, 60.0, -math.inf),  # nothing limits the first save
        (10.8, 9.1, 9.0, 60.0, 10.8),  # the writer's share is the later limit
        (9.5, 13.0, 9.0, 60.0, 13.0),  # the budget is the later limit
        (9.5, 500.0, 9.0, 60.0, 69.0),  # a costly save waits at most every_seconds
        (200.0, 13.0, 9.0, 60.0, 69.0),  # so does a slow writer
        (9.5, 500.0, 9.0, None, 500.0),  # no every_seconds: no cap
        (9.5, 13.0, None, 60.0, 13.0),  # no save begun yet: nothing to count from
    ],
)
def test_paced_start_time(
    writer: float, budget: float, last_start: float | None, longest: float | None, expected: float
) -> None:
    assert paced_start_time(writer, budget, last_start, longest) == pytest.approx(expected)

"""The step loop's measurement of what asynchronous saves cost (ckptd.worker.checkpoint.costmeter), fed with
made-up step durations: no TensorFlow, no clock."""

from __future__ import annotations

import pytest

from ckptd.worker.checkpoint.costmeter import SAVE_COST_WEIGHT, CostMeter

IDLE = 0.0006


def one_save(meter: CostMeter, stall: float, flight: list[float], counted: bool = True) -> None:
    meter.stalled(stall)
    for seconds in flight:
        meter.step(seconds, in_flight=True)
    meter.save_done(counted)


def warm(meter: CostMeter, steps: int = 200) -> None:
    for _ in range(steps):
        meter.step(IDLE, in_flight=False)


def test_cost_is_stall_plus_slower_steps_in_flight() -> None:
    meter = CostMeter()
    warm(meter)
    one_save(meter, 0.0005, [0.0008] * 10)
    assert meter.cost == pytest.approx(0.0005 + 10 * 0.0002)
    assert (meter.measured, meter.total) == (1, pytest.approx(0.0025))


def test_moving_average_over_saves() -> None:
    meter = CostMeter()
    warm(meter)
    one_save(meter, 0.001, [])
    one_save(meter, 0.003, [])
    assert meter.cost == pytest.approx(0.001 + SAVE_COST_WEIGHT * (0.003 - 0.001))


def test_uncounted_save_leaves_no_trace() -> None:
    """A failed save, or one overlapping the writer's start-up, neither sets the cost nor leaves
    its stall and in-flight steps to the next save's account."""
    meter = CostMeter()
    warm(meter)
    one_save(meter, 0.5, [0.01] * 10, counted=False)
    assert meter.cost is None and meter.measured == 0
    one_save(meter, 0.0005, [IDLE] * 5)
    assert meter.cost == pytest.approx(0.0005)


def test_no_idle_step_yet_no_cost() -> None:
    """Without an idle step time nothing tells the slowdown apart from the step's own time."""
    meter = CostMeter()
    one_save(meter, 0.0005, [0.0008] * 10)
    assert meter.cost is None


def test_idle_steps_follow_drift_in_flight_steps_do_not() -> None:
    meter = CostMeter()
    warm(meter)
    for _ in range(50):
        meter.step(0.01, in_flight=True)  # a slow in-flight window must not raise the idle time
    assert meter.idle_step == pytest.approx(IDLE)
    warm_to = 0.0009
    for _ in range(2000):
        meter.step(warm_to, in_flight=False)
    assert meter.idle_step == pytest.approx(warm_to, rel=1e-3)

"""What asynchronous saves cost the step loop, measured while training (no TensorFlow here).

The loop reports every step's duration (and whether a save was in flight) and every stall a save
caused; a save's cost (ckptd.state.pacing.save_cost) is known when its reply is collected, and its
moving average paces the next saves (ckptd.state.pacing.budget_start_time).
"""

from __future__ import annotations

from ckptd.state.pacing import ewma, save_cost

# The idle step time follows drift over ~100 steps; a save's cost averages the last few saves
# (one save's in-flight window is a handful of noisy steps).
IDLE_STEP_WEIGHT = 0.01
SAVE_COST_WEIGHT = 0.25


class CostMeter:
    """What asynchronous saves cost the step loop, measured (see ckptd.state.pacing.save_cost):
    the loop reports every step's duration and every stall; a save's cost is known when its
    reply is collected."""

    def __init__(self) -> None:
        self.idle_step: float | None = None
        self.cost: float | None = None  # seconds of training time per save (moving average)
        self._stall = self._flight_seconds = 0.0
        self._flight_steps = 0
        self.measured, self.total = 0, 0.0  # for the run's statistics

    def step(self, seconds: float, in_flight: bool) -> None:
        if in_flight:
            self._flight_seconds += seconds
            self._flight_steps += 1
        else:
            self.idle_step = ewma(self.idle_step, seconds, IDLE_STEP_WEIGHT)

    def stalled(self, seconds: float) -> None:
        self._stall += seconds

    def save_done(self, counted: bool) -> None:
        """Close the current save's account; `counted` False for saves whose cost says nothing
        about the next ones (failed, or overlapping the writer's start-up)."""
        if counted and self.idle_step is not None:
            cost = save_cost(self._stall, self._flight_seconds, self._flight_steps, self.idle_step)
            self.cost = ewma(self.cost, cost, SAVE_COST_WEIGHT)
            self.measured += 1
            self.total += cost
        self._stall = self._flight_seconds = 0.0
        self._flight_steps = 0

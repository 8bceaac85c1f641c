"""When the asynchronous checkpoint writer may start the next save: pure functions, table-tested.

On a box where training keeps every core busy, a writer that never rests (saves due faster than it
can write them) costs training a quarter of its speed or more: writing, fsyncing and hashing a
100 MB checkpoint is real CPU and memory-bandwidth work. ckptd caps the writer's share of wall
time instead: after a write that took S seconds, the next interval save waits until
S * (1/share - 1) seconds have passed. With share 0.1 (the default) a 0.2 s write (100 MB here)
allows a commit every 2 s and a small model's 7 ms write one every 63 ms.

The writer's wall time is a poor proxy for what a save costs training, though (measured on 2 cores:
a 5.5 ms Pima commit cost ~1.9 ms of training time, a ~260 ms 104 MB commit 50-100 ms), so a second
limit caps that cost itself, CheckFreq-style: the step loop measures each save's cost (its stall
plus how much slower its steps ran while the save was in flight) and the next interval save waits
until cost / budget has passed since the previous one began. Neither limit holds a save back
longer than the job's every_seconds after the previous one began, and final and preemption saves
are never held back.
"""

from __future__ import annotations

import math


def writer_start_time(last_done: float | None, last_write_seconds: float, share: float) -> float:
    """The earliest monotonic time the next interval save may be handed to the writer (-inf: at
    once). `last_done` is when the previous write finished (None: nothing written yet this
    attempt), `last_write_seconds` how long it took, `share` the most of wall time the writer
    may spend writing (1.0: no limit)."""
    if last_done is None or share >= 1.0:
        return -math.inf
    return last_done + last_write_seconds * (1.0 / share - 1.0)


def budget_start_time(last_start: float | None, cost: float | None, budget: float) -> float:
    """The earliest monotonic time the next interval save may begin so that saves cost training
    at most `budget` of its time: `cost` (seconds of training time per save, None: not yet
    measured) after `budget` of the interval since the previous save began (`last_start`)."""
    if last_start is None or cost is None or budget >= 1.0:
        return -math.inf
    return last_start + max(cost, 0.0) / budget


def paced_start_time(
    writer_start: float, budget_start: float, last_start: float | None, longest: float | None
) -> float:
    """When the next interval save may begin: the later of the two limits, but never more than
    `longest` seconds (the job's every_seconds) after the previous save began. A save that costs
    a lot is spaced out, yet no more work than every_seconds asks may go uncommitted."""
    start = max(writer_start, budget_start)
    if last_start is not None and longest is not None:
        start = min(start, last_start + longest)
    return start


def save_cost(
    stall: float,
    flight_seconds: float,
    flight_steps: int,
    idle_step: float | None,
) -> float:
    """Training time one asynchronous save cost: the step loop's stall for it, plus what the
    steps taken while it was in flight lost against the idle step time (never negative: a
    save does not make training faster, a noisy window only looks like it)."""
    excess = 0.0 if idle_step is None else flight_seconds - flight_steps * idle_step
    return stall + max(excess, 0.0)


def ewma(previous: float | None, value: float, weight: float) -> float:
    """Exponentially weighted moving average; the first value is taken as is."""
    return value if previous is None else previous + weight * (value - previous)


def next_look(now: float, in_flight: bool, pending: bool, start_time: float, poll: float) -> float:
    """When the step loop should next look at the writer (monotonic seconds).

    Every `poll` seconds while a save is in flight (to collect its reply); at `start_time` (the
    pacing deadline) while a save that fell due waits for the writer; never (inf) while there
    is nothing to collect or hand over: the next save that falls due makes the loop look again.
    Looking costs the step loop ~10 µs, and a 0.6 ms step has no time to spare for idle looks."""
    if in_flight:
        return now + poll
    if not pending:
        return math.inf
    return max(now, start_time)

"""When the asynchronous checkpoint writer may start the next save: a pure function, table-tested.

On a box where training keeps every core busy, a writer that never rests (saves due faster than it
can write them) costs training a quarter of its speed or more: writing, fsyncing and hashing a
100 MB checkpoint is real CPU and memory-bandwidth work. ckptd caps the writer's share of wall
time instead: after a write that took S seconds, the next interval save waits until
S * (1/share - 1) seconds have passed. With share 0.1 (the default) a 0.2 s write (100 MB here)
allows a commit every 2 s and a small model's 7 ms write one every 63 ms. Final and preemption
saves are never held back.
"""

from __future__ import annotations

import math


def writer_may_start(now: float, last_done: float | None, last_write_seconds: float,
                     share: float) -> bool:
    """True if an interval save may be handed to the writer at `now` (monotonic seconds).

    `last_done` is when the previous write finished (None: nothing written yet this attempt),
    `last_write_seconds` how long it took, `share` the most of wall time the writer may spend
    writing (1.0: no limit)."""
    return now >= writer_start_time(last_done, last_write_seconds, share)


def writer_start_time(last_done: float | None, last_write_seconds: float, share: float) -> float:
    """The earliest monotonic time `writer_may_start` allows (-inf: at once)."""
    if last_done is None or share >= 1.0:
        return -math.inf
    return last_done + last_write_seconds * (1.0 / share - 1.0)


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

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


def writer_may_start(now: float, last_done: float | None, last_write_seconds: float,
                     share: float) -> bool:
    """True if an interval save may be handed to the writer at `now` (monotonic seconds).

    `last_done` is when the previous write finished (None: nothing written yet this attempt),
    `last_write_seconds` how long it took, `share` the most of wall time the writer may spend
    writing (1.0: no limit)."""
    if last_done is None or share >= 1.0:
        return True
    return now - last_done >= last_write_seconds * (1.0 / share - 1.0)

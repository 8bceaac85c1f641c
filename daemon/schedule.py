"""Pure decisions of the daemon: how many jobs may run, which queued jobs start now, who may act.

No I/O here: the daemon's loop observes (store, running jobs), calls these, and acts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar


@dataclass(frozen=True)
class Queued:
    job_id: str
    gpus: int  # resources.gpus of the job


def slot_count(configured: int | None, gpus: list[int]) -> int:
    """`max_concurrent_jobs` when set; else one job per GPU; a box without GPU runs one job."""
    if configured is not None:
        return configured
    return max(1, len(gpus))


def pick_jobs(
    queue: list[Queued], running: int, slots: int, free_gpus: list[int]
) -> list[tuple[str, list[int]]]:
    """Jobs to start now, in queue order, each with its GPUs.

    Strict order: when the head of the queue does not fit, nothing behind it starts (no
    backfilling), so a big job is never starved by a stream of small ones.
    """
    started: list[tuple[str, list[int]]] = []
    free = list(free_gpus)
    for q in queue:
        if running + len(started) >= slots or q.gpus > len(free):
            break
        devices, free = free[: q.gpus], free[q.gpus :]
        started.append((q.job_id, devices))
    return started


T = TypeVar("T")


def warm_wanted(enabled: bool, slots: int, running: int, likely: list[T]) -> list[T]:
    """Warm workers to keep: one per free slot (a running job's own hot spare is its business),
    each started as the user who will likely use it — `likely`: the owners of queued, running
    and recent jobs, in that order — so none waits with the daemon's identity. Nobody likely:
    none (a first job of a user pays the import once)."""
    free = max(0, slots - running) if enabled else 0
    return [likely[i % len(likely)] for i in range(free)] if likely else []


def may_act(peer_uid: int, owner_uid: int, admin: bool) -> bool:
    """A user acts on their own jobs; root and members of the admin group on all."""
    return peer_uid == 0 or admin or peer_uid == owner_uid

"""The store's record of a job's checkpoints, kept from the worker's events.

The worker is the only writer of commits; the store learns of them from `checkpoint.*` events.
A supervisor applies them as they arrive; a daemon that starts after its predecessor was lost
replays a lost attempt's whole events file first, so that `ckptd status` and the `job.started`
log line show the commits made while nobody was reading (the next worker's inventory at
restore then settles anything the events missed: a full disk, a power cut)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from ckptd.state import protocol as p
from ckptd.state.store import Store


def apply(store: Store, job_id: str, ev: dict[str, Any], replay: bool = False) -> None:
    """Record one worker event in the store if it is about checkpoints. A replay skips the
    store events that were recorded when the event was first read. A malformed line (the
    file is its owner's to write) is ignored, never fatal to the supervisor."""
    with contextlib.suppress(KeyError, TypeError, ValueError):
        _apply(store, job_id, ev, replay)


def _apply(store: Store, job_id: str, ev: dict[str, Any], replay: bool) -> None:
    kind = ev.get("event")
    if kind == p.Event.CHECKPOINT_COMMITTED:
        store.record_checkpoint(
            job_id, ev["step"], ev["epoch"], ev["path"], ev.get("metrics") or {}, ev.get("digest", "")
        )
    elif kind == p.Event.CHECKPOINT_RETIRED:
        store.retire_checkpoints(job_id, ev["steps"])
    elif kind == p.Event.CHECKPOINT_INVENTORY:
        store.reconcile_checkpoints(job_id, ev.get("checkpoints") or [])
    elif kind in (p.Event.CHECKPOINT_QUARANTINED, p.Event.CHECKPOINT_FAILED, p.Event.CHECKPOINT_COALESCED):
        if kind == p.Event.CHECKPOINT_QUARANTINED and ev.get("step") is not None:
            store.retire_checkpoints(job_id, [ev["step"]])
        if not replay:
            store.add_event(job_id, p.Event(kind), ev)


def catch_up(store: Store, job_id: str, run_root: Path) -> None:
    """Replay the job's events file (read without following symlinks, in bounded chunks)."""
    tail = p.EventTail(run_root / p.EVENTS_FILE, root=run_root)
    while True:
        before = tail.offset
        for ev in tail.read():
            apply(store, job_id, ev, replay=True)
        if tail.offset == before:
            return

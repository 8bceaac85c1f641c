"""Taking memory-tier snapshots inside the training process (docs/memory-tier.md): every
`checkpoint.memory.every_steps`, the step loop captures the state (O(1): TF's copy-on-write
freezes the values) and one writer thread copies it into the job's tmpfs tier, digests and
commits it (ckptd.worker.checkpoint.memsnap.TierWriter).

- A snapshot due on the fit loop's last step of an epoch waits for the epoch's end, as the
  durable save does, so that the epoch's validation and callbacks are in it.
- At most one snapshot is in flight: one due while the previous is still being written is
  skipped and counted (`busy` in the report), never queued: the next one is due soon.
- A snapshot whose loss or weights are not finite is never committed.
- The writer thread runs at the step loop's priority (the durable writer is niced): a snapshot's
  lag is the work a kill loses.
- Reports are throttled (a small model takes several snapshots a second): the first snapshot,
  then one `memory.snapshots` event a minute, and the last at close.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptd.state import memtier as mt
from ckptd.state.memspec import Memory
from ckptd.state.protocol import Event
from ckptd.worker.checkpoint.ckptstate import CheckpointState
from ckptd.worker.checkpoint.memsnap import Position, TierWriter
from ckptd.worker.checkpoint.snapshot import SnapshotPlan

REPORT_SECONDS = 60.0
BYTES_EVERY_SECONDS = 5.0  # the tier's size in the heartbeat: a directory walk, not per step


@dataclass
class TierStats:
    """Since the last report (reset by it), except `total` and `last_step`."""

    taken: int = 0
    busy: int = 0  # due while the previous was in flight: skipped
    failed: int = 0
    seconds: float = 0.0
    last_error: str = ""
    last_step: int | None = None
    total: int = 0

    def report(self) -> dict[str, Any]:
        return {
            "taken": self.taken,
            "busy": self.busy,
            "failed": self.failed,
            "mean_seconds": round(self.seconds / self.taken, 4) if self.taken else None,
            "last_step": self.last_step,
            "total": self.total,
        }


@dataclass
class _Result:
    step: int
    seconds: float
    error: str = ""
    bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class TierSaver:
    def __init__(
        self, state: CheckpointState, spec: Memory, tier: Path, plan: SnapshotPlan, lineage: str
    ) -> None:
        self.s, self.spec, self.tier, self.lineage = state, spec, tier, lineage
        self.plan = plan
        self.writer = TierWriter(
            tier, plan, spec.keep, lambda step, done: state.faults.in_memory(step, state.attempt, done)
        )
        self.epoch_steps: int | None = None  # set by the fit loop (defer_to_epoch_end)
        self.due_at_epoch_end = False
        self.stats = TierStats()
        self._inbox: queue.SimpleQueue[tuple[list[tuple[str, Any]], Position] | None] = queue.SimpleQueue()
        self._results: queue.SimpleQueue[_Result] = queue.SimpleQueue()
        self._in_flight = False
        self._reported_at: float | None = None
        self._failure_reported = False
        self._bytes_at = 0.0
        self.tier_bytes = 0
        self._thread = threading.Thread(target=self._serve, name="ckptd-memory-tier", daemon=True)
        self._thread.start()

    # -- the step loop --------------------------------------------------------------------

    def after_step(self, step: int, step_in_epoch: int) -> None:
        self._collect()
        if step % self.spec.every_steps:
            return
        if self.epoch_steps is not None and step_in_epoch >= self.epoch_steps:
            self.due_at_epoch_end = True
            return
        self.take()

    def epoch_recorded(self) -> None:
        if self.due_at_epoch_end:
            self.due_at_epoch_end = False
            self.take()

    def take(self) -> None:
        s = self.s
        if self._in_flight:
            self.stats.busy += 1
            return
        if any("loss" in k and not math.isfinite(v) for k, v in s.last_logs.items()):
            return  # the attempt stops at the durable save or the epoch end: nothing to keep
        for capture in s.before_save:
            capture()
        at = Position(self.lineage, s.attempt, s.step, s.epoch, s.step_in_epoch, dict(s.last_logs))
        self._in_flight = True
        self._inbox.put((self.plan.capture(), at))

    def drain(self) -> None:
        """Wait for the snapshot in flight, if any (a test fault's guard: ckptd.worker.faults)."""
        if self._in_flight:
            self._in_flight = False
            self._count(self._results.get())

    def _collect(self) -> None:
        """Results of the writer thread, read in the step loop (events and heartbeats are
        written from here only)."""
        while True:
            try:
                r = self._results.get_nowait()
            except queue.Empty:
                break
            self._in_flight = False
            self._count(r)
        now = time.monotonic()
        if self.stats.total and now - self._bytes_at >= BYTES_EVERY_SECONDS:
            self._bytes_at = now
            self.tier_bytes = mt.tier_bytes(self.tier)
            self.s.beater.beat(None, memory_tier_bytes=self.tier_bytes)

    def _count(self, r: _Result) -> None:
        st = self.stats
        if r.error:
            st.failed += 1
            st.last_error = r.error
            if not self._failure_reported:  # once; then within the throttled reports
                self._failure_reported = True
                self.s.event(Event.MEMORY_FAILED, step=r.step, error=r.error, tier=str(self.tier))
        else:
            st.taken += 1
            st.total += 1
            st.seconds += r.seconds
            st.last_step = r.step
            # Not forced: it goes out with the next regular beat (the restart policy's progress).
            self.s.beater.beat(None, memory_step=r.step)
        now = time.monotonic()
        if self._reported_at is None or now - self._reported_at >= REPORT_SECONDS:
            self.report(now)

    def report(self, now: float | None = None) -> None:
        st = self.stats
        if not (st.taken or st.busy or st.failed):
            return
        self._reported_at = time.monotonic() if now is None else now
        self.s.event(
            Event.MEMORY_SNAPSHOTS, tier=str(self.tier), last_error=st.last_error or None, **st.report()
        )
        self.stats = TierStats(last_step=st.last_step, total=st.total)

    # -- the writer thread ----------------------------------------------------------------

    def _serve(self) -> None:
        # Not niced, unlike the durable writer: how long a snapshot takes is the work a kill
        # loses, and a niced thread beside a step loop that holds every core waits seconds for
        # its CPU (1 GB, every 4 steps: 0.8-4.9 s per snapshot niced, 0.36-1.0 s not). Its CPU
        # (a copy and a digest) is bounded by `every_steps` either way.
        while (job := self._inbox.get()) is not None:
            captured, at = job
            t0 = time.monotonic()
            try:
                self.writer.write(captured, at)
                result = _Result(at.step, time.monotonic() - t0)
            except Exception as e:  # full tmpfs, a NaN weight, a removed tier: reported, training goes on
                result = _Result(at.step, time.monotonic() - t0, error=f"{type(e).__name__}: {e}")
            del captured, job  # the frozen values: held, they cost copy-on-write copies
            self._results.put(result)

    def close(self) -> None:
        """Wait for the snapshot in flight (a copy in RAM: seconds at most), then report."""
        self._inbox.put(None)
        self._thread.join(timeout=60)
        self._collect()
        self.report()
        self.writer.close()

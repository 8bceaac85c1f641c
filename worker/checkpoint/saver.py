"""Saving: interval, final and preemption commits (sync, or async through the writer), the
finite checks before them, the events about them, and the preemption stop.

The chief commits for the whole gang: every variable it saves is its own local copy (no
collective), so a member's save is a no-op.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import tensorflow as tf

from ckptd.state.ckptfiles import Manifest
from ckptd.state.protocol import Event, Phase
from ckptd.worker.checkpoint.asyncsave import AsyncSaver
from ckptd.worker.checkpoint.ckptstate import CheckpointState
from ckptd.worker.checkpoint.restorer import Storage
from ckptd.worker.checkpoint.savetypes import Saved, SaveReason, SaveStats
from ckptd.worker.distribute import is_chief
from ckptd.worker.errors import Fenced, NonFinite, Preempted, SaveFailed

INTERVAL = SaveReason.INTERVAL


class Saver:
    def __init__(self, state: CheckpointState) -> None:
        self.s = state
        self.store: Storage | None = None  # set when the restorer opened the directory (chief)
        self.stats = SaveStats()
        # Called with each commit and its reason (benchmarks count them).
        self.on_commit: list[Callable[[Manifest, str], None]] = []
        self.last_failure = ""  # the writer's error for the last save that failed
        # Before the final or preemption save: the schedule coalesces a pending interval save.
        self.closing: Callable[[], None] = lambda: None

    @property
    def async_saver(self) -> AsyncSaver | None:
        return self.store.async_saver if self.store is not None else None

    def save(self, reason: SaveReason) -> Saved:
        """Commit a checkpoint. An interval save that fails (disk full, EIO) is reported and
        training carries on from the previous commit; final and preemption saves must succeed."""
        if not is_chief():
            self.s.dirty = False
            return Saved.DONE
        t0 = time.monotonic()
        self.check_loss()  # the weights: by _save, or by the writer (a pass over every weight)
        for capture in self.s.before_save:
            capture()
        try:
            done = self._save_async(reason) if self.async_saver is not None else self._save(reason)
        except SaveFailed as e:
            self._failed(self.s.step, reason, str(e))
            self.s.beater.beat(Phase.TRAINING, force=True)
            if reason != INTERVAL:
                raise
            return Saved.FAILED
        stalled = time.monotonic() - t0
        if done and reason == INTERVAL:
            # What the step loop waited for: the whole save (sync) or the snapshot (async).
            self.stats.saves += 1
            self.stats.stall_seconds += stalled
        if self.async_saver is not None:
            self.async_saver.meter.stalled(stalled)
        return Saved.DONE if done else Saved.BUSY

    def _failed(self, step: int, reason: str, error: str) -> None:
        self.s.event(
            Event.CHECKPOINT_FAILED,
            step=step,
            reason=reason,
            error=error,
            committed_step=self.s.committed_step,
        )

    def _save(self, reason: str) -> bool:
        assert self.store is not None
        s, keeper = self.s, self.store.keeper
        self.check_weights()
        s.beater.beat(Phase.SAVING, force=True)
        t0 = time.monotonic()
        number = self.async_saver.take_number() if self.async_saver is not None else None
        m = keeper.save(s.step, s.epoch, s.step_in_epoch, s.last_logs, number)
        s.dirty = False
        self._committed(m, reason, time.monotonic() - t0, keeper.retired)
        s.beater.beat(Phase.TRAINING, force=True)
        return True

    def _committed(self, m: Manifest, reason: str, seconds: float, retired: list[Manifest]) -> None:
        assert self.store is not None
        s = self.s
        s.committed_step = m.step
        s.event(
            Event.CHECKPOINT_COMMITTED,
            number=m.number,
            step=m.step,
            epoch=m.epoch,
            path=str(self.store.keeper.dir / m.prefix),
            digest=m.digest,
            metrics=m.metrics,
            reason=reason,
            seconds=round(seconds, 4),
        )
        if retired:
            s.event(
                Event.CHECKPOINT_RETIRED, steps=[r.step for r in retired], numbers=[r.number for r in retired]
            )
        for listener in self.on_commit:
            listener(m, reason)
        # Not forced: the supervisor learns of commits from the event above; the heartbeat's copy
        # goes out with the next regular beat (a forced write per commit costs throughput when
        # async commits land every few steps).
        s.beater.beat(None, committed_step=m.step)

    def _save_async(self, reason: SaveReason) -> bool:
        saver = self.async_saver
        assert saver is not None
        if saver.died() or (not saver.is_ready() and not saver.saving()):
            # No save waits for the writer's TensorFlow import (seconds at worker start, far
            # more on a loaded box): until the writer is ready, saves are synchronous, so a
            # kill meanwhile still finds the commits every_steps asked for.
            return self._save(reason)
        if reason == INTERVAL and saver.busy():
            return False  # one in flight, or the writer paces: the schedule keeps it pending
        self.drain_async(block=True)
        s = self.s
        saver.submit(s.step, s.epoch, s.step_in_epoch, s.last_logs, reason)
        s.dirty = False
        if reason != INTERVAL and not self.drain_async(block=True):
            if not saver.died():  # its cause (ENOSPC: disk_full) goes with it, to be classified
                raise SaveFailed(f"the {reason} checkpoint was not committed: {self.last_failure}")
            self._save(reason)  # the writer died under it (OOM killer): the save must still land
        return True

    def drain_async(self, block: bool) -> bool:
        """Collect the writer's reply, if any; False if the save in flight failed."""
        if self.async_saver is None:
            return True
        reply = self.async_saver.poll(block)
        if reply is None:
            return True
        if reply.get("fenced"):
            raise Fenced(reply["error"])
        if reply.get("nonfinite"):
            raise NonFinite(reply["step"], reply["error"].removeprefix("NonFiniteSnapshot: "))
        if reply["ok"]:
            m = Manifest(**reply["manifest"])
            self._committed(m, reply["reason"], reply["seconds"], [Manifest(**r) for r in reply["retired"]])
            return True
        self.s.dirty = True
        self.last_failure = reply["error"]
        self._failed(reply["step"], reply["reason"], reply["error"])
        return False

    def check_finite(self) -> None:
        """At each epoch end (and, in parts, before each commit): a NaN/inf loss or weight
        stops the attempt."""
        self.check_loss()
        self.check_weights()

    def check_loss(self) -> None:
        logs = self.s.last_logs
        bad = [k for k, v in logs.items() if "loss" in k and not math.isfinite(v)]
        if bad:
            raise NonFinite(self.s.step, f"{bad[0]} is {logs[bad[0]]}")

    def check_weights(self) -> None:
        weights = self.s.weights
        if weights and not bool(
            tf.reduce_all([tf.reduce_all(tf.math.is_finite(tf.convert_to_tensor(v))) for v in weights])
        ):
            raise NonFinite(self.s.step, "a weight is NaN or infinite")

    def last_save(self, reason: SaveReason) -> None:
        """The final or preemption commit (if anything changed since the last one), waited for."""
        self.closing()
        if self.s.dirty:
            self.save(reason)
        self.drain_async(block=True)

    def preempt(self) -> None:
        """After the schedule's closing(): save, then stop the worker (errors.Preempted)."""
        s = self.s
        if not is_chief():
            # A gang's chief saves for every member. A member that left now could abandon the
            # chief inside a collective before it saved: it trains on until the chief has left
            # and the supervisor (or srun) ends it. Its heartbeat says it was asked, so a notice
            # that reached this member only is relayed to the chief.
            if not s.beater.hb.stop_requested:
                s.beater.beat(None, force=True, stop_requested=s.stop.signum or 15)
            return
        self.last_save(SaveReason.PREEMPTED)
        s.event(Event.WORKER_PREEMPTED, signal=s.stop.signum, step=s.step)
        raise Preempted()

    def finish(self) -> None:
        self.last_save(SaveReason.FINAL)
        meter = self.async_saver.meter if self.async_saver is not None else None
        if meter is not None and meter.measured:
            self.stats.save_cost_seconds = meter.total / meter.measured  # mean (benchmarks)

    def close(self) -> None:
        if self.async_saver is not None:
            self.async_saver.close()

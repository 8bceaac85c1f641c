"""A job's checkpointing inside the training process: the counters and the checkpoint object,
restore, interval / final / preemption saves (sync or async), and the events about them.

Shared by ckptd's own fit loop (ckptd.worker.loop) and by custom training loops
(ckptd.worker.session): both count steps with `step_done` and close epochs with `epoch_done`.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any

import tensorflow as tf

from ckptd.state.ckptfiles import Manifest
from ckptd.state.jobspec import JobSpec
from ckptd.state.paths import RunDir
from ckptd.state.protocol import EVENTS_FILE, NAN_RESTARTS_ENV, Event, Phase, append_event
from ckptd.worker.asyncsave import AsyncSaver
from ckptd.worker.distribute import check_gang, is_chief, job_strategy, multi_worker
from ckptd.worker.errors import Fenced, NonFinite, Preempted, SaveFailed
from ckptd.worker.faults import Faults
from ckptd.worker.keeper import Keeper, restore_readonly
from ckptd.worker.prep import Counters
from ckptd.worker.runtime import Beater, StopFlag
from ckptd.worker.saveschedule import SaveSchedule
from ckptd.worker.trackables import HostRandom, keras_global_generator, untracked_variables
from ckptd.worker.writer import Writer


class Saved(StrEnum):
    DONE = "done"  # committed (sync) or handed to the writer (async)
    BUSY = "busy"  # async interval save: the writer is busy or paces; try again later
    FAILED = "failed"  # an interval save that failed (reported); training goes on


class Checkpointing:
    def __init__(
        self,
        spec: JobSpec,
        run: RunDir,
        trackables: dict[str, Any],
        state_variables: list[Any],
        beater: Beater,
        stop: StopFlag,
        writer: Writer | None = None,
    ) -> None:
        self.spec, self.run, self.beater, self.stop = spec, run, beater, stop
        self.c = Counters.new()
        self.rng = tf.random.Generator.from_seed(spec.train.seed)
        tf.random.set_global_generator(self.rng)
        self.host_random = HostRandom()
        self.ckpt = tf.train.Checkpoint(
            **trackables,
            step=self.c.step,
            epoch=self.c.epoch,
            step_in_epoch=self.c.step_in_epoch,
            host_state=self.c.host,
            rng=self.rng,
            keras_rng=keras_global_generator().state,
            host_rng=self.host_random.var,
        )
        # Seed-generator states and whatever else the objects' graphs do not reach.
        self.ckpt.untracked = untracked_variables(self.ckpt, state_variables)
        self.writer = writer
        self.faults = Faults.from_env()
        self.async_saver: AsyncSaver | None = None
        self.schedule = SaveSchedule(spec.checkpoint, self)
        # Called with each commit and its reason (benchmarks count them).
        self.on_commit: list[Callable[[Manifest, str], None]] = []
        self.committed_step: int | None = None
        # Per attempt: time in the step loops, and how long saves stalled them (benchmarks).
        self.stats = {
            "due": 0,
            "saves": 0,
            "stall_seconds": 0.0,
            "poll_seconds": 0.0,
            "loop_seconds": 0.0,
            "steps": 0,
        }
        self.dirty = False
        self.last_failure = ""  # the writer's error for the last save that failed
        self.last_logs: dict[str, float] = {}
        # State kept outside TF variables, written into the checkpoint's variables per save.
        self.before_save: list[Callable[[], None]] = [self.host_random.capture]
        self.weights = [
            v for v in state_variables if getattr(v, "trainable", False) and "float" in str(v.dtype)
        ]
        self.learning_rates = [
            v
            for v in state_variables
            if str(getattr(v, "path", getattr(v, "name", ""))).endswith("learning_rate")
        ]

    def event(self, kind: Event, **data: Any) -> None:
        try:
            append_event(self.run.root / EVENTS_FILE, kind, attempt=self.beater.hb.attempt, **data)
        except OSError as e:  # a full disk must not stop training; the inventory at the next
            # restore tells the supervisor about commits whose events were lost here
            print(f"ckptd worker: event {kind} not recorded: {e}", file=sys.stderr)

    @property
    def step(self) -> int:
        return int(self.c.step.numpy())

    # -- restore ------------------------------------------------------------------------------

    def open(self) -> None:
        """Touch the checkpoint directory only now, with its lock held: a hot spare builds its
        loop while the previous worker may still own the directory."""
        ck = self.spec.checkpoint
        ckdir = self.run.checkpoint_dir(ck.dir)
        attempt: Callable[[], int] = lambda: self.beater.hb.attempt  # noqa: E731
        self.keeper = Keeper(
            ckdir,
            self.ckpt,
            ck.max_to_keep,
            ck.keep_every_n_hours,
            self.event,
            before_commit=lambda step: self.faults.in_save(step, attempt()),
            during_restore=lambda: self.faults.in_restore(attempt()),
        )
        # The manifest says who committed: the attempt fences a stale gang (keeper.Fenced).
        world = self.spec.distribute.nodes if self.spec.distribute.strategy == "multi_worker" else 1
        replicas = int(job_strategy().num_replicas_in_sync)
        self.keeper.who = (self.beater.hb.attempt, world or 1, replicas)
        if ck.mode == "async":
            self.async_saver = AsyncSaver(
                self.ckpt,
                ckdir,
                ck.max_to_keep,
                ck.keep_every_n_hours,
                self.writer,
                ck.async_writer_share,
                ck.async_overhead_budget,
                ck.every_seconds,
                finite=self.weights,
            )
            self.async_saver.who = self.keeper.who
            self.async_saver.paced = ck.every_steps == "auto"

    def restore(self) -> Manifest | None:
        """Restore the newest valid commit into the checkpoint's objects (None: fresh start)."""
        self.beater.beat(Phase.RESTORING)
        if not is_chief():
            return self._restore_as_member()
        self.open()
        manifest = self.keeper.restore()  # quarantines damaged commits before GC sees them
        if restarts := int(os.environ.get(NAN_RESTARTS_ENV, "0")):  # restart.on_nan: restart
            self.lower_learning_rate(restarts, self.spec.restart.nan_lr_factor)
        removed = self.keeper.collect_garbage()
        if removed:
            self.event(Event.CHECKPOINT_GC, removed=removed)
        # What is on disk, for the supervisor's store: commits and retirements made after it
        # last read this worker's events (its crash, a power cut) would otherwise never reach it.
        self.event(
            Event.CHECKPOINT_INVENTORY,
            checkpoints=[
                {
                    "step": m.step,
                    "epoch": m.epoch,
                    "path": str(self.keeper.dir / m.prefix),
                    "digest": m.digest,
                    "metrics": m.metrics,
                }
                for m in self.keeper.committed()
            ],
        )
        if self.async_saver is not None:
            self.async_saver.prepare(manifest)
            if self.faults.writer_first:
                self.async_saver.wait_ready()
        return self._restored(manifest)

    def _restore_as_member(self) -> Manifest | None:
        """A gang member other than the chief reads the chief's newest valid commit; the chief
        alone quarantines, collects garbage and commits."""
        ckdir = self.run.checkpoint_dir(self.spec.checkpoint.dir)
        manifest = restore_readonly(
            ckdir, self.ckpt, lambda m, why: self.event(Event.RESTORE_SKIPPED, number=m.number, reason=why)
        )
        return self._restored(manifest)

    def _restored(self, manifest: Manifest | None) -> Manifest | None:
        strategy = job_strategy()
        if multi_worker(strategy):
            ckdir = self.run.checkpoint_dir(self.spec.checkpoint.dir)
            check_gang(strategy, ckdir, self.beater.hb.attempt, manifest.step if manifest is not None else 0)
        if manifest is None:
            self.event(Event.RESTORE_FRESH, reason="no committed checkpoint")
            return None
        self.host_random.apply()
        # The last step's logs become the epoch's logs if the commit fell on its last step.
        self.last_logs = dict(manifest.metrics)
        self.committed_step = manifest.step
        self.event(Event.RESTORE_DONE, number=manifest.number, step=manifest.step, epoch=manifest.epoch)
        self.beater.beat(
            restored_step=manifest.step,
            committed_step=manifest.step,
            step=manifest.step,
            epoch=manifest.epoch,
        )
        return manifest

    # -- saving -------------------------------------------------------------------------------

    def save(self, reason: str) -> Saved:
        """Commit a checkpoint. An interval save that fails (disk full, EIO) is reported and
        training carries on from the previous commit; final and preemption saves must succeed."""
        if not is_chief():  # the chief commits for the whole gang (every variable it saves
            self.dirty = False  # is its own local copy: no collective, no member takes part)
            return Saved.DONE
        t0 = time.monotonic()
        self.check_loss()  # the weights: by _save, or by the writer (a pass over every weight)
        for capture in self.before_save:
            capture()
        try:
            if self.async_saver is not None:
                done = self._save_async(reason)
            else:
                self._save(reason)
                done = True
            stalled = time.monotonic() - t0
            if done and reason == "interval":
                # What the step loop waited for: the whole save (sync) or the snapshot (async).
                self.stats["saves"] += 1
                self.stats["stall_seconds"] += stalled
            if self.async_saver is not None:
                self.async_saver.meter.stalled(stalled)
            return Saved.DONE if done else Saved.BUSY
        except SaveFailed as e:
            self.event(
                Event.CHECKPOINT_FAILED,
                step=self.step,
                reason=reason,
                error=str(e),
                committed_step=self.committed_step,
            )
            self.beater.beat(Phase.TRAINING, force=True)
            if reason != "interval":
                raise
            return Saved.FAILED

    def _save(self, reason: str) -> None:
        self.check_weights()
        self.beater.beat(Phase.SAVING, force=True)
        step, epoch = self.step, int(self.c.epoch.numpy())
        t0 = time.monotonic()
        number = self.async_saver.take_number() if self.async_saver is not None else None
        m = self.keeper.save(step, epoch, int(self.c.step_in_epoch.numpy()), self.last_logs, number)
        self.dirty = False
        self._committed(m, reason, time.monotonic() - t0, self.keeper.retired)
        self.beater.beat(Phase.TRAINING, force=True)

    def _committed(self, m: Manifest, reason: str, seconds: float, retired: list[Manifest]) -> None:
        self.committed_step = m.step
        self.event(
            Event.CHECKPOINT_COMMITTED,
            number=m.number,
            step=m.step,
            epoch=m.epoch,
            path=str(self.keeper.dir / m.prefix),
            digest=m.digest,
            metrics=m.metrics,
            reason=reason,
            seconds=round(seconds, 4),
        )
        if retired:
            self.event(
                Event.CHECKPOINT_RETIRED, steps=[r.step for r in retired], numbers=[r.number for r in retired]
            )
        for listener in self.on_commit:
            listener(m, reason)
        # Not forced: the supervisor learns of commits from the event above; the heartbeat's copy
        # goes out with the next regular beat (a forced write per commit costs throughput when
        # async commits land every few steps).
        self.beater.beat(None, committed_step=m.step)

    def _save_async(self, reason: str) -> bool:
        saver = self.async_saver
        assert saver is not None
        if saver.dead or (not saver.is_ready() and saver.in_flight is None):
            # No save waits for the writer's TensorFlow import (seconds at worker start, far
            # more on a loaded box): until the writer is ready, saves are synchronous, so a
            # kill meanwhile still finds the commits every_steps asked for.
            self._save(reason)
            return True
        if reason == "interval" and saver.busy():
            return False  # one in flight, or the writer paces: the schedule keeps it pending
        self.drain_async(block=True)
        saver.submit(
            self.step, int(self.c.epoch.numpy()), int(self.c.step_in_epoch.numpy()), self.last_logs, reason
        )
        self.dirty = False
        if reason != "interval" and not self.drain_async(block=True):
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
        self.dirty = True
        self.last_failure = reply["error"]
        self.event(
            Event.CHECKPOINT_FAILED,
            step=reply["step"],
            reason=reply["reason"],
            error=reply["error"],
            committed_step=self.committed_step,
        )
        return False

    # -- the step loop's hooks ----------------------------------------------------------------

    def count(self, logs: dict[str, float]) -> None:
        """Count the step just taken (its heartbeat goes out before `after_step`)."""
        self.c.step.assign_add(1)
        self.c.step_in_epoch.assign_add(1)
        self.dirty = True
        self.last_logs = logs

    def after_step(self, step_seconds: float) -> None:
        """Save if due, stop if asked, inject test faults."""
        self.schedule.after_step(step_seconds)
        if self.stop.requested:
            self.preempt()
        step = self.step
        self.schedule.interval(step, int(self.c.step_in_epoch.numpy()))
        self.faults.after_step(step, self.beater.hb.attempt)

    def check_finite(self) -> None:
        """At each epoch end (and, in parts, before each commit): a NaN/inf loss or weight
        stops the attempt."""
        self.check_loss()
        self.check_weights()

    def check_loss(self) -> None:
        bad = [k for k, v in self.last_logs.items() if "loss" in k and not math.isfinite(v)]
        if bad:
            raise NonFinite(self.step, f"{bad[0]} is {self.last_logs[bad[0]]}")

    def check_weights(self) -> None:
        if self.weights and not bool(
            tf.reduce_all([tf.reduce_all(tf.math.is_finite(tf.convert_to_tensor(v))) for v in self.weights])
        ):
            raise NonFinite(self.step, "a weight is NaN or infinite")

    def lower_learning_rate(self, restarts: int, factor: float) -> None:
        """restart.on_nan: restart: the k-th attempt after a non-finite one trains at
        learning_rate * factor**k (from the restored value, so it compounds once)."""
        for v in self.learning_rates:
            before = float(tf.convert_to_tensor(v))
            v.assign(before * factor**restarts)
            self.event(
                Event.NAN_LEARNING_RATE_LOWERED,
                variable=str(getattr(v, "path", v.name)),
                before=before,
                after=before * factor**restarts,
                nan_restarts=restarts,
            )
        if not self.learning_rates:
            self.event(
                Event.NAN_LEARNING_RATE_NOT_FOUND,
                nan_restarts=restarts,
                hint="a LearningRateSchedule cannot be lowered; the attempt retries as is",
            )

    def epoch_done(self) -> None:
        self.check_finite()
        self.c.epoch.assign_add(1)
        self.c.step_in_epoch.assign(0)
        self.dirty = True

    def preempt(self) -> None:
        if not is_chief():
            # A gang's chief saves for every member. A member that left now could abandon the
            # chief inside a collective before it saved: it trains on until the chief has left
            # and the supervisor (or srun) ends it. Its heartbeat says it was asked, so a notice
            # that reached this member only is relayed to the chief.
            if not self.beater.hb.stop_requested:
                self.beater.beat(None, force=True, stop_requested=self.stop.signum or 15)
            return
        self.schedule.closing()  # a pending interval save is coalesced into this one
        if self.dirty:
            self.save("preempted")
        self.drain_async(block=True)
        self.event(Event.WORKER_PREEMPTED, signal=self.stop.signum, step=self.step)
        raise Preempted()

    def finish(self) -> None:
        """The final commit (if anything changed since the last one), waited for."""
        self.schedule.closing()
        if self.dirty:
            self.save("final")
        self.drain_async(block=True)
        meter = self.async_saver.meter if self.async_saver is not None else None
        if meter is not None and meter.measured:
            self.stats["save_cost_seconds"] = meter.total / meter.measured  # mean (benchmarks)

    def close(self) -> None:
        if self.async_saver is not None:
            self.async_saver.close()

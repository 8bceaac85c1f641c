"""The training loop: restore → train steps → checkpoint → epoch end (validation, history, best
file, early stopping) → final save. Everything that affects the result lives in the checkpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import tensorflow as tf
from ckptd.state.ckptfiles import Manifest
from ckptd.state.durable import atomic_write_text
from ckptd.state.jobspec import JobSpec
from ckptd.state.paths import RunDir
from ckptd.state.protocol import EVENTS_FILE, append_event
from ckptd.worker.asyncsave import AsyncSaver
from ckptd.worker.data import Batches
from ckptd.worker.entry import Built
from ckptd.worker.faults import Faults
from ckptd.worker.h5export import check_readable, save_weights_file
from ckptd.worker.hoststate import HostState
from ckptd.worker.keeper import Keeper, SaveFailed
from ckptd.worker.prep import Counters, floats, history_csv, make_trackers
from ckptd.worker.runtime import Beater, StopFlag
from ckptd.worker.tracking import better_of
from ckptd.worker.validate import evaluate
from ckptd.worker.writer import Writer

# While a save is in flight the step loop looks at the writer (a pipe poll) at most this often:
# every step it cost ~12 µs, 2 % of a 0.6 ms Pima step; a reply noticed 2 ms late changes nothing.
ASYNC_POLL_SECONDS = 0.002


class Preempted(Exception):
    """Stopped on SIGTERM/SIGINT after saving: 0 steps lost."""


class Loop:
    def __init__(self, spec: JobSpec, run: RunDir, built: Built, batches: Batches,
                 beater: Beater, stop: StopFlag, writer: Writer | None = None) -> None:
        self.spec, self.run, self.model, self.batches = spec, run, built.model, batches
        self.beater, self.stop = beater, stop
        self.c = Counters.new()
        best, early = make_trackers(spec)
        self.host = HostState(best=best, early=early)
        self.best_weights: list[tf.Variable] = []
        if early and early.restore_best_weights:
            self.best_weights = [tf.Variable(w, trainable=False) for w in self.model.get_weights()]
        self.rng = tf.random.Generator.from_seed(spec.train.seed)
        tf.random.set_global_generator(self.rng)
        ckpt = tf.train.Checkpoint(model=self.model, optimizer=self.model.optimizer,
                                   step=self.c.step, epoch=self.c.epoch,
                                   step_in_epoch=self.c.step_in_epoch, host_state=self.c.host,
                                   rng=self.rng, best_weights=self.best_weights,
                                   metrics=list(self.model.metrics_variables))
        self.ckpt = ckpt
        self.writer = writer
        self.faults = Faults.from_env()
        self.async_saver: AsyncSaver | None = None
        self.save_pending = False
        self.poll_at = 0.0
        self.first_step_seen = False
        self.committed_step: int | None = None
        # Per attempt: time in the step loops, and how long saves stalled them (benchmarks).
        self.stats = {"due": 0, "saves": 0, "stall_seconds": 0.0, "poll_seconds": 0.0,
                      "loop_seconds": 0.0, "steps": 0}
        self.dirty = False
        self.last_logs: dict[str, float] = {}
        self._sync_host()

    def _fault_in_save(self, step: int) -> None:
        self.faults.in_save(step, self.beater.hb.attempt)

    def event(self, kind: str, **data: Any) -> None:
        append_event(self.run.root / EVENTS_FILE, kind, attempt=self.beater.hb.attempt, **data)

    # -- restore ------------------------------------------------------------------------------

    def open_checkpoints(self) -> None:
        """Touch the checkpoint directory only now, with its lock held: a hot spare builds its
        Loop while the previous worker may still own the directory."""
        ck = self.spec.checkpoint
        ckdir = self.run.checkpoint_dir(ck.dir)
        self.keeper = Keeper(ckdir, self.ckpt, ck.max_to_keep, ck.keep_every_n_hours, self.event,
                             before_commit=self._fault_in_save,
                             during_restore=lambda: self.faults.in_restore(self.beater.hb.attempt))
        if ck.mode == "async":
            self.async_saver = AsyncSaver(self.ckpt, ckdir, ck.max_to_keep, ck.keep_every_n_hours,
                                          self.writer, ck.async_writer_share,
                                          ck.async_overhead_budget, ck.every_seconds)

    def restore(self) -> Manifest | None:
        self.beater.beat("restoring")
        self.open_checkpoints()
        manifest = self.keeper.restore()  # quarantines damaged commits before GC sees them
        removed = self.keeper.collect_garbage()
        if removed:
            self.event("checkpoint.gc", removed=removed)
        if self.async_saver is not None:
            self.async_saver.prepare(manifest)
        if manifest is None:
            self.event("restore.fresh", reason="no committed checkpoint")
            return None
        self.host = HostState.loads(self.c.host.numpy().decode(), self.host.best, self.host.early)
        self._merge_best_sidecar()
        self._sync_host()
        self.committed_step = manifest.step
        self.event("restore.done", number=manifest.number, step=manifest.step,
                   epoch=manifest.epoch)
        self.beater.beat(restored_step=manifest.step, committed_step=manifest.step,
                         step=manifest.step, epoch=manifest.epoch)
        self.write_history()
        return manifest

    def _merge_best_sidecar(self) -> None:
        """A best file may have been written after the checkpoint we restored: never let a
        worse value overwrite it."""
        best = self.host.best
        if best is None or not self.run.best_state.exists():
            return
        try:
            side = json.loads(self.run.best_state.read_text())
        except (OSError, ValueError):
            return
        path = Path(str(side.get("path", "")))
        if path.suffix in (".h5", ".hdf5") and (problem := check_readable(path)):
            # The recorded best file is gone or damaged: its value protects nothing.
            self.event("best.unreadable", path=str(path), reason=problem)
            return
        if side.get("monitor") == best.monitor and side.get("mode") == best.mode:
            merged = better_of(best.mode, best.best, side.get("best"))
            if merged != best.best:
                best.best, best.best_epoch = merged, side.get("epoch")

    # -- saving -------------------------------------------------------------------------------

    def save(self, reason: str) -> bool:
        """Commit a checkpoint. An interval save that fails (disk full, EIO) is reported and
        training carries on from the previous commit; final and preemption saves must succeed."""
        t0 = time.monotonic()
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
            return done
        except SaveFailed as e:
            self.event("checkpoint.failed", step=int(self.c.step.numpy()), reason=reason,
                       error=str(e), committed_step=self.committed_step)
            self.beater.beat("training", force=True)
            if reason != "interval":
                raise
            return False

    def _sync_host(self) -> None:
        """Host state changes only at epoch ends (and restores): serialise it then, not per save."""
        self.c.host.assign(self.host.dumps())

    def _save(self, reason: str) -> None:
        self.beater.beat("saving", force=True)
        step, epoch = int(self.c.step.numpy()), int(self.c.epoch.numpy())
        t0 = time.monotonic()
        number = self.async_saver.take_number() if self.async_saver is not None else None
        m = self.keeper.save(step, epoch, int(self.c.step_in_epoch.numpy()), self.last_logs,
                             number)
        self.dirty = False
        self._committed(m, reason, time.monotonic() - t0, self.keeper.retired)
        self.beater.beat("training", force=True)

    def _committed(self, m: Manifest, reason: str, seconds: float,
                   retired: list[Manifest]) -> None:
        self.committed_step = m.step
        self.event("checkpoint.committed", number=m.number, step=m.step, epoch=m.epoch,
                   path=str(self.keeper.dir / m.prefix), digest=m.digest, metrics=m.metrics,
                   reason=reason, seconds=round(seconds, 4))
        if retired:
            self.event("checkpoint.retired", steps=[r.step for r in retired],
                       numbers=[r.number for r in retired])
        # Not forced: the supervisor learns of commits from the event above; the heartbeat's copy
        # goes out with the next regular beat. A forced write (new file + rename, ~0.25 ms here)
        # per commit cost 0.4 % of throughput when async commits land every 60 ms.
        self.beater.beat(None, committed_step=m.step)

    # -- asynchronous saving ------------------------------------------------------------------

    def _save_async(self, reason: str) -> bool:
        saver = self.async_saver
        assert saver is not None
        if saver.dead or (reason != "interval" and not saver.is_ready()
                          and saver.in_flight is None):
            # A final or preemption save does not wait for the writer's TensorFlow import
            # (seconds, at worker start); interval snapshots wait for it in shared memory.
            self._save(reason)
            return True
        if reason == "interval" and saver.busy():
            self.save_pending = True  # one in flight, or the writer paces: save when it may
            self.poll_at = 0.0  # the next step works out when to look again
            return False
        self.drain_async(block=True)
        saver.submit(int(self.c.step.numpy()), int(self.c.epoch.numpy()),
                     int(self.c.step_in_epoch.numpy()), self.last_logs, reason)
        self.save_pending = self.dirty = False
        self.poll_at = 0.0
        if reason != "interval" and not self.drain_async(block=True):
            raise SaveFailed(f"the {reason} checkpoint was not committed")
        return True

    def drain_async(self, block: bool) -> bool:
        """Collect the writer's reply, if any; False if the save in flight failed."""
        if self.async_saver is None:
            return True
        reply = self.async_saver.poll(block)
        if reply is None:
            return True
        if reply["ok"]:
            m = Manifest(**reply["manifest"])
            self._committed(m, reply["reason"], reply["seconds"],
                            [Manifest(**r) for r in reply["retired"]])
            return True
        self.dirty = True
        self.event("checkpoint.failed", step=reply["step"], reason=reply["reason"],
                   error=reply["error"], committed_step=self.committed_step)
        return False

    def write_history(self) -> None:
        atomic_write_text(self.run.history, history_csv(self.host.history))

    # -- training -----------------------------------------------------------------------------

    def train(self) -> None:
        cfg = self.spec.train
        last_save = time.monotonic()
        self.beater.beat("training", force=True, epochs=cfg.epochs,
                         steps_per_epoch=self.batches.steps_per_epoch)
        while int(self.c.epoch.numpy()) < cfg.epochs and not self.host.stopped_early:
            epoch = int(self.c.epoch.numpy())
            start = int(self.c.step_in_epoch.numpy())
            if start == 0:
                self.model.reset_metrics()
            t_epoch = time.monotonic()
            for x, y in self.batches.epoch(epoch, start):
                t_step = time.monotonic()
                logs = self._train_step(x, y)
                self.c.step.assign_add(1)
                self.c.step_in_epoch.assign_add(1)
                self.dirty = True
                self.last_logs = floats(logs)
                self._beat_step(epoch, len(y), t_epoch, start)
                if self.stats["steps"] == 0 and not self.first_step_seen:
                    self.first_step_seen = True  # recovery time ends here (benchmarks)
                    self.event("training.first_step", step=int(self.c.step.numpy()))
                if self.async_saver is not None:
                    self._step_async(time.monotonic() - t_step)
                if self.stop.requested:
                    self._preempt()
                step = int(self.c.step.numpy())
                last_save = self._interval_save(step, last_save)
                self.faults.after_step(step, self.beater.hb.attempt)
            self.host.train_seconds += time.monotonic() - t_epoch
            self.stats["loop_seconds"] += time.monotonic() - t_epoch
            self.stats["steps"] += int(self.c.step_in_epoch.numpy()) - start
            self.epoch_end(epoch)
            if self.stop.requested:
                self._preempt()
        self.finish()

    def _train_step(self, x: Any, y: Any) -> dict[str, Any]:
        # Keras 3's train_on_batch resets the metrics on every call; fit() does not. Call the
        # compiled train function the way fit() does so epoch metrics accumulate as in fit().
        logs: dict[str, Any] = self.model.train_function(iter([(x, y, None)]))
        return logs

    def _interval_save(self, step: int, last_save: float) -> float:
        """Save if one is due at `step`; returns when the last interval save fell due."""
        ck = self.spec.checkpoint
        if (ck.every_steps and step % ck.every_steps == 0) or (
                ck.every_seconds and time.monotonic() - last_save >= ck.every_seconds):
            self.stats["due"] += 1
            if not self.save_pending:  # else _step_async takes it when the writer may
                self.save("interval")
            return time.monotonic()
        return last_save

    def _step_async(self, step_seconds: float) -> None:
        saver = self.async_saver
        assert saver is not None
        saver.meter.step(step_seconds, saver.in_flight is not None)
        now = time.monotonic()
        if now < self.poll_at:
            return
        self.drain_async(block=False)
        may_save = self.save_pending and not saver.busy()
        self.poll_at = saver.next_look(now, self.save_pending and not may_save, ASYNC_POLL_SECONDS)
        looked = time.monotonic() - now
        self.stats["poll_seconds"] += looked
        saver.meter.stalled(looked)
        if may_save:
            self.save("interval")

    def _beat_step(self, epoch: int, batch_len: int, t_epoch: float, start: int) -> None:
        done = int(self.c.step_in_epoch.numpy()) - start
        elapsed = time.monotonic() - t_epoch
        rate = done * self.spec.train.batch_size / elapsed if elapsed > 0 else None
        self.beater.beat("training", step=int(self.c.step.numpy()), epoch=epoch,
                         loss=self.last_logs.get("loss"), logs=self.last_logs,
                         examples_per_sec=rate)

    def _preempt(self) -> None:
        if self.dirty:
            self.save("preempted")
        self.drain_async(block=True)
        self.event("worker.preempted", signal=self.stop.signum, step=int(self.c.step.numpy()))
        raise Preempted()

    def epoch_end(self, epoch: int) -> None:
        self.beater.beat("validating", force=True)
        logs = dict(self.last_logs)
        val = self.batches.validation_batches()
        if val is not None:
            logs.update({f"val_{k}": v for k, v in evaluate(self.model, val).items()})
        self.host.history.append({"epoch": epoch, **logs})
        self.write_history()
        self.event("epoch.end", epoch=epoch, step=int(self.c.step.numpy()), logs=logs)
        self._best_file(epoch, logs)
        self._early_stopping(epoch, logs)
        self.c.epoch.assign_add(1)
        self.c.step_in_epoch.assign(0)
        self._sync_host()
        self.dirty = True
        self.beater.beat("training", force=True, epoch=epoch + 1, logs=logs)

    def _best_file(self, epoch: int, logs: dict[str, float]) -> None:
        best = self.host.best
        if best is None:
            return
        if best.monitor not in logs:
            self.event("best.monitor_missing", monitor=best.monitor, available=sorted(logs))
            return
        name = best.decide(epoch, logs)
        if name is None:
            return
        path = self.run.output_path(name)
        save_weights_file(self.model, path)
        atomic_write_text(self.run.best_state, json.dumps({
            "monitor": best.monitor, "mode": best.mode, "best": best.best,
            "epoch": best.best_epoch, "path": str(path)}))
        self.event("best.saved", epoch=epoch, path=str(path), monitor=best.monitor,
                   value=logs[best.monitor])

    def _early_stopping(self, epoch: int, logs: dict[str, float]) -> None:
        early = self.host.early
        if early is None:
            return
        snapshot, stop = early.update(epoch, logs)
        if snapshot:
            for var, w in zip(self.best_weights, self.model.get_weights(), strict=True):
                var.assign(w)
        if stop:
            self.host.stopped_early = True
            self.event("early_stopping.stopped", epoch=epoch, best=early.best,
                       best_epoch=early.best_epoch)

    def close(self) -> None:
        if self.async_saver is not None:
            self.async_saver.close()

    def finish(self) -> None:
        early = self.host.early
        if early and early.restore_best_weights and self.host.stopped_early and self.dirty:
            self.model.set_weights([v.numpy() for v in self.best_weights])
        if self.dirty:
            self.save("final")
        self.drain_async(block=True)
        meter = self.async_saver.meter if self.async_saver is not None else None
        if meter is not None and meter.measured:
            self.stats["save_cost_seconds"] = meter.total / meter.measured  # mean (benchmarks)
        self.beater.beat("done", force=True)
        self.event("training.done", step=int(self.c.step.numpy()),
                   epochs=len(self.host.history), stopped_early=self.host.stopped_early,
                   **{k: round(v, 6) for k, v in self.stats.items()})

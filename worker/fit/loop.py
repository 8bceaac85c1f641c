"""ckptd's fit loop: restore → train steps → checkpoint → epoch end → final save.

The Loop runs steps and heartbeats; ckptd.worker.checkpoint.checkpointing makes and restores the commits
(through its restorer and saver; ckptd.worker.checkpoint.saveschedule decides when); ckptd.worker.fit.epochend
does validation, callbacks, best file and early stopping. Everything that affects the result lives in the
checkpoint."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import tensorflow as tf

from ckptd.state.jobspec import JobSpec
from ckptd.state.paths import RunDir
from ckptd.state.protocol import Event, Phase
from ckptd.worker.checkpoint.checkpointing import Checkpointing
from ckptd.worker.checkpoint.hoststate import HostState
from ckptd.worker.checkpoint.trackables import model_state_variables, replica_parts
from ckptd.worker.checkpoint.writer import Writer
from ckptd.worker.distribute import ReplicaFeed, replicas
from ckptd.worker.fit import callbacks as cbs
from ckptd.worker.fit.epochend import EpochEnd
from ckptd.worker.fit.outputs import EpochOutputs
from ckptd.worker.fit.prep import floats, make_trackers
from ckptd.worker.runtime import Beater, StopFlag


def report_exactness(event: Any, causes: list[str]) -> None:
    """In the first log lines: every reason a resumed run might differ, never a silent one."""
    for cause in causes:
        event(Event.EXACTNESS_WARNING, cause=cause)
        print(f"ckptd: resume may not be bit-identical: {cause}", file=sys.stderr, flush=True)


class Loop:
    def __init__(
        self,
        spec: JobSpec,
        run: RunDir,
        model: Any,
        data: Any,
        step_fn: Any,
        beater: Beater,
        stop: StopFlag,
        writer: Writer | None = None,
        fit: Any = None,
    ) -> None:
        self.run, self.model, self.data, self.step_fn = run, model, data, step_fn
        self.beater, self.stop = beater, stop
        self.epochs = fit.epochs if fit is not None else spec.train.epochs
        self.batch_size = getattr(data, "batch_size", spec.train.batch_size)
        self.spec, user_callbacks, notes = cbs.map_callbacks(fit.callbacks if fit else [], spec)
        best, early = make_trackers(self.spec)
        self.host = HostState(best=best, early=early, replicas=replicas(model.distribute_strategy))
        self.out = EpochOutputs(run, model, self.host, self.event)
        self.callbacks_var = tf.Variable("", dtype=tf.string, trainable=False)
        optimizer = model.optimizer if model.optimizer is not None else []  # a GAN has none
        self.ck = Checkpointing(
            self.spec,
            run,
            {
                "model": model,
                "optimizer": optimizer,
                "best_weights": self.out.best_weights,
                "metrics": replica_parts(model.metrics_variables),
                "callbacks": self.callbacks_var,
                "data_state": data.state_variables(),
            },
            replica_parts(model_state_variables(model)),
            beater,
            stop,
            writer,
        )
        self.c = self.ck.c
        self.ends = EpochEnd(
            model,
            data,
            user_callbacks,
            self.out,
            beater,
            self.epochs,
            fit,
            lambda: self.ck.faults.in_validation(self.ck.step, beater.hb.attempt),
        )
        self.ck.defer_to_epoch_end(data.steps_per_epoch)
        if user_callbacks:
            self.ck.capture_before_save(lambda: self.callbacks_var.assign(self.ends.state()))
        self.ck.c.epoch.assign(fit.initial_epoch if fit is not None else 0)
        # Called before every training step (benchmarks mark blocks of steps with it).
        self.before_step: list[Callable[[], None]] = []
        self.first_step_seen = False
        self.inexact: list[str] = []  # why a resume might not be exact (ckptd.worker.setup)
        self.feed: ReplicaFeed | None = None  # several replicas (ckptd.worker.setup)
        self.notes = notes
        self._sync_host()

    def event(self, kind: Event, **data: Any) -> None:
        self.ck.event(kind, **data)

    def restore(self) -> int | None:
        restored = self.ck.restore()
        if restored is not None:
            self.host = HostState.loads(self.c.host.numpy().decode(), self.host.best, self.host.early)
            self.out.host = self.host
            self.out.merge_best_sidecar()
            self._replicas_now()
            self._sync_host()
        self.out.write_history()
        return restored

    def _replicas_now(self) -> None:
        now = replicas(self.model.distribute_strategy)
        if self.host.replicas != now:  # a mirrored job relaunched on fewer healthy GPUs
            self.inexact.append(
                f"the checkpoint was trained on {self.host.replicas} replica(s), this attempt has "
                f"{now}: the same global batches in the same order, but summed in another order"
            )
            self.host.replicas = now

    def _sync_host(self) -> None:
        """Host state changes only at epoch ends (and restores): serialise it then, not per save."""
        self.c.host.assign(self.host.dumps())

    def train(self) -> Any:
        """Train to the end; returns the History (every epoch, also before a restart)."""
        resumed = self.ck.restored_step is not None
        self.ends.begin(int(self.c.epoch.numpy()), self.callbacks_var.numpy().decode() if resumed else None)
        self._announce()
        self.ck.start()
        self.beater.beat(
            Phase.TRAINING, force=True, epochs=self.epochs, steps_per_epoch=self.data.steps_per_epoch
        )
        while int(self.c.epoch.numpy()) < self.epochs and not self.host.stopped_early:
            self._epoch(int(self.c.epoch.numpy()))
            if self.stop.requested:
                self.ck.preempt()
        self.finish()
        return self.model.history

    def _announce(self) -> None:
        """The set-up's notes, when training starts (never while `ckptd export` builds a loop
        only to read a checkpoint into it)."""
        for note in self.notes:
            self.event(Event.CALLBACK_MAPPED, note=note)
        if self.feed is not None:
            self.event(
                Event.TRAINING_DISTRIBUTED,
                strategy=self.spec.distribute.strategy,
                replicas=self.feed.n,
                devices=list(self.model.distribute_strategy.extended.worker_devices),
                global_batch=self.batch_size,
                replica_rows=self.feed.traced_rows,
            )
        report_exactness(self.event, self.inexact)

    def _epoch(self, epoch: int) -> None:
        start = int(self.c.step_in_epoch.numpy())
        if start == 0:
            self.ends.epoch_begin(epoch)
        callbacks = self.ends.callbacks
        t_epoch = time.monotonic()
        for i, data in enumerate(self.data.epoch(epoch, start), start):
            for hook in self.before_step:
                hook()
            t_step = time.monotonic()
            callbacks.on_train_batch_begin(i)
            logs = floats(self.step_fn(data))
            self.ck.count(logs)
            self._beat_step(epoch, t_epoch, start)
            if self.ck.stats.steps == 0 and not self.first_step_seen:
                self.first_step_seen = True  # recovery time ends here (benchmarks)
                self.event(Event.TRAINING_FIRST_STEP, step=self.ck.step)
            callbacks.on_train_batch_end(i, logs)
            self.ck.after_step(time.monotonic() - t_step)
            if self.model.stop_training:
                break
        self.host.train_seconds += time.monotonic() - t_epoch
        self.ck.stats.loop_seconds += time.monotonic() - t_epoch
        self.ck.stats.steps += int(self.c.step_in_epoch.numpy()) - start
        self.epoch_end(epoch)

    def _beat_step(self, epoch: int, t_epoch: float, start: int) -> None:
        done = int(self.c.step_in_epoch.numpy()) - start
        elapsed = time.monotonic() - t_epoch
        rate = done * self.batch_size / elapsed if elapsed > 0 else None
        self.beater.beat(
            Phase.TRAINING,
            step=self.ck.step,
            epoch=epoch,
            loss=self.ck.last_logs.get("loss"),
            logs=self.ck.last_logs,
            examples_per_sec=rate,
        )

    def epoch_end(self, epoch: int) -> None:
        logs = self.ends.run(epoch, self.ck.step, self.ck.last_logs, self.event)
        self.ck.epoch_done()
        self._sync_host()
        self.ck.epoch_recorded()
        self.beater.beat(Phase.TRAINING, force=True, epoch=epoch + 1, logs=logs)

    def close(self) -> None:
        self.ck.close()

    def finish(self) -> None:
        self.out.restore_best_weights(self.ck.dirty)
        self.ck.finish()
        self.ends.end()
        self.ck.mark_done()
        self.event(
            Event.TRAINING_DONE,
            step=self.ck.step,
            epochs=len(self.host.history),
            stopped_early=self.host.stopped_early,
            **{k: round(v, 6) for k, v in self.ck.stats.as_dict().items()},
        )

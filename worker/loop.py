"""ckptd's fit loop: restore → train steps → checkpoint → epoch end (validation, callbacks,
history, best file, early stopping) → final save. Everything that affects the result lives in
the checkpoint (ckptd.worker.checkpointing)."""

from __future__ import annotations

import sys
import time
from typing import Any

import keras
import tensorflow as tf

from ckptd.state.ckptfiles import Manifest
from ckptd.state.jobspec import JobSpec
from ckptd.state.paths import RunDir
from ckptd.state.protocol import Event, Phase
from ckptd.worker import callbacks as cbs
from ckptd.worker.checkpointing import Checkpointing
from ckptd.worker.fitplan import should_validate, validations_between
from ckptd.worker.hoststate import HostState
from ckptd.worker.outputs import EpochOutputs
from ckptd.worker.prep import floats, make_trackers
from ckptd.worker.runtime import Beater, StopFlag
from ckptd.worker.trackables import model_state_variables
from ckptd.worker.validate import evaluate
from ckptd.worker.writer import Writer


def report_exactness(event: Any, causes: list[str]) -> None:
    """In the first log lines: every reason a resumed run might differ, never a silent one."""
    for cause in causes:
        event(Event.EXACTNESS_WARNING, cause=cause)
        print(f"ckptd: resume may not be bit-identical: {cause}", file=sys.stderr, flush=True)


class Loop:
    checkpointing_class = Checkpointing  # bench/ab_loop.py switches saves on and off

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
        self.initial_epoch = fit.initial_epoch if fit is not None else 0
        self.validation_freq = fit.validation_freq if fit is not None else 1
        self.batch_size = getattr(data, "batch_size", spec.train.batch_size)
        self.spec, user_callbacks, notes = cbs.map_callbacks(fit.callbacks if fit else [], spec)
        best, early = make_trackers(self.spec)
        self.host = HostState(best=best, early=early)
        self.out = EpochOutputs(run, model, self.host, self.event)
        self.callback_list = keras.callbacks.CallbackList(
            user_callbacks,
            add_history=True,
            add_progbar=False,
            model=model,
            epochs=self.epochs,
            steps=data.steps_per_epoch,
            verbose=0,
        )
        self.user_callbacks = user_callbacks
        self.callbacks_var = tf.Variable("", dtype=tf.string, trainable=False)
        optimizer = model.optimizer if model.optimizer is not None else []  # a GAN has none
        self.ck = self.checkpointing_class(
            self.spec,
            run,
            {
                "model": model,
                "optimizer": optimizer,
                "best_weights": self.out.best_weights,
                "metrics": list(model.metrics_variables),
                "callbacks": self.callbacks_var,
                "data_state": data.state_variables(),
            },
            model_state_variables(model),
            beater,
            stop,
            writer,
        )
        self.c = self.ck.c
        self.ck.epoch_steps = data.steps_per_epoch
        if user_callbacks:
            self.ck.before_save.append(lambda: self.callbacks_var.assign(cbs.callback_state(user_callbacks)))
        self.ck.c.epoch.assign(self.initial_epoch)
        self.first_step_seen = False
        self.inexact: list[str] = []  # why a resume might not be exact (ckptd.worker.setup)
        self._sync_host()
        for note in notes:
            self.event(Event.CALLBACK_MAPPED, note=note)

    def event(self, kind: Event, **data: Any) -> None:
        self.ck.event(kind, **data)

    # -- restore ------------------------------------------------------------------------------

    def restore(self) -> Manifest | None:
        manifest = self.ck.restore()
        if manifest is not None:
            self.host = HostState.loads(self.c.host.numpy().decode(), self.host.best, self.host.early)
            self.out.host = self.host
            self.out.merge_best_sidecar()
            self._sync_host()
        self.out.write_history()
        return manifest

    def _sync_host(self) -> None:
        """Host state changes only at epoch ends (and restores): serialise it then, not per save."""
        self.c.host.assign(self.host.dumps())

    # -- training -----------------------------------------------------------------------------

    def _begin_callbacks(self) -> None:
        """on_train_begin, then the state of a resumed run set back over what it reset."""
        epoch = int(self.c.epoch.numpy())
        resumed = self.ck.committed_step is not None
        if resumed:
            cbs.cut_csv_logs(self.user_callbacks, epoch)
        self.model.stop_training = False
        self.callback_list.on_train_begin()
        if resumed:
            cbs.apply_callback_state(self.user_callbacks, self.callbacks_var.numpy().decode())
            cbs.fill_history(self.model.history, self.host.history)

    def train(self) -> Any:
        """Train to the end; returns the History (every epoch, also before a restart)."""
        self._begin_callbacks()
        report_exactness(self.event, self.inexact)
        self.ck.last_save = time.monotonic()
        self.beater.beat(
            Phase.TRAINING, force=True, epochs=self.epochs, steps_per_epoch=self.data.steps_per_epoch
        )
        while int(self.c.epoch.numpy()) < self.epochs and not self.host.stopped_early:
            self._epoch(int(self.c.epoch.numpy()))
            if self.stop.requested:
                self.ck.preempt()
        self.finish()
        return self.model.history

    def _epoch(self, epoch: int) -> None:
        start = int(self.c.step_in_epoch.numpy())
        if start == 0:
            self.model.reset_metrics()
            self.callback_list.on_epoch_begin(epoch)
        t_epoch = time.monotonic()
        for i, data in enumerate(self.data.epoch(epoch, start), start):
            t_step = time.monotonic()
            self.callback_list.on_train_batch_begin(i)
            logs = floats(self._train_step(data))
            self.ck.count(logs)
            self._beat_step(epoch, t_epoch, start)
            if self.ck.stats["steps"] == 0 and not self.first_step_seen:
                self.first_step_seen = True  # recovery time ends here (benchmarks)
                self.event(Event.TRAINING_FIRST_STEP, step=self.ck.step)
            self.callback_list.on_train_batch_end(i, logs)
            self.ck.after_step(time.monotonic() - t_step)
            if self.model.stop_training:
                break
        self.host.train_seconds += time.monotonic() - t_epoch
        self.ck.stats["loop_seconds"] += time.monotonic() - t_epoch
        self.ck.stats["steps"] += int(self.c.step_in_epoch.numpy()) - start
        self.epoch_end(epoch)

    def _train_step(self, data: Any) -> dict[str, Any]:
        logs: dict[str, Any] = self.step_fn(data)
        return logs

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
        self.beater.beat(Phase.VALIDATING, force=True)
        logs = dict(self.ck.last_logs)
        val = None
        if should_validate(epoch, self.validation_freq):
            done = validations_between(self.initial_epoch, epoch, self.validation_freq)
            val = self.data.validation_batches(done)
        if val is not None:
            logs.update({f"val_{k}": v for k, v in evaluate(self.model, val, self._validation_batch).items()})
        self.callback_list.on_epoch_end(epoch, logs)
        self.out.record(epoch, self.ck.step, logs)
        if self.model.stop_training and not self.host.stopped_early:
            self.host.stopped_early = True  # a callback stopped training: a resume must not go on
            self.event(Event.TRAINING_STOPPED_BY_CALLBACK, epoch=epoch)
        self.ck.epoch_done()
        self._sync_host()
        self.ck.epoch_recorded()
        self.beater.beat(Phase.TRAINING, force=True, epoch=epoch + 1, logs=logs)

    def _validation_batch(self) -> None:
        self.ck.faults.in_validation()
        self.beater.beat(Phase.VALIDATING)  # rate-limited: a write per interval, not per batch

    def close(self) -> None:
        self.ck.close()

    def finish(self) -> None:
        self.out.restore_best_weights(self.ck.dirty)
        self.ck.finish()
        self.callback_list.on_train_end(self.host.history[-1] if self.host.history else None)
        self.beater.beat(Phase.DONE, force=True)
        self.event(
            Event.TRAINING_DONE,
            step=self.ck.step,
            epochs=len(self.host.history),
            stopped_early=self.host.stopped_early,
            **{k: round(v, 6) for k, v in self.ck.stats.items()},
        )

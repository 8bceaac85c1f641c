"""The fit loop's callbacks and epoch-end decisions: whether this epoch validates
(`validation_freq`), the callbacks' hooks, the epoch's row, best file and early stopping
(ckptd.worker.fit.outputs), and whether a callback stopped training. Training steps and saves are
the Loop's (ckptd.worker.fit.loop)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras

from ckptd.state.protocol import Event, Phase
from ckptd.worker.data.fitplan import should_validate, validations_between
from ckptd.worker.fit import callbacks as cbs
from ckptd.worker.fit.outputs import EpochOutputs
from ckptd.worker.fit.validate import evaluate
from ckptd.worker.runtime import Beater


class EpochEnd:
    def __init__(
        self,
        model: Any,
        data: Any,
        user_callbacks: list[Any],
        out: EpochOutputs,
        beater: Beater,
        epochs: int,
        fit: Any,
        in_validation: Callable[[], None],
    ) -> None:
        self.model, self.data, self.out, self.beater = model, data, out, beater
        self.initial_epoch = fit.initial_epoch if fit is not None else 0
        self.validation_freq = fit.validation_freq if fit is not None else 1
        self.user_callbacks = user_callbacks
        self.in_validation = in_validation  # test faults: a hang inside validation
        self.callbacks = keras.callbacks.CallbackList(
            user_callbacks,
            add_history=True,
            add_progbar=False,
            model=model,
            epochs=epochs,
            steps=data.steps_per_epoch,
            verbose=0,
        )

    def begin(self, epoch: int, resumed_state: str | None) -> None:
        """on_train_begin, then the state of a resumed run (None: a fresh start) set back over
        what it reset."""
        if resumed_state is not None:
            cbs.cut_csv_logs(self.user_callbacks, epoch)
        self.model.stop_training = False
        self.callbacks.on_train_begin()
        if resumed_state is not None:
            cbs.apply_callback_state(self.user_callbacks, resumed_state)
            cbs.fill_history(self.model.history, self.out.host.history)

    def state(self) -> str:
        """The callbacks' state, for the checkpoint (before each save)."""
        return cbs.callback_state(self.user_callbacks)

    def epoch_begin(self, epoch: int) -> None:
        self.model.reset_metrics()
        self.callbacks.on_epoch_begin(epoch)

    def run(
        self, epoch: int, step: int, train_logs: dict[str, float], event: Callable[..., None]
    ) -> dict[str, Any]:
        """Validate if due, call the callbacks, record the epoch; returns its logs."""
        self.beater.beat(Phase.VALIDATING, force=True)
        logs: dict[str, Any] = dict(train_logs)
        if should_validate(epoch, self.validation_freq):
            done = validations_between(self.initial_epoch, epoch, self.validation_freq)
            val = self.data.validation_batches(done)
            if val is not None:
                logs.update({f"val_{k}": v for k, v in evaluate(self.model, val, self._batch).items()})
        self.callbacks.on_epoch_end(epoch, logs)
        self.out.record(epoch, step, logs)
        host = self.out.host
        if self.model.stop_training and not host.stopped_early:
            host.stopped_early = True  # a callback stopped training: a resume must not go on
            event(Event.TRAINING_STOPPED_BY_CALLBACK, epoch=epoch)
        return logs

    def _batch(self) -> None:
        self.in_validation()
        self.beater.beat(Phase.VALIDATING)  # rate-limited: a write per interval, not per batch

    def end(self) -> None:
        history = self.out.host.history
        self.callbacks.on_train_end(history[-1] if history else None)

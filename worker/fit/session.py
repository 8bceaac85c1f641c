"""Checkpointing for a custom training loop (`ckptd.session(...)`, see ckptd.worker.api).

The program keeps its own loop (a GradientTape step, its own data); the session gives it the
resume position and does the rest: counts steps, sends the heartbeat from the step loop, saves
when `checkpoint.every_steps` / `every_seconds` fall due (sync or async, the same commit
protocol as fit jobs), saves and exits on SIGTERM, and at epoch ends keeps the history, the best
file and early stopping, as for fit jobs. The checkpoint holds the given objects plus every
variable of their Keras models that a plain `tf.train.Checkpoint` misses (seed generators) and
the global random generators.
"""

from __future__ import annotations

import time
from typing import Any

import keras

from ckptd.state.jobspec import JobSpec
from ckptd.state.paths import RunDir
from ckptd.state.protocol import Event, Phase
from ckptd.worker.checkpoint.checkpointing import Checkpointing
from ckptd.worker.checkpoint.hoststate import HostState
from ckptd.worker.checkpoint.trackables import as_trackable, model_state_variables
from ckptd.worker.checkpoint.writer import Writer
from ckptd.worker.errors import ConfigError
from ckptd.worker.fit.outputs import EpochOutputs
from ckptd.worker.fit.prep import floats, make_trackers
from ckptd.worker.runtime import Beater, StopFlag


def _state_variables(trackables: dict[str, Any]) -> list[Any]:
    out: list[Any] = []
    for obj in trackables.values():
        if isinstance(obj, keras.Model):
            out += model_state_variables(obj)
        elif isinstance(obj, keras.optimizers.Optimizer):
            out += list(obj.variables)
    return out


def _build_optimizers(trackables: dict[str, Any], models: list[Any]) -> None:
    """Keras builds an optimizer's slots at its first apply_gradients: too late for a restore,
    which would silently skip them. Build them now for the one model given."""
    for name, obj in trackables.items():
        if not isinstance(obj, keras.optimizers.Optimizer) or obj.built:
            continue
        if len(models) != 1:
            raise ConfigError(
                f"ckptd.session({name}=...): the optimizer is not built yet and "
                "there is not exactly one model to build it for; call "
                f"{name}.build(model.trainable_variables) first"
            )
        obj.build(models[0].trainable_variables)


class Session:
    def __init__(
        self,
        spec: JobSpec,
        run: RunDir,
        trackables: dict[str, Any],
        beater: Beater,
        stop: StopFlag,
        writer: Writer | None,
    ) -> None:
        self.spec, self.run, self.beater, self.stop = spec, run, beater, stop
        models = [v for v in trackables.values() if isinstance(v, keras.Model)]
        best, early = make_trackers(spec)
        if (best or early) and not models:
            raise ConfigError(
                "best/early_stopping in the job file need a keras.Model among ckptd.session(...)'s objects"
            )
        _build_optimizers(trackables, models)
        self.host = HostState(best=best, early=early)
        self.model = models[0] if models else None  # what `ckptd export` writes
        self.out = EpochOutputs(run, self.model, self.host, self.event)
        try:
            named = {k: as_trackable(v) for k, v in trackables.items()}
        except TypeError as e:
            raise ConfigError(f"ckptd.session(...): {e}") from e
        self.ck = Checkpointing(
            spec,
            run,
            {**named, "best_weights": self.out.best_weights},
            _state_variables(trackables),
            beater,
            stop,
            writer,
        )
        self.c = self.ck.c
        self.c.host.assign(self.host.dumps())
        self.restored = False
        self.finished = False
        self._t_step = time.monotonic()

    def event(self, kind: Event, **data: Any) -> None:
        self.ck.event(kind, **data)

    def restore(self) -> int | None:
        """Called by the worker before the program gets the session."""
        restored = self.ck.restore()
        if restored is not None:
            self.host = HostState.loads(self.ck.c.host.numpy().decode(), self.host.best, self.host.early)
            self.out.host = self.host
            self.out.merge_best_sidecar()
            self.restored = True
        self.out.write_history()
        self.beater.beat(Phase.TRAINING, force=True)
        self.ck.start()
        self._t_step = time.monotonic()
        return restored

    @property
    def step(self) -> int:
        """Steps taken so far in this run (all attempts)."""
        return self.ck.step

    @property
    def epoch(self) -> int:
        """The epoch to run now: training resumes in it."""
        return int(self.ck.c.epoch.numpy())

    @property
    def step_in_epoch(self) -> int:
        """Batches of `epoch` already taken: skip them in the data."""
        return int(self.ck.c.step_in_epoch.numpy())

    @property
    def logs(self) -> dict[str, float]:
        """The figures the last `step_done` reported, also across a restart: a commit taken on an
        epoch's last step resumes with no batch left in that epoch, so the epoch-end code must
        take its figures from here, not from the loop's own variables (unset then)."""
        return dict(self.ck.last_logs)

    @property
    def should_stop(self) -> bool:
        """Early stopping decided to stop (check it after `epoch_done`)."""
        return self.host.stopped_early

    def step_done(self, **logs: Any) -> None:
        """Call after every training step, with its figures (loss=...): counts the step, sends
        the heartbeat, saves when due; on SIGTERM saves and ends the program (exit 75)."""
        now = time.monotonic()
        self.ck.count(floats(logs))
        self.beater.beat(
            Phase.TRAINING,
            step=self.ck.step,
            epoch=self.epoch,
            loss=self.ck.last_logs.get("loss"),
            logs=self.ck.last_logs,
        )
        self.ck.after_step(now - self._t_step)
        self._t_step = time.monotonic()

    def epoch_done(self, logs: dict[str, Any] | None = None) -> bool:
        """Call at the end of every epoch with its figures; returns True if early stopping
        says to stop."""
        self.beater.beat(Phase.VALIDATING, force=True)
        values = floats(logs or {})
        self.out.record(self.epoch, self.ck.step, values)
        self.ck.epoch_done()
        self.ck.c.host.assign(self.host.dumps())
        self.beater.beat(Phase.TRAINING, force=True, epoch=self.epoch, logs=values)
        # No preemption save here, though a SIGTERM may be waiting: the program's own epoch-end
        # code after this call (a metric's reset_state) would be in no commit, and a resume
        # skips it. The next step_done, or finish, saves and stops.
        return self.host.stopped_early

    def finish(self) -> None:
        """The final commit. The worker calls it if the program did not."""
        if self.finished:
            return
        self.finished = True
        self.out.restore_best_weights(self.ck.dirty)
        self.ck.finish()
        self.ck.mark_done()
        self.ck.event(
            Event.TRAINING_DONE,
            step=self.ck.step,
            epochs=len(self.host.history),
            stopped_early=self.host.stopped_early,
        )

    def close(self) -> None:
        self.ck.close()


class DetachedSession:
    """`ckptd.session()` outside ckptd (a plain `python train.py`): counts, saves nothing."""

    restored = False

    def __init__(self) -> None:
        self.step = self.epoch = self.step_in_epoch = 0
        self.should_stop = False
        self.logs: dict[str, float] = {}

    def step_done(self, **logs: Any) -> None:
        self.logs = floats(logs)
        self.step += 1
        self.step_in_epoch += 1

    def epoch_done(self, logs: dict[str, Any] | None = None) -> bool:
        self.epoch += 1
        self.step_in_epoch = 0
        return False

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass

"""ckptd's public API for training programs: `import ckptd.worker.api as ckptd`.

- `ckptd.fit(model, x, y, ...)`: `keras.Model.fit` with the model first. Under a ckptd worker it
  trains with ckptd (restore, checkpoints, heartbeats, preemption) and returns the History of every
  epoch, also those before a restart; run as a plain script it is `model.fit(...)`. Porting a
  `model.fit` program is that one change and a job file with `entrypoint: script.py`.
- `ckptd.fit_args(model, x, y, ...)`: the same arguments as a record, for a `model: file.py:build`
  function to return.
- `ckptd.params()`: the job file's `params`.
- `ckptd.session(**trackables)`: checkpointing for a custom (GradientTape) training loop.
- `ckptd.strategy()`: the job's `tf.distribute` strategy (`distribute:` in the job file); build
  the model inside `with ckptd.strategy().scope():`. Outside ckptd, or for a one-device job,
  TensorFlow's default strategy.

Importing this module does not import TensorFlow: the daemon side imports the worker package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Set by the worker (ckptd.worker.script) while it runs a job's entrypoint; None in a plain
# `python script.py`, where the API falls back to Keras itself.
_runner: Runner | None = None


class Runner:
    """What the worker provides to a running entrypoint script."""

    params: dict[str, Any]

    def fit(self, args: FitArgs) -> Any:
        raise NotImplementedError

    def session(self, trackables: dict[str, Any]) -> Any:
        raise NotImplementedError


@dataclass
class FitArgs:
    """`keras.Model.fit`'s arguments, with its defaults and meaning."""

    model: Any
    x: Any = None
    y: Any = None
    batch_size: int | None = None
    epochs: int = 1
    verbose: Any = "auto"
    callbacks: list[Any] = field(default_factory=list)
    validation_split: float = 0.0
    validation_data: Any = None
    shuffle: Any = True
    class_weight: dict[int, float] | None = None
    sample_weight: Any = None
    initial_epoch: int = 0
    steps_per_epoch: int | None = None
    validation_steps: int | None = None
    validation_batch_size: int | None = None
    validation_freq: int = 1

    def keras_kwargs(self) -> dict[str, Any]:
        kw = dict(self.__dict__)
        kw.pop("model")
        return kw


def fit_args(
    model: Any,
    x: Any = None,
    y: Any = None,
    batch_size: int | None = None,
    epochs: int = 1,
    verbose: Any = "auto",
    callbacks: list[Any] | None = None,
    validation_split: float = 0.0,
    validation_data: Any = None,
    shuffle: Any = True,
    class_weight: dict[int, float] | None = None,
    sample_weight: Any = None,
    initial_epoch: int = 0,
    steps_per_epoch: int | None = None,
    validation_steps: int | None = None,
    validation_batch_size: int | None = None,
    validation_freq: int = 1,
) -> FitArgs:
    """Record a `model.fit(...)` call for ckptd to run (same arguments, model first)."""
    return FitArgs(
        model,
        x,
        y,
        batch_size,
        epochs,
        verbose,
        list(callbacks or []),
        validation_split,
        validation_data,
        shuffle,
        class_weight,
        sample_weight,
        initial_epoch,
        steps_per_epoch,
        validation_steps,
        validation_batch_size,
        validation_freq,
    )


def fit(
    model: Any,
    x: Any = None,
    y: Any = None,
    batch_size: int | None = None,
    epochs: int = 1,
    verbose: Any = "auto",
    callbacks: list[Any] | None = None,
    validation_split: float = 0.0,
    validation_data: Any = None,
    shuffle: Any = True,
    class_weight: dict[int, float] | None = None,
    sample_weight: Any = None,
    initial_epoch: int = 0,
    steps_per_epoch: int | None = None,
    validation_steps: int | None = None,
    validation_batch_size: int | None = None,
    validation_freq: int = 1,
) -> Any:
    """`model.fit(...)` under ckptd's supervision; returns a `keras.callbacks.History`."""
    args = fit_args(
        model,
        x,
        y,
        batch_size,
        epochs,
        verbose,
        callbacks,
        validation_split,
        validation_data,
        shuffle,
        class_weight,
        sample_weight,
        initial_epoch,
        steps_per_epoch,
        validation_steps,
        validation_batch_size,
        validation_freq,
    )
    if _runner is None:
        return model.fit(**args.keras_kwargs())
    return _runner.fit(args)


def params() -> dict[str, Any]:
    """The job file's `params` (relative paths beside the job file made absolute); {} outside."""
    return dict(_runner.params) if _runner is not None else {}


def strategy() -> Any:
    """The job's tf.distribute strategy (imports TensorFlow)."""
    from ckptd.worker.distribute import job_strategy

    return job_strategy()


def session(**trackables: Any) -> Any:
    """Checkpointing for a custom training loop: restores the newest verified commit into the
    given objects (anything `tf.train.Checkpoint` tracks: models, optimizers, variables) and
    returns a `ckptd.worker.fit.session.Session`. Outside ckptd: a session that only counts."""
    if _runner is not None:
        return _runner.session(trackables)
    from ckptd.worker.fit.session import DetachedSession

    return DetachedSession()


def install(runner: Runner | None) -> Callable[[], None]:
    """Worker side: make `runner` serve the API; returns the undo."""
    global _runner
    previous, _runner = _runner, runner

    def undo() -> None:
        global _runner
        _runner = previous

    return undo

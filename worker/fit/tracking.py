"""Best-model tracking and early stopping, with Keras semantics, as plain serialisable state.

No TensorFlow here: the worker stores these dataclasses in its checkpoint (as JSON), so their state
survives a restart exactly, and the decisions are unit-tested as pure functions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from ckptd.worker.errors import ConfigError

Mode = Literal["min", "max"]
_MAX_HINTS = ("acc", "auc", "precision", "recall", "f1", "fmeasure")


def resolve_mode(mode: str, monitor: str) -> Mode:
    """Keras's `mode="auto"`: accuracy-like metrics are maximised, everything else minimised."""
    if mode in ("min", "max"):
        return mode  # type: ignore[return-value]
    name = monitor.removeprefix("val_").lower()
    return "max" if any(h in name for h in _MAX_HINTS) else "min"


def is_improvement(mode: Mode, current: float, reference: float | None, min_delta: float = 0.0) -> bool:
    if math.isnan(current):
        return False
    if reference is None:
        return True
    if mode == "max":
        return current - min_delta > reference
    return current + min_delta < reference


def better_of(mode: Mode, a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b) if mode == "max" else min(a, b)


def format_filepath(template: str, epoch: int, logs: dict[str, float]) -> str:
    """Keras ModelCheckpoint naming: `{epoch}` is 1-based, other fields come from the epoch's logs.

    A field the logs do not hold is the job file's mistake, the same in every attempt: a
    ConfigError (never retried), not a KeyError that would crash-loop the job."""
    fields = {"epoch": epoch + 1, **logs}
    try:
        return template.format(**fields)
    except KeyError as e:
        raise ConfigError(
            f"best.filepath: {template!r} names {{{e.args[0]}}}, which this job's logs do not "
            f"hold; the fields available are {', '.join(sorted(fields))}"
        ) from None


@dataclass
class BestTracker:
    monitor: str
    mode: Mode
    save_best_only: bool
    filepath: str
    best: float | None = None
    best_epoch: int | None = None

    def decide(self, epoch: int, logs: dict[str, float]) -> str | None:
        """Return the file to write after `epoch`, or None. Updates `best` when it improves."""
        current = logs.get(self.monitor)
        if not self.save_best_only:
            if current is not None and is_improvement(self.mode, current, self.best):
                self.best, self.best_epoch = current, epoch
            return format_filepath(self.filepath, epoch, logs)
        if current is None or not is_improvement(self.mode, current, self.best):
            return None
        self.best, self.best_epoch = current, epoch
        return format_filepath(self.filepath, epoch, logs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EarlyStopper:
    monitor: str
    mode: Mode
    patience: int
    min_delta: float
    baseline: float | None
    start_from_epoch: int
    restore_best_weights: bool
    best: float | None = None
    best_epoch: int = 0
    wait: int = 0
    stopped_epoch: int | None = None

    def update(self, epoch: int, logs: dict[str, float]) -> tuple[bool, bool]:
        """Feed one epoch's logs. Returns (snapshot_best_weights, stop_training)."""
        current = logs.get(self.monitor)
        if current is None or epoch < self.start_from_epoch:
            return False, False
        self.wait += 1
        first = self.best is None
        if is_improvement(self.mode, current, self.best, self.min_delta) or first:
            self.best, self.best_epoch = current, epoch
            if self.baseline is None or is_improvement(self.mode, current, self.baseline, self.min_delta):
                self.wait = 0
            return self.restore_best_weights, False
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            return False, True
        return False, False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

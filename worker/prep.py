"""Pieces of the training loop that need no loop state: the tensor counters, the trackers built
from the spec, priming the model before a restore, the history CSV."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf
from ckptd.state.jobspec import JobSpec
from ckptd.worker.data import Batches
from ckptd.worker.tracking import BestTracker, EarlyStopper, resolve_mode


@dataclass
class Counters:
    """Tensor-valued position of the run, tracked by the checkpoint."""

    step: tf.Variable
    epoch: tf.Variable
    step_in_epoch: tf.Variable
    host: tf.Variable

    @classmethod
    def new(cls) -> Counters:
        i64 = tf.int64
        return cls(tf.Variable(0, dtype=i64), tf.Variable(0, dtype=i64), tf.Variable(0, dtype=i64),
                   tf.Variable("", dtype=tf.string))


def make_trackers(spec: JobSpec) -> tuple[BestTracker | None, EarlyStopper | None]:
    best = None
    if spec.best:
        b = spec.best
        best = BestTracker(b.monitor, resolve_mode(b.mode, b.monitor), b.save_best_only, b.filepath)
    early = None
    if spec.early_stopping:
        e = spec.early_stopping
        early = EarlyStopper(e.monitor, resolve_mode(e.mode, e.monitor), e.patience, e.min_delta,
                             e.baseline, e.start_from_epoch, e.restore_best_weights)
    return best, early


def prime(model: Any, batches: Batches) -> None:
    """Create every variable before restoring: Keras 3 builds optimizer slots and compiled metrics
    lazily, and a restore into variables that do not exist yet is silently skipped."""
    x, y = batches.first_batch()
    if not model.built:
        model(x)
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    model.test_on_batch(x, y)  # builds the loss tracker and compiled metrics; changes no weight
    model.reset_metrics()
    model.make_train_function()


def history_csv(history: list[dict[str, float]]) -> str:
    """Keras CSVLogger columns: `epoch`, then the metric names sorted."""
    keys = sorted({k for row in history for k in row} - {"epoch"})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["epoch", *keys])
    for row in history:
        w.writerow([int(row["epoch"]), *(row.get(k, "") for k in keys)])
    return buf.getvalue()


def floats(logs: dict[str, Any]) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in logs.items()}

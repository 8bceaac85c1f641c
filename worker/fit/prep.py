"""Pieces of the training loop that need no loop state: the tensor counters, the trackers built
from the spec, the history CSV, step logs as numbers."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from ckptd.state.jobspec import JobSpec
from ckptd.worker.fit.tracking import BestTracker, EarlyStopper, resolve_mode


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
        return cls(
            tf.Variable(0, dtype=i64),
            tf.Variable(0, dtype=i64),
            tf.Variable(0, dtype=i64),
            tf.Variable("", dtype=tf.string),
        )


def make_trackers(spec: JobSpec) -> tuple[BestTracker | None, EarlyStopper | None]:
    best = None
    if spec.best:
        b = spec.best
        best = BestTracker(b.monitor, resolve_mode(b.mode, b.monitor), b.save_best_only, b.filepath)
    early = None
    if spec.early_stopping:
        e = spec.early_stopping
        early = EarlyStopper(
            e.monitor,
            resolve_mode(e.mode, e.monitor),
            e.patience,
            e.min_delta,
            e.baseline,
            e.start_from_epoch,
            e.restore_best_weights,
        )
    return best, early


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
    """A step's logs as numbers; values that are not scalars (a custom train_step may return
    anything) are left out of logs, history and heartbeats."""
    out = {}
    for k, v in (logs or {}).items():
        a = np.asarray(v)
        if a.size == 1 and a.dtype.kind in "biuf":
            out[k] = float(a.reshape(()))
    return out

"""Keras callbacks inside ckptd's fit loop, with their state carried across restarts.

- `ModelCheckpoint` and `EarlyStopping` become ckptd's own `best` and `early_stopping` (durable
  best files that never regress after a restart, patience and best weights in the checkpoint);
  `BackupAndRestore` is what ckptd does anyway and is dropped. A job file that also sets the
  section is refused: one of them would silently lose.
- Every other callback runs as fit runs it. Its plain attributes (numbers, strings, flags and
  lists/dicts of them: `ReduceLROnPlateau`'s wait/best/cooldown, `TensorBoard`'s step counters,
  a user callback's counters) are saved with each checkpoint and set back after
  `on_train_begin` on resume; objects (files, writers, the model) are not. What a callback did to
  the model or optimizer (a learning rate it set) is in the checkpoint already.
- `CSVLogger` keeps one row per epoch: on resume its file is cut back to the epochs before the
  restored one and continued.
- A resumed epoch does not get `on_epoch_begin` again: its effects (a scheduled learning rate)
  were made before the checkpoint and are restored with it.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import keras
import numpy as np

from ckptd.state.jobspec import Best, EarlyStopping, JobSpec
from ckptd.worker.errors import ConfigError

_SKIP_ATTRS = {"model", "_model", "params", "validation_data"}
# Attributes that on_train_begin derives from the files on disk: theirs wins on resume.
_FROM_DISK = {"CSVLogger": {"append", "append_header"}}
_NOT_SAVED = (keras.callbacks.History, keras.callbacks.ProgbarLogger)


def _ckpt_to_best(cb: Any) -> Best:
    if cb.save_freq != "epoch":
        raise ConfigError(
            f"ModelCheckpoint(save_freq={cb.save_freq!r}): ckptd checkpoints "
            "every checkpoint.every_steps steps itself; keep ModelCheckpoint for "
            "per-epoch best files (save_freq='epoch') or remove it"
        )
    path = cb.filepath
    if cb.save_weights_only and not path.endswith((".weights.h5", ".h5", ".hdf5")):
        raise ConfigError(
            f"ModelCheckpoint({path!r}, save_weights_only=True): name the file "
            "*.weights.h5 (or *.h5/*.hdf5 for the Keras-2 layout)"
        )
    try:
        return Best(monitor=cb.monitor, mode=cb.mode, save_best_only=cb.save_best_only, filepath=path)
    except ValueError as e:
        raise ConfigError(f"ModelCheckpoint({path!r}): {e}") from e


def _early_to_spec(cb: Any) -> EarlyStopping:
    return EarlyStopping(
        monitor=cb.monitor,
        mode=cb.mode,
        patience=cb.patience,
        min_delta=abs(float(cb.min_delta)),
        baseline=cb.baseline,
        start_from_epoch=cb.start_from_epoch,
        restore_best_weights=cb.restore_best_weights,
    )


def map_callbacks(callbacks: list[Any], spec: JobSpec) -> tuple[JobSpec, list[Any], list[str]]:
    """Split the user's callbacks into the job's best/early_stopping sections and those ckptd
    runs; returns the spec to use, the callbacks to run and one note per replaced callback."""
    kept: list[Any] = []
    notes: list[str] = []
    update: dict[str, Best | EarlyStopping] = {}
    for cb in callbacks:
        name = type(cb).__name__
        value: Best | EarlyStopping
        if isinstance(cb, keras.callbacks.ModelCheckpoint):
            field, value = "best", _ckpt_to_best(cb)
        elif isinstance(cb, keras.callbacks.EarlyStopping):
            field, value = "early_stopping", _early_to_spec(cb)
        elif isinstance(cb, keras.callbacks.BackupAndRestore):
            notes.append(
                "BackupAndRestore dropped: ckptd checkpoints and restores the run "
                "(checkpoint.every_steps / every_seconds)"
            )
            continue
        else:
            kept.append(cb)
            continue
        if getattr(spec, field) is not None or field in update:
            raise ConfigError(
                f"{name} callback and the job file's `{field}:` section (or a "
                f"second {name}) both given; keep one"
            )
        update[field] = value
        notes.append(f"{name} runs as ckptd's {field} (durable across restarts)")
    return (spec.model_copy(update=update) if update else spec), kept, notes


def _plain(value: Any) -> Any:
    """`value` as JSON-able data, or raise TypeError if it is not plain data."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(v) for k, v in value.items()}
    raise TypeError(type(value).__name__)


def _unplain(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"float"}:
        return float(value["float"])
    if isinstance(value, list):
        return [_unplain(v) for v in value]
    if isinstance(value, dict):
        return {k: _unplain(v) for k, v in value.items()}
    return value


def callback_state(callbacks: list[Any]) -> str:
    """The plain attributes of each callback, by position, as JSON."""
    out = []
    for cb in callbacks:
        attrs: dict[str, Any] = {}
        skip = _SKIP_ATTRS | _FROM_DISK.get(type(cb).__name__, set())
        if not isinstance(cb, _NOT_SAVED):
            for k, v in vars(cb).items():
                if k in skip:
                    continue
                try:
                    attrs[k] = _plain(v)
                except TypeError:
                    continue
        out.append({"type": type(cb).__qualname__, "attrs": attrs})
    return json.dumps(out)


def apply_callback_state(callbacks: list[Any], text: str) -> None:
    """Set saved attributes back (after on_train_begin, which resets many of them)."""
    if not text:
        return
    saved = json.loads(text)
    for cb, entry in zip(callbacks, saved, strict=False):
        if entry["type"] != type(cb).__qualname__:
            continue  # the program's callbacks changed: leave this one as it starts
        if getattr(cb, "monitor_op", 0) is None and hasattr(cb, "_set_monitor_op"):
            # Keras sets monitor_op lazily and flips min_delta's sign as it does; do it now,
            # or it would flip the restored (already flipped) min_delta once more.
            cb._set_monitor_op()
        skip = _FROM_DISK.get(type(cb).__name__, set())
        for k, v in entry["attrs"].items():
            if k not in skip:
                setattr(cb, k, _unplain(v))


def cut_csv_logs(callbacks: list[Any], epoch: int) -> None:
    """Before on_train_begin on resume: CSVLogger files keep the rows of epochs before `epoch`,
    and the logger appends, so each epoch has one row however often the run restarted."""
    for cb in callbacks:
        if not isinstance(cb, keras.callbacks.CSVLogger):
            continue
        cb.append = True
        path = Path(cb.filename)
        if not path.exists():
            continue
        with open(path, newline="") as f:
            rows = list(csv.reader(f, delimiter=cb.sep))
        keep = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) < epoch]
        with open(path, "w", newline="") as f:
            csv.writer(f, delimiter=cb.sep, lineterminator="\n").writerows(keep)


def fill_history(history: Any, rows: list[dict[str, float]]) -> None:
    """The History callback after a resume: every epoch, also those of earlier attempts."""
    history.epoch = [int(r["epoch"]) for r in rows]
    history.history = {}
    for r in rows:
        for k, v in r.items():
            if k != "epoch":
                history.history.setdefault(k, []).append(v)

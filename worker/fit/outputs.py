"""What an epoch end leaves behind: the history row and file, the best-weights file, early
stopping's verdict. Shared by the fit loop and custom-loop sessions; the state lives in
HostState, which the checkpoint carries."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tensorflow as tf

from ckptd.state import ckptfiles as cf
from ckptd.state.durable import atomic_write_text
from ckptd.state.paths import RunDir
from ckptd.state.protocol import Event
from ckptd.worker.checkpoint.h5export import check_readable, save_weights_file
from ckptd.worker.checkpoint.hoststate import HostState
from ckptd.worker.fit.prep import history_csv
from ckptd.worker.fit.tracking import better_of


class EpochOutputs:
    def __init__(self, run: RunDir, model: Any, host: HostState, event: Callable[..., None]) -> None:
        self.run, self.model, self.host, self.event = run, model, host, event
        self._real_dirs: dict[Path, Path] = {}
        self._warned_early = False
        self.best_weights: list[tf.Variable] = []
        early = host.early
        if early and early.restore_best_weights:
            self.best_weights = [tf.Variable(w, trainable=False) for w in model.get_weights()]

    def write_history(self) -> None:
        try:
            atomic_write_text(self.run.history, history_csv(self.host.history))
        except OSError as e:  # a full disk: the next epoch end rewrites the whole file
            self._failed("history", self.run.history, e)

    def _failed(self, what: str, path: Path, e: OSError) -> None:
        """An output that could not be written (ENOSPC, EIO): training carries on, as after a
        failed interval save; nothing half-written replaces a good file (atomic writes)."""
        self.event(
            Event.OUTPUT_FAILED,
            what=what,
            path=str(path),
            errno=e.errno,
            error=f"{type(e).__name__}: {e.strerror or e}",
        )

    def record(self, epoch: int, step: int, logs: dict[str, float]) -> None:
        """Append the epoch's row, then the best file and early stopping's decision."""
        self.host.history.append({"epoch": epoch, **logs})
        self.write_history()
        self.event(Event.EPOCH_END, epoch=epoch, step=step, logs=logs)
        self._best_file(epoch, logs)
        self._early_stopping(epoch, logs)

    def merge_best_sidecar(self) -> None:
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
            self.event(Event.BEST_UNREADABLE, path=str(path), reason=problem)
            return
        if side.get("monitor") == best.monitor and side.get("mode") == best.mode:
            merged = better_of(best.mode, best.best, side.get("best"))
            if merged != best.best:
                best.best, best.best_epoch = merged, side.get("epoch")

    def _best_file(self, epoch: int, logs: dict[str, float]) -> None:
        best = self.host.best
        if best is None:
            return
        if best.monitor not in logs:
            self.event(Event.BEST_MONITOR_MISSING, monitor=best.monitor, available=sorted(logs))
            return
        if not math.isfinite(logs[best.monitor]):  # a NaN never becomes "the best so far"
            self.event(Event.BEST_SKIPPED_NONFINITE, monitor=best.monitor, value=logs[best.monitor])
            return
        before = (best.best, best.best_epoch)
        name = best.decide(epoch, logs)
        if name is None:
            return
        path = self.run.output_path(name)
        try:
            # Its directory as resolved the first time; a symlink swapped in later makes the
            # write refuse (DirectoryMoved) instead of landing outside.
            real = self._real_dirs.setdefault(path.parent, cf.real_dir(path.parent))
            with cf.pinned(real):
                pass
            save_weights_file(self.model, real / path.name)
            atomic_write_text(
                self.run.best_state,
                json.dumps(
                    {
                        "monitor": best.monitor,
                        "mode": best.mode,
                        "best": best.best,
                        "epoch": best.best_epoch,
                        "path": str(path),
                    }
                ),
            )
        except OSError as e:  # not written: the next improvement tries again
            best.best, best.best_epoch = before
            self._failed("best", path, e)
            return
        self.event(
            Event.BEST_SAVED, epoch=epoch, path=str(path), monitor=best.monitor, value=logs[best.monitor]
        )

    def _early_stopping(self, epoch: int, logs: dict[str, float]) -> None:
        early = self.host.early
        if early is None:
            return
        if early.monitor not in logs and not self._warned_early:
            # As Keras does: once, naming the field and what exists (a typo never stops anything).
            self._warned_early = True
            self.event(
                Event.EARLY_STOPPING_MONITOR_MISSING,
                field="early_stopping.monitor",
                monitor=early.monitor,
                available=sorted(logs),
            )
            print(
                f"ckptd: early_stopping.monitor {early.monitor!r} is not among this job's "
                f"metrics {sorted(logs)}; early stopping never triggers",
                file=sys.stderr,
            )
        snapshot, stop = early.update(epoch, logs)
        if snapshot:
            for var, w in zip(self.best_weights, self.model.get_weights(), strict=True):
                var.assign(w)
        if stop:
            self.host.stopped_early = True
            self.event(
                Event.EARLY_STOPPING_STOPPED, epoch=epoch, best=early.best, best_epoch=early.best_epoch
            )

    def restore_best_weights(self, dirty: bool) -> None:
        """At the end: EarlyStopping(restore_best_weights=True) semantics."""
        early = self.host.early
        if early and early.restore_best_weights and self.host.stopped_early and dirty:
            self.model.set_weights([v.numpy() for v in self.best_weights])

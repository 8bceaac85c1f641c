"""Pure helpers: retention, best/early-stopping tracking, atomic durable writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ckptd.state import durable
from ckptd.state.retention import Committed, to_delete
from ckptd.worker.tracking import BestTracker, EarlyStopper, format_filepath, resolve_mode

H = 3600.0


@pytest.mark.parametrize(
    ("times", "keep", "hours", "deleted"),
    [
        ([0, 1, 2, 3, 4], 3, None, [1, 2]),
        ([0, 1, 2], 3, None, []),
        ([0, 1, 2, 3], 1, None, [1, 2, 3]),
        ([0, H, 2 * H, 2.5 * H, 3 * H], 1, 1.0, [4]),
        ([0, 0.5 * H, H, 1.2 * H, 1.3 * H], 1, 1.0, [2, 4]),
    ],
)
def test_retention(times: list[float], keep: int, hours: float | None, deleted: list[int]) -> None:
    committed = [Committed(i + 1, t) for i, t in enumerate(times)]
    assert to_delete(committed, keep, hours) == deleted


@pytest.mark.parametrize(
    ("mode", "monitor", "expected"),
    [
        ("auto", "val_accuracy", "max"),
        ("auto", "val_loss", "min"),
        ("auto", "auc", "max"),
        ("min", "val_accuracy", "min"),
        ("auto", "mse", "min"),
    ],
)
def test_resolve_mode(mode: str, monitor: str, expected: str) -> None:
    assert resolve_mode(mode, monitor) == expected


def test_best_tracker_only_improvements() -> None:
    t = BestTracker("val_accuracy", "max", True, "w-{epoch:02d}-{val_accuracy:.2f}.hdf5")
    seq = [0.5, 0.6, 0.55, 0.6, 0.7]
    got = [t.decide(e, {"val_accuracy": v}) for e, v in enumerate(seq)]
    assert got == ["w-01-0.50.hdf5", "w-02-0.60.hdf5", None, None, "w-05-0.70.hdf5"]
    assert (t.best, t.best_epoch) == (0.7, 4)
    assert t.decide(5, {"loss": 1.0}) is None  # monitor missing


def test_best_tracker_save_every_epoch() -> None:
    t = BestTracker("val_loss", "min", False, "w.hdf5")
    assert [t.decide(e, {"val_loss": v}) for e, v in enumerate([3, 2, 4])] == ["w.hdf5"] * 3
    assert t.best == 2


def test_early_stopping_keras_semantics() -> None:
    e = EarlyStopper(
        "val_loss",
        "min",
        patience=2,
        min_delta=0.0,
        baseline=None,
        start_from_epoch=0,
        restore_best_weights=True,
    )
    results = [e.update(i, {"val_loss": v}) for i, v in enumerate([1.0, 0.9, 0.95, 0.91, 0.92])]
    assert results == [(True, False), (True, False), (False, False), (False, True), (False, True)]
    assert (e.best, e.best_epoch, e.stopped_epoch) == (0.9, 1, 4)


def test_format_filepath_is_one_based() -> None:
    assert format_filepath("x-{epoch:03d}-{loss:.1f}.h5", 0, {"loss": 0.25}) == "x-001-0.2.h5"


def test_atomic_write_fsyncs_file_then_renames_then_fsyncs_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append("fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-file")
        real_fsync(fd)

    def replace(a: str, b: str) -> None:
        calls.append("rename")
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    durable.atomic_write_text(tmp_path / "f.json", "{}")
    assert calls == ["fsync-file", "rename", "fsync-dir"]
    assert (tmp_path / "f.json").read_text() == "{}"


def test_atomic_write_keeps_old_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "w.h5"
    target.write_text("old")

    def boom(path: Path) -> None:
        path.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        durable.atomic_write_with(target, boom)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.h5"]  # no temp left behind


def test_fsync_error_is_raised_not_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def eio(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(OSError, match="Input/output"):
        durable.atomic_write_text(tmp_path / "x", "data")
    assert not (tmp_path / "x").exists()

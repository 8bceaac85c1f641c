"""ckptd.worker.fit.tracking: best-file and early-stopping decisions, Keras's semantics."""

from __future__ import annotations

import pytest

from ckptd.worker.fit.tracking import BestTracker, EarlyStopper, format_filepath, resolve_mode


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


@pytest.mark.parametrize(
    ("template", "name"),
    [
        ("w-{epoch:02d}-{val_accuracy:.2f}.hdf5", "w-03-0.75.hdf5"),
        ("w-{loss:.1f}.weights.h5", "w-0.5.weights.h5"),
        ("w-{nosuchfield}.hdf5", None),
        ("w-{val_auc:.2f}.hdf5", None),
    ],
)
def test_format_filepath_names_an_unknown_field_as_a_config_error(template: str, name: str | None) -> None:
    from ckptd.worker.errors import ConfigError

    logs = {"loss": 0.5, "val_accuracy": 0.75}
    if name is not None:
        assert format_filepath(template, 2, logs) == name
        return
    with pytest.raises(ConfigError, match=r"best\.filepath: .* names \{\w+\}.*epoch, loss, val_accuracy"):
        format_filepath(template, 2, logs)

"""Epoch-end validation (ckptd.worker.fit.validate) reports what `model.evaluate()` would, on the
Pima example's own validation split, fed as arrays and as a tf.data.Dataset."""

from __future__ import annotations

from typing import Any

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.tf


def _pima() -> tuple[Any, Any, Any, Any]:
    import keras
    import numpy as np

    keras.utils.set_random_seed(7)
    data = np.loadtxt(ROOT / "examples" / "pima" / "pima-indians-diabetes.csv", delimiter=",")
    x, y = data[:, :8], data[:, 8]
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(12, activation="relu"),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    model.fit(x[:514], y[:514], epochs=2, batch_size=10, verbose=0)
    return model, x[514:], y[514:], np


@pytest.mark.parametrize("as_dataset", [False, True])
def test_validation_matches_model_evaluate(as_dataset: bool) -> None:
    import tensorflow as tf

    from ckptd.state.jobspec import Train
    from ckptd.worker.data.batches import Batches
    from ckptd.worker.fit.validate import evaluate

    model, vx, vy, np = _pima()
    cfg = Train(epochs=1, batch_size=10)
    validation: Any = tf.data.Dataset.from_tensor_slices((vx, vy)) if as_dataset else (vx, vy)
    train: Any = (vx, vy)
    if as_dataset:
        train = tf.data.Dataset.from_tensor_slices((vx, vy))
    batches = Batches(train, validation, cfg)
    expected = model.evaluate(vx, vy, batch_size=10, verbose=0, return_dict=True)
    got = evaluate(model, batches.validation_batches() or [])
    assert sorted(got) == sorted(expected) == ["accuracy", "loss"]
    for k in got:
        assert got[k] == pytest.approx(float(expected[k]), rel=1e-6), k
    # 254 rows at batch 10: 26 batches, the last one of 4 rows; nothing dropped or repeated.
    sizes = [len(y) for _, y in batches.validation_batches() or []]
    assert sizes == [10] * 25 + [4]
    # A second call starts from reset metrics, like evaluate().
    assert evaluate(model, batches.validation_batches() or []) == got
    assert np.isfinite(got["loss"])

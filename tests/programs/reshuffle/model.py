"""A model: job whose build() shuffles its own dataset (issue 26): ds.shuffle(256) reshuffles on
every iteration, then the examples are returned unbatched as docs/job-files.md asks. params.variant:
default, seeded (shuffle(256, seed=5)), map_before / map_after (a map around the shuffle), py
(a tf.py_function in the map: a cause ckptd must name)."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf


def _dataset(x: np.ndarray, y: np.ndarray, variant: str) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if variant == "map_before":
        ds = ds.map(lambda a, b: (a * 0.5, b))
    ds = ds.shuffle(256, seed=5) if variant == "seeded" else ds.shuffle(256)
    if variant == "map_after":
        ds = ds.map(lambda a, b: (a * 0.5, b))
    if variant == "py":
        ds = ds.map(lambda a, b: (tf.py_function(lambda t: t, [a], tf.float32), b))
        ds = ds.map(lambda a, b: (tf.ensure_shape(a, (8,)), b))
    return ds.batch(32).unbatch()


def build(params: dict[str, Any]) -> tuple[keras.Model, tf.data.Dataset]:
    data = np.loadtxt(params["csv"], delimiter=",", dtype="float32")
    model = keras.Sequential(
        [
            keras.Input(shape=(8,)),
            keras.layers.Dense(12, activation="relu"),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile(loss="binary_crossentropy", optimizer="adam", metrics=["accuracy"])
    return model, _dataset(data[:, 0:8], data[:, 8], params.get("variant", "default"))

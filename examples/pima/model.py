"""The classic Keras checkpoint tutorial model on the Pima Indians diabetes data.

ckptd calls `build(params)`: it returns a compiled model and the *unbatched* examples; ckptd does
the batching, shuffling, validation split and the training loop, so it can checkpoint all of it.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np


def load(csv: str) -> tuple[np.ndarray, np.ndarray]:
    data = np.loadtxt(csv, delimiter=",", dtype="float32")
    return data[:, 0:8], data[:, 8]


def build(params: dict[str, Any]) -> tuple[keras.Model, tuple[np.ndarray, np.ndarray]]:
    x, y = load(params["csv"])
    model = keras.Sequential(
        [
            keras.Input(shape=(8,)),
            keras.layers.Dense(12, activation="relu"),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile(
        loss="binary_crossentropy",
        optimizer=keras.optimizers.Adam(learning_rate=params.get("learning_rate", 0.001)),
        metrics=["accuracy"],
    )
    return model, (x, y)

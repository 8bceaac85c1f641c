"""A large model for the checkpoint benchmarks, with the `build(params)` contract of
examples/pima/model.py: a compiled model and the *unbatched* training examples as numpy arrays.
The data is synthetic and deterministic (numpy, seeded).

Two kinds (params["kind"]):
- "embedding" (default): a frozen, pretrained-style embedding table (vocab 400,000 x 64 = 25.6M
  floats, ~102 MB) feeding a small trainable head (~131k weights, Adam). A checkpoint is ~104 MB
  while a training step takes a few ms on 2 CPU cores, so 300 steps x 5 repeats fit the benchmark's
  time budget. Saves are large relative to compute: a pessimistic case for checkpoint overhead.
- "wide": Input(features) -> Dense(width) -> Dense(1) with Adam, sized by params["state_gb"]: the
  checkpoint holds each weight three times (value, two Adam slots), so width is chosen to make
  ~state_gb GB of state. The GB-scale benchmark (bench/scale.py) uses it.
- "dense": Input(1024) -> Dense(4096) -> Dense(4096) -> Dense(1), all trainable with Adam: 21M
  weights, ~252 MB checkpoint, but ~300 ms per step on 2 CPU cores (Adam alone ~6 ns/weight).

Other params: rows (default 9600 = 300 steps per epoch at batch 32), seed (default 7),
vocab, dim, ids (embedding kind), features, width (dense kind), learning_rate.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np


def embedding_data(rows: int, ids: int, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, vocab, size=(rows, ids), dtype=np.int32)
    y = (x.sum(axis=1) % 2).astype(np.float32)
    return x, y


def dense_data(rows: int, features: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, features), dtype=np.float32)
    w = rng.standard_normal(features).astype(np.float32)
    y = (x @ w > 0).astype(np.float32)
    return x, y


def embedding_model(params: dict[str, Any]) -> tuple[keras.Model, tuple[np.ndarray, np.ndarray]]:
    vocab, dim, ids = int(params.get("vocab", 400_000)), int(params.get("dim", 64)), int(params.get("ids", 8))
    data = embedding_data(int(params.get("rows", 9600)), ids, vocab, int(params.get("seed", 7)))
    model = keras.Sequential(
        [
            keras.Input(shape=(ids,), dtype="int32"),
            keras.layers.Embedding(vocab, dim, trainable=False),
            keras.layers.Flatten(),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    return model, data


def dense_model(params: dict[str, Any]) -> tuple[keras.Model, tuple[np.ndarray, np.ndarray]]:
    features, width = int(params.get("features", 1024)), int(params.get("width", 4096))
    data = dense_data(int(params.get("rows", 9600)), features, int(params.get("seed", 7)))
    model = keras.Sequential(
        [
            keras.Input(shape=(features,)),
            keras.layers.Dense(width, activation="relu"),
            keras.layers.Dense(width, activation="relu"),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    return model, data


def wide_width(state_gb: float, features: int) -> int:
    """The width whose kernel, bias and output weights, with Adam's two slots, make ~state_gb GB."""
    return max(1, round(state_gb * 1e9 / 12 / (features + 2)))


def wide_model(params: dict[str, Any]) -> tuple[keras.Model, tuple[np.ndarray, np.ndarray]]:
    features = int(params.get("features", 256))
    width = wide_width(float(params.get("state_gb", 0.1)), features)
    data = dense_data(int(params.get("rows", 800)), features, int(params.get("seed", 7)))
    model = keras.Sequential(
        [
            keras.Input(shape=(features,)),
            keras.layers.Dense(width, activation="relu"),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    return model, data


def build(params: dict[str, Any]) -> tuple[keras.Model, tuple[np.ndarray, np.ndarray]]:
    kind = params.get("kind", "embedding")
    builders = {"embedding": embedding_model, "dense": dense_model, "wide": wide_model}
    if kind not in builders:
        raise ValueError(f"params.kind must be one of {sorted(builders)}, got {kind!r}")
    model, data = builders[kind](params)
    model.compile(
        loss="binary_crossentropy",
        optimizer=keras.optimizers.Adam(learning_rate=params.get("learning_rate", 1e-4)),
        metrics=["accuracy"],
    )
    return model, data

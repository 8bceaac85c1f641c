"""A multi-input, multi-output functional model (the Keras functional API guide's ticket
ranker, small): dict inputs and targets, loss_weights, sample weights, validation_data every
second epoch. `build(params)` returns ckptd.fit_args(...), for a `model:` job."""

import keras
import numpy as np

import ckptd


def build(params):
    rng = np.random.default_rng(2)
    n = 256
    title = rng.integers(0, 50, size=(n, 6))
    body = rng.integers(0, 50, size=(n, 12))
    tags = rng.integers(0, 2, size=(n, 4)).astype("float32")
    priority = rng.random(size=(n, 1)).astype("float32")
    department = rng.integers(0, 3, size=(n,))
    title_in = keras.Input((6,), name="title")
    body_in = keras.Input((12,), name="body")
    tags_in = keras.Input((4,), name="tags")
    t = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(50, 8)(title_in))
    b = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(50, 8)(body_in))
    h = keras.layers.Dropout(0.2)(keras.layers.concatenate([t, b, tags_in]))
    model = keras.Model(
        {"title": title_in, "body": body_in, "tags": tags_in},
        {
            "priority": keras.layers.Dense(1, name="priority")(h),
            "department": keras.layers.Dense(3, name="department")(h),
        },
    )
    model.compile(
        optimizer="rmsprop",
        loss={"priority": "mse", "department": keras.losses.SparseCategoricalCrossentropy(from_logits=True)},
        loss_weights={"priority": 1.0, "department": 0.2},
    )
    x = {"title": title, "body": body, "tags": tags}
    y = {"priority": priority, "department": department}
    weights = rng.random(size=(n,)).astype("float32")
    split = 200
    take = lambda d, s: {k: v[s] for k, v in d.items()}  # noqa: E731
    return ckptd.fit_args(
        model,
        take(x, slice(0, split)),
        take(y, slice(0, split)),
        sample_weight=weights[:split],
        batch_size=16,
        epochs=4,
        validation_data=(take(x, slice(split, n)), take(y, slice(split, n))),
        validation_freq=2,
    )

"""One model on two replicas (distribute: {strategy: mirrored, replicas: 2}: two logical CPU
devices here). Dropout draws from a seed generator; the last training batch of each epoch has
3 rows, so the replicas get 2 and 1. `build(params)` is the `model:` job (ckptd enters the
strategy's scope around it); run as a script, it is the entrypoint job, which builds its model
inside `ckptd.strategy().scope()` itself."""

import keras
import numpy as np

import ckptd


def make_model():
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy", metrics=["accuracy"])
    return model


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(204, 8)).astype("float32")  # 163 training rows: 10 batches of 16, then 3
    y = (x.sum(axis=1) > 0).astype("float32")
    return x, y


def build(params):
    x, y = data()
    return ckptd.fit_args(make_model(), x, y, batch_size=16, epochs=4, validation_split=0.2)


if __name__ == "__main__":
    with ckptd.strategy().scope():
        model = make_model()
    x, y = data()
    ckptd.fit(model, x, y, batch_size=16, epochs=4, validation_split=0.2)

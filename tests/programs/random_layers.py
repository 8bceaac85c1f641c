"""Random layers, augmentation, class weights and the standard callbacks under ckptd.fit.

Every layer here draws from a Keras SeedGenerator that tf.train.Checkpoint(model=...) does not
track; the callbacks keep state across epochs. A resume must restore all of it.
"""

import keras
import numpy as np

import ckptd

rng = np.random.default_rng(0)
x = rng.normal(size=(400, 8, 8, 1)).astype("float32")
y = (x.mean(axis=(1, 2, 3)) > 0).astype("int32")

model = keras.Sequential(
    [
        keras.Input((8, 8, 1)),
        keras.layers.RandomFlip("horizontal"),
        keras.layers.RandomRotation(0.1),
        keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dropout(0.3),
        keras.layers.GaussianNoise(0.1),
        keras.layers.Dense(2, activation="softmax"),
    ]
)
model.compile(
    optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
)


class CountBatches(keras.callbacks.Callback):
    """A user callback with state of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1


counter = CountBatches()
history = ckptd.fit(
    model,
    x,
    y,
    batch_size=16,
    epochs=4,
    validation_split=0.2,
    class_weight={0: 1.0, 1: 2.0},
    callbacks=[
        keras.callbacks.ReduceLROnPlateau(patience=1, factor=0.5),
        keras.callbacks.LearningRateScheduler(lambda epoch, lr: lr * 0.9),
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.CSVLogger("log.csv"),
        keras.callbacks.TensorBoard("tb", update_freq=10),
        counter,
    ],
)
print("epochs", history.epoch, "batches", counter.batches)

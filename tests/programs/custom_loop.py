"""A custom GradientTape loop (the Keras guide "writing a training loop from scratch", small)
with ckptd.session: Dropout, unseeded keras.random in the step, a metric object, data resumed
at (epoch, step_in_epoch)."""

import os
import signal
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import ckptd

rng = np.random.default_rng(0)
x = rng.normal(size=(640, 8)).astype("float32")
y = (x @ rng.normal(size=8) > 0).astype("int32")
inputs = keras.Input((8,))
h = keras.layers.Dropout(0.3)(keras.layers.Dense(16, activation="relu")(inputs))
model = keras.Model(inputs, keras.layers.Dense(2)(h))
optimizer = keras.optimizers.SGD(learning_rate=0.05)
loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
accuracy = keras.metrics.SparseCategoricalAccuracy()


@tf.function
def train_step(xb, yb):
    with tf.GradientTape() as tape:
        logits = model(xb, training=True)
        loss = loss_fn(yb, logits) + 0.0 * tf.reduce_sum(keras.random.normal((1,)))
    grads = tape.gradient(loss, model.trainable_weights)
    optimizer.apply_gradients(zip(grads, model.trainable_weights))
    accuracy.update_state(yb, logits)
    return loss


def sigterm_once(step):
    """params `sigterm_at_step` + `marker`: SIGTERM this worker once, before that step's
    step_done (a preemption landing on exactly that step)."""
    p = ckptd.params()
    if p.get("sigterm_at_step") == step and not Path(p["marker"]).exists():
        Path(p["marker"]).touch()
        os.kill(os.getpid(), signal.SIGTERM)


sess = ckptd.session(model=model, optimizer=optimizer, accuracy=accuracy)  # ckptd
for epoch in range(sess.epoch, 4):  # ckptd: was range(epochs)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(1024, seed=epoch).batch(32)
    for xb, yb in ds.skip(sess.step_in_epoch):  # ckptd: skip the batches already taken
        loss = train_step(xb, yb)
        sigterm_once(sess.step + 1)
        sess.step_done(loss=float(loss))  # ckptd
    if ckptd.params().get("sigterm_at_epoch_end") == epoch and not Path(ckptd.params()["marker"]).exists():
        Path(ckptd.params()["marker"]).touch()  # a preemption during the epoch-end code
        os.kill(os.getpid(), signal.SIGTERM)
    # ckptd: the epoch's figures from the session (a resume may start after the epoch's last step)
    sess.epoch_done({"loss": sess.logs["loss"], "accuracy": float(accuracy.result())})
    accuracy.reset_state()
sess.finish()  # ckptd

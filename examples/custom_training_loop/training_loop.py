"""Writing a training loop from scratch in TensorFlow, ported to ckptd (`ckptd.session`).

Source: https://github.com/keras-team/keras-io/blob/master/guides/writing_a_custom_training_loop_in_tensorflow.py
(fchollet; https://keras.io/guides/writing_a_custom_training_loop_in_tensorflow/), Keras 3 version:
the MNIST MLP, Adam, SparseCategoricalCrossentropy(from_logits=True), train / val accuracy
metrics and the `@tf.function` train_step / test_step loop of "Speeding-up your training step
with tf.function".

Changes from the original, and why:
- The guide trains three times in a row to show its steps (an eager loop, an eager loop with
  metrics, the tf.function loop). The port keeps the setup and the final, complete loop (metrics
  + tf.function) and drops the two eager demonstration loops; the later sections (add_loss, GAN)
  are separate demonstrations and are not ported.
- Data: `keras.datasets.mnist.load_data()` downloads MNIST; the corpus runs offline. `load_data()`
  generates uint8 (n, 28, 28) "digits" from a fixed numpy seed (ten blurry prototypes plus noise).
  Sizes: 6,000 train images with the last 1,000 reserved for validation (the original: 60,000 and
  10,000), 157 steps an epoch, 2 epochs as in the original.
- ckptd: `sess = ckptd.session(model=model, optimizer=optimizer, accuracy=train_acc_metric)` restores the newest commit; the
  loop runs `for epoch in range(sess.epoch, epochs)`, takes its batches from `batches(epoch,
  sess.step_in_epoch)`, and calls `sess.step_done(...)` after each step, `sess.epoch_done(...)`
  after each epoch with the epoch's figures (the loss from `sess.logs`: a run resumed from a commit
  taken on an epoch's last step runs no batch of that epoch, so the loop's own `loss_value` is
  unset there) and `sess.finish()` at the end. `batches()` gives every epoch its own seeded
  shuffle (`seed=epoch`) and skips the batches already taken: a restarted program must see the
  same batches as an uninterrupted one, which the original's unseeded, reshuffle-each-iteration
  `train_dataset` cannot promise when the loop starts again at a later epoch.
"""

import time
import os

# This guide can only be run with the TensorFlow backend.
os.environ["KERAS_BACKEND"] = "tensorflow"

import tensorflow as tf
import keras
import numpy as np

import ckptd


def load_data(n_train=6000, n_test=1000, seed=784):
    """MNIST-shaped stand-in: ((x_train, y_train), (x_test, y_test)), uint8 (n, 28, 28) images."""
    rng = np.random.default_rng(seed)
    prototypes = np.kron(rng.random((10, 7, 7)), np.ones((4, 4)))

    def make(n):
        y = rng.integers(0, 10, size=n).astype("uint8")
        x = 0.3 * prototypes[y] + 0.7 * rng.random((n, 28, 28))
        return (x * 255).astype("uint8"), y

    return make(n_train), make(n_test)


def get_model():
    inputs = keras.Input(shape=(784,), name="digits")
    x1 = keras.layers.Dense(64, activation="relu")(inputs)
    x2 = keras.layers.Dense(64, activation="relu")(x1)
    outputs = keras.layers.Dense(10, name="predictions")(x2)
    model = keras.Model(inputs=inputs, outputs=outputs)
    return model


model = get_model()

# Instantiate an optimizer.
optimizer = keras.optimizers.Adam(learning_rate=1e-3)
# Instantiate a loss function.
loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

# Prepare the training dataset.
batch_size = 32
(x_train, y_train), (x_test, y_test) = load_data()
x_train = np.reshape(x_train, (-1, 784))
x_test = np.reshape(x_test, (-1, 784))

# Reserve 1,000 samples for validation.
x_val = x_train[-1000:]
y_val = y_train[-1000:]
x_train = x_train[:-1000]
y_train = y_train[:-1000]


# Prepare the training dataset: the batches of `epoch`, from batch `start` on.
def batches(epoch, start):
    train_dataset = tf.data.Dataset.from_tensor_slices((x_train, y_train))
    train_dataset = train_dataset.shuffle(buffer_size=1024, seed=epoch).batch(batch_size)
    return train_dataset.skip(start)


# Prepare the validation dataset.
val_dataset = tf.data.Dataset.from_tensor_slices((x_val, y_val))
val_dataset = val_dataset.batch(batch_size)

# Get a fresh model
model = get_model()

# Instantiate an optimizer to train the model.
optimizer = keras.optimizers.Adam(learning_rate=1e-3)
# Instantiate a loss function.
loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

# Prepare the metrics.
train_acc_metric = keras.metrics.SparseCategoricalAccuracy()
val_acc_metric = keras.metrics.SparseCategoricalAccuracy()


@tf.function
def train_step(x, y):
    with tf.GradientTape() as tape:
        logits = model(x, training=True)
        loss_value = loss_fn(y, logits)
    grads = tape.gradient(loss_value, model.trainable_weights)
    optimizer.apply(grads, model.trainable_weights)
    train_acc_metric.update_state(y, logits)
    return loss_value


@tf.function
def test_step(x, y):
    val_logits = model(x, training=False)
    val_acc_metric.update_state(y, val_logits)


sess = ckptd.session(model=model, optimizer=optimizer)

epochs = 2
for epoch in range(sess.epoch, epochs):
    print(f"\nStart of epoch {epoch}")
    start_time = time.time()

    # Iterate over the batches of the dataset.
    start = sess.step_in_epoch
    for step, (x_batch_train, y_batch_train) in enumerate(batches(epoch, start), start):
        loss_value = train_step(x_batch_train, y_batch_train)
        sess.step_done(loss=float(loss_value))

        # Log every 100 batches.
        if step % 100 == 0:
            print(f"Training loss (for 1 batch) at step {step}: {float(loss_value):.4f}")
            print(f"Seen so far: {(step + 1) * batch_size} samples")

    # Display metrics at the end of each epoch.
    train_acc = train_acc_metric.result()
    print(f"Training acc over epoch: {float(train_acc):.4f}")

    # Reset training metrics at the end of each epoch
    train_acc_metric.reset_state()

    # Run a validation loop at the end of each epoch.
    for x_batch_val, y_batch_val in val_dataset:
        test_step(x_batch_val, y_batch_val)

    val_acc = val_acc_metric.result()
    val_acc_metric.reset_state()
    print(f"Validation acc: {float(val_acc):.4f}")
    print(f"Time taken: {time.time() - start_time:.2f}s")
    sess.epoch_done({"loss": sess.logs["loss"], "acc": float(train_acc), "val_acc": float(val_acc)})

sess.finish()

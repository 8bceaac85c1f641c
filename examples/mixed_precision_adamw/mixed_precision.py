"""Mixed precision (mixed_float16) training with AdamW and a learning-rate schedule, ported to ckptd.

Based on: https://github.com/keras-team/keras-io/blob/master/guides/training_with_built_in_methods.py
(fchollet; https://keras.io/guides/training_with_built_in_methods/): its first end-to-end example
(the MNIST MLP, compile, fit with validation_data, evaluate, predict) combined with its section
"Using learning rate schedules" (`keras.optimizers.schedules.ExponentialDecay` passed as an
optimizer's learning rate), trained in mixed precision as the Keras mixed precision API
(https://keras.io/api/mixed_precision/) describes. No keras-io example combines mixed_float16,
AdamW and a schedule in a program small enough for this corpus (ConvMixer, which has AdamW, ran at
~3 s a step in float16 on two CPU cores, far over the corpus budget).

Changes from the original, and why:
- `keras.mixed_precision.set_global_policy("mixed_float16")` before the model is built, and the
  softmax output layer in float32 (`dtype="float32"`), as the mixed precision guide recommends.
  Keras then wraps the optimizer in a LossScaleOptimizer at compile: its dynamic loss scale is
  state ckptd must checkpoint.
- Optimizer: `keras.optimizers.AdamW(learning_rate=lr_schedule, weight_decay=1e-4)` with the
  guide's ExponentialDecay schedule (initial 1e-3 and decay_steps=100 instead of 0.1 / 100000 so
  the decay shows within the run) instead of `keras.optimizers.RMSprop()`.
- Data: `keras.datasets.mnist.load_data()` downloads MNIST; the corpus runs offline. `load_data()`
  generates uint8 (n, 28, 28) "digits" from a fixed numpy seed (ten blurry prototypes plus noise).
  6,000 train (1,000 of them reserved for validation) and 1,000 test images instead of 60,000 /
  10,000 (the reshape counts follow); 4 epochs instead of 2 (79 steps an epoch).
- The guide's torch, tensorflow, os and keras.ops imports are dropped (used only by its later
  sections; torch is not a ckptd dependency).
- ckptd: one import and `ckptd.fit(model, ...)` instead of `model.fit(...)`.
"""

import numpy as np
import keras
from keras import layers

import ckptd

keras.mixed_precision.set_global_policy("mixed_float16")


def load_data(n_train=6000, n_test=1000, seed=1610):
    """MNIST-shaped stand-in: ((x_train, y_train), (x_test, y_test)), uint8 (n, 28, 28) images."""
    rng = np.random.default_rng(seed)
    prototypes = np.kron(rng.random((10, 7, 7)), np.ones((4, 4)))

    def make(n):
        y = rng.integers(0, 10, size=n).astype("uint8")
        x = 0.3 * prototypes[y] + 0.7 * rng.random((n, 28, 28))
        return (x * 255).astype("uint8"), y

    return make(n_train), make(n_test)


inputs = keras.Input(shape=(784,), name="digits")
x = layers.Dense(64, activation="relu", name="dense_1")(inputs)
x = layers.Dense(64, activation="relu", name="dense_2")(x)
outputs = layers.Dense(10, activation="softmax", name="predictions", dtype="float32")(x)

model = keras.Model(inputs=inputs, outputs=outputs)

(x_train, y_train), (x_test, y_test) = load_data()

# Preprocess the data (these are NumPy arrays)
x_train = x_train.reshape(6000, 784).astype("float32") / 255
x_test = x_test.reshape(1000, 784).astype("float32") / 255

y_train = y_train.astype("float32")
y_test = y_test.astype("float32")

# Reserve 1,000 samples for validation
x_val = x_train[-1000:]
y_val = y_train[-1000:]
x_train = x_train[:-1000]
y_train = y_train[:-1000]

initial_learning_rate = 1e-3
lr_schedule = keras.optimizers.schedules.ExponentialDecay(
    initial_learning_rate, decay_steps=100, decay_rate=0.96, staircase=True
)

model.compile(
    optimizer=keras.optimizers.AdamW(learning_rate=lr_schedule, weight_decay=1e-4),  # Optimizer
    # Loss function to minimize
    loss=keras.losses.SparseCategoricalCrossentropy(),
    # List of metrics to monitor
    metrics=[keras.metrics.SparseCategoricalAccuracy()],
)

print("Fit model on training data")
history = ckptd.fit(
    model,
    x_train,
    y_train,
    batch_size=64,
    epochs=4,
    # We pass some validation for
    # monitoring validation loss and metrics
    # at the end of each epoch
    validation_data=(x_val, y_val),
)

print(history.history)

# Evaluate the model on the test data using `evaluate`
print("Evaluate on test data")
results = model.evaluate(x_test, y_test, batch_size=128)
print("test loss, test acc:", results)

# Generate predictions (probabilities -- the output of the last layer)
# on new data using `predict`
print("Generate predictions for 3 samples")
predictions = model.predict(x_test[:3])
print("predictions shape:", predictions.shape)

"""Simple MNIST convnet, ported to ckptd.

Source: https://github.com/keras-team/keras-io/blob/master/examples/vision/mnist_convnet.py
(fchollet; https://keras.io/examples/vision/mnist_convnet/).

Changes from the original, and why:
- Data: `keras.datasets.mnist.load_data()` downloads MNIST; ckptd's conformance corpus must run
  offline. `load_data()` below generates uint8 "digit" images of the same shape and dtype from a
  fixed numpy seed: ten fixed blurry prototypes plus per-image noise, so the task stays learnable.
- Sizes: 3,000 train / 500 test images instead of 60,000 / 10,000 and 6 epochs instead of 15, so a
  run takes well under a minute on two CPU cores. Architecture, compile and fit are unchanged.
- Imports: `import keras` (Keras 3) instead of `from tensorflow import keras`.
- ckptd: one import and `ckptd.fit(model, ...)` instead of `model.fit(...)`.
"""

import numpy as np
import keras
from keras import layers

import ckptd


def load_data(n_train=3000, n_test=500, seed=20240601):
    """MNIST-shaped stand-in: ((x_train, y_train), (x_test, y_test)), uint8 (n, 28, 28) images."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((10, 7, 7))
    prototypes = np.kron(coarse, np.ones((4, 4)))  # ten blocky 28x28 "digits"

    def make(n):
        y = rng.integers(0, 10, size=n).astype("uint8")
        x = 0.25 * prototypes[y] + 0.75 * rng.random((n, 28, 28))
        return (x * 255).astype("uint8"), y

    return make(n_train), make(n_test)


# Model / data parameters
num_classes = 10
input_shape = (28, 28, 1)

# Load the data and split it between train and test sets
(x_train, y_train), (x_test, y_test) = load_data()

# Scale images to the [0, 1] range
x_train = x_train.astype("float32") / 255
x_test = x_test.astype("float32") / 255
# Make sure images have shape (28, 28, 1)
x_train = np.expand_dims(x_train, -1)
x_test = np.expand_dims(x_test, -1)
print("x_train shape:", x_train.shape)
print(x_train.shape[0], "train samples")
print(x_test.shape[0], "test samples")


# convert class vectors to binary class matrices
y_train = keras.utils.to_categorical(y_train, num_classes)
y_test = keras.utils.to_categorical(y_test, num_classes)

model = keras.Sequential(
    [
        keras.Input(shape=input_shape),
        layers.Conv2D(32, kernel_size=(3, 3), activation="relu"),
        layers.MaxPooling2D(pool_size=(2, 2)),
        layers.Conv2D(64, kernel_size=(3, 3), activation="relu"),
        layers.MaxPooling2D(pool_size=(2, 2)),
        layers.Flatten(),
        layers.Dropout(0.5),
        layers.Dense(num_classes, activation="softmax"),
    ]
)

model.summary()

batch_size = 128
epochs = 6

model.compile(loss="categorical_crossentropy", optimizer="adam", metrics=["accuracy"])

ckptd.fit(model, x_train, y_train, batch_size=batch_size, epochs=epochs, validation_split=0.1)

score = model.evaluate(x_test, y_test, verbose=0)
print("Test loss:", score[0])
print("Test accuracy:", score[1])

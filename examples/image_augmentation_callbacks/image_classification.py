"""Image classification from scratch (random augmentation layers) with more callbacks, ported to ckptd.

Source: https://github.com/keras-team/keras-io/blob/master/examples/vision/image_classification_from_scratch.py
(fchollet; https://keras.io/examples/vision/image_classification_from_scratch/).

Changes from the original, and why:
- Data: the original downloads the Kaggle Cats vs Dogs JPEGs, filters corrupt files and reads them
  with `image_dataset_from_directory`; the corpus runs offline. `image_dataset()` generates float32
  RGB images in [0, 255] with 0/1 labels from a fixed numpy seed ("dogs" carry a bright blob at a
  random place, "cats" a dark one) and builds what `image_dataset_from_directory(...,
  validation_split=0.2, subset="both", seed=1337)` returns: a seeded split and seeded
  `shuffle(batch_size * 8)` batched training set, and a validation set. The corrupt-file filter, the
  plots and the single-file inference at the end are dropped (no files, no matplotlib).
- Sizes: 640 images of 32x32 instead of ~23,000 of 180x180, batch 32 instead of 128 (16 steps an
  epoch), 5 epochs instead of 25: the small Xception itself (entry block, the four residual
  SeparableConv2D blocks, BatchNormalization, Dropout) is unchanged.
- `keras.utils.plot_model` is dropped (needs pydot / graphviz). `jit_compile=False` instead of True:
  with XLA a step took 2-3 s on two CPU cores (0.5 s without), far over the corpus budget.
- Callbacks: the original has only ModelCheckpoint("save_at_{epoch}.keras"); this port adds
  ReduceLROnPlateau, LearningRateScheduler, CSVLogger and TerminateOnNaN (the corpus wants them
  exercised under ckptd's resume).
- ckptd: one import and `ckptd.fit(model, ...)` instead of `model.fit(...)`.
"""

import numpy as np
import tensorflow as tf
import keras
from keras import layers

import ckptd


def image_dataset(n=640, validation_split=0.2, seed=1337, image_size=(32, 32), batch_size=32):
    """(train_ds, val_ds) as image_dataset_from_directory(subset="both") gives them."""
    rng = np.random.default_rng(180)
    labels = rng.integers(0, 2, n).astype("int32")
    images = rng.uniform(40, 215, (n,) + image_size + (3,)).astype("float32")
    yy, xx = np.mgrid[: image_size[0], : image_size[1]]
    for i in range(n):
        cy, cx = rng.integers(6, image_size[0] - 6, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 18.0)[..., None]
        images[i] += (1 if labels[i] else -1) * 35 * blob
    images = np.clip(images, 0, 255)
    order = np.random.RandomState(seed).permutation(n)
    images, labels = images[order], labels[order]
    n_val = int(validation_split * n)
    train = tf.data.Dataset.from_tensor_slices((images[:-n_val], labels[:-n_val]))
    train = train.shuffle(buffer_size=batch_size * 8, seed=seed).batch(batch_size)
    val = tf.data.Dataset.from_tensor_slices((images[-n_val:], labels[-n_val:]))
    return train, val.batch(batch_size)


image_size = (32, 32)
batch_size = 32

train_ds, val_ds = image_dataset(
    validation_split=0.2,
    seed=1337,
    image_size=image_size,
    batch_size=batch_size,
)

data_augmentation = keras.Sequential(
    [
        layers.RandomFlip("horizontal"),
        layers.RandomRotation(0.1),
    ]
)

train_ds = train_ds.prefetch(buffer_size=32)
val_ds = val_ds.prefetch(buffer_size=32)


def make_model(input_shape, num_classes):
    inputs = keras.Input(shape=input_shape)

    # Entry block
    x = layers.Rescaling(1.0 / 255)(inputs)
    x = layers.Conv2D(32, 3, strides=2, padding="same")(x)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)

    x = layers.Conv2D(64, 3, padding="same")(x)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)

    previous_block_activation = x  # Set aside residual

    for size in [128, 256, 512, 728]:
        x = layers.Activation("relu")(x)
        x = layers.SeparableConv2D(size, 3, padding="same")(x)
        x = layers.BatchNormalization()(x)

        x = layers.Activation("relu")(x)
        x = layers.SeparableConv2D(size, 3, padding="same")(x)
        x = layers.BatchNormalization()(x)

        x = layers.MaxPooling2D(3, strides=2, padding="same")(x)

        # Project residual
        residual = layers.Conv2D(size, 1, strides=2, padding="same")(previous_block_activation)
        x = layers.add([x, residual])  # Add back residual
        previous_block_activation = x  # Set aside next residual

    x = layers.SeparableConv2D(1024, 3, padding="same")(x)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)

    x = layers.GlobalAveragePooling2D()(x)
    if num_classes == 2:
        activation = "sigmoid"
        units = 1
    else:
        activation = "softmax"
        units = num_classes

    x = layers.Dropout(0.5)(x)
    outputs = layers.Dense(units, activation=activation)(x)
    return keras.Model(inputs, outputs)


model = make_model(input_shape=image_size + (3,), num_classes=2)

# Apply `data_augmentation` to the training images.
train_ds = train_ds.map(
    lambda img, label: (data_augmentation(img), label),
    num_parallel_calls=tf.data.AUTOTUNE,
)
# Prefetching samples in GPU memory helps maximize GPU utilization.
train_ds = train_ds.prefetch(tf.data.AUTOTUNE)

epochs = 5

callbacks = [
    keras.callbacks.ModelCheckpoint("save_at_{epoch}.keras"),
    keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=1),
    keras.callbacks.LearningRateScheduler(lambda epoch, lr: lr if epoch < 3 else lr * 0.9),
    keras.callbacks.CSVLogger("training_log.csv"),
    keras.callbacks.TerminateOnNaN(),
]
model.compile(
    optimizer=keras.optimizers.Adam(1e-3),
    loss="binary_crossentropy",
    metrics=["accuracy"],
    jit_compile=False,  # XLA: 2-3 s a step on 2 CPU cores (see the header)
)
ckptd.fit(
    model,
    train_ds,
    epochs=epochs,
    callbacks=callbacks,
    validation_data=val_ds,
)

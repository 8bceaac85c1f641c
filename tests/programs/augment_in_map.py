"""keras-io's "apply the augmentation to the dataset": RandomFlip and RandomRotation inside a
parallel ds.map, a tf.random.Generator in another map, and BatchNormalization in the model."""

import keras
import numpy as np
import tensorflow as tf

import ckptd

rng = np.random.default_rng(4)
images = rng.random((192, 8, 8, 3)).astype("float32")
labels = (images[:, :4].mean(axis=(1, 2, 3)) > images[:, 4:].mean(axis=(1, 2, 3))).astype("int32")
augment = keras.Sequential([keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.1)])
noise = tf.random.Generator.from_seed(11)
ds = tf.data.Dataset.from_tensor_slices((images, labels)).shuffle(192).batch(16)
ds = ds.map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
ds = ds.map(lambda x, y: (x + 0.01 * noise.normal(tf.shape(x)), y)).prefetch(tf.data.AUTOTUNE)

model = keras.Sequential(
    [
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(4, 3),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(2),
    ]
)
model.compile(
    optimizer="adam", metrics=["accuracy"], loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
)
ckptd.fit(model, ds, epochs=4)

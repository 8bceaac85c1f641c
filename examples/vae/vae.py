"""Variational AutoEncoder (custom `train_step`, no compiled loss, `fit(x)`), ported to ckptd.

Source: https://github.com/keras-team/keras-io/blob/master/examples/generative/vae.py
(fchollet; https://keras.io/examples/generative/vae/), the Keras 3 version (last modified
2024/04/24): a Sampling layer drawing with `keras.random.normal` from its own SeedGenerator.

Changes from the original, and why:
- Data: `keras.datasets.mnist.load_data()` downloads MNIST; the corpus runs offline.
  `load_data()` generates uint8 "digits" of the same shape and dtype from a fixed numpy seed (ten
  blurry prototypes plus noise: structure a 2-d latent space can capture).
- Sizes: 2,000 images (1,700 + 300, concatenated as in the original) instead of 70,000, and
  6 epochs instead of 30 (16 steps an epoch), so a run takes well under a minute on two CPU cores.
  Encoder, decoder, VAE, train_step, compile and fit are unchanged.
- The two plotting sections at the end (latent-space grid, label clusters) are dropped: they need
  matplotlib, which ckptd does not have, and they do not train anything.
- ckptd: one import and `ckptd.fit(vae, ...)` instead of `vae.fit(...)`.
"""

import os

os.environ["KERAS_BACKEND"] = "tensorflow"

import numpy as np
import tensorflow as tf
import keras
from keras import ops
from keras import layers

import ckptd


def load_data(n_train=1700, n_test=300, seed=70000):
    """MNIST-shaped stand-in: ((x_train, y_train), (x_test, y_test)), uint8 (n, 28, 28) images."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((10, 7, 7)) ** 2
    prototypes = np.kron(coarse, np.ones((4, 4)))

    def make(n):
        y = rng.integers(0, 10, size=n).astype("uint8")
        x = np.clip(prototypes[y] + 0.15 * rng.standard_normal((n, 28, 28)), 0, 1)
        return (x * 255).astype("uint8"), y

    return make(n_train), make(n_test)


class Sampling(layers.Layer):
    """Uses (z_mean, z_log_var) to sample z, the vector encoding a digit."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator(1337)

    def call(self, inputs):
        z_mean, z_log_var = inputs
        batch = ops.shape(z_mean)[0]
        dim = ops.shape(z_mean)[1]
        epsilon = keras.random.normal(shape=(batch, dim), seed=self.seed_generator)
        return z_mean + ops.exp(0.5 * z_log_var) * epsilon


latent_dim = 2

encoder_inputs = keras.Input(shape=(28, 28, 1))
x = layers.Conv2D(32, 3, activation="relu", strides=2, padding="same")(encoder_inputs)
x = layers.Conv2D(64, 3, activation="relu", strides=2, padding="same")(x)
x = layers.Flatten()(x)
x = layers.Dense(16, activation="relu")(x)
z_mean = layers.Dense(latent_dim, name="z_mean")(x)
z_log_var = layers.Dense(latent_dim, name="z_log_var")(x)
z = Sampling()([z_mean, z_log_var])
encoder = keras.Model(encoder_inputs, [z_mean, z_log_var, z], name="encoder")
encoder.summary()

latent_inputs = keras.Input(shape=(latent_dim,))
x = layers.Dense(7 * 7 * 64, activation="relu")(latent_inputs)
x = layers.Reshape((7, 7, 64))(x)
x = layers.Conv2DTranspose(64, 3, activation="relu", strides=2, padding="same")(x)
x = layers.Conv2DTranspose(32, 3, activation="relu", strides=2, padding="same")(x)
decoder_outputs = layers.Conv2DTranspose(1, 3, activation="sigmoid", padding="same")(x)
decoder = keras.Model(latent_inputs, decoder_outputs, name="decoder")
decoder.summary()


class VAE(keras.Model):
    def __init__(self, encoder, decoder, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.decoder = decoder
        self.total_loss_tracker = keras.metrics.Mean(name="total_loss")
        self.reconstruction_loss_tracker = keras.metrics.Mean(name="reconstruction_loss")
        self.kl_loss_tracker = keras.metrics.Mean(name="kl_loss")

    @property
    def metrics(self):
        return [
            self.total_loss_tracker,
            self.reconstruction_loss_tracker,
            self.kl_loss_tracker,
        ]

    def train_step(self, data):
        with tf.GradientTape() as tape:
            z_mean, z_log_var, z = self.encoder(data)
            reconstruction = self.decoder(z)
            reconstruction_loss = ops.mean(
                ops.sum(
                    keras.losses.binary_crossentropy(data, reconstruction),
                    axis=(1, 2),
                )
            )
            kl_loss = -0.5 * (1 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var))
            kl_loss = ops.mean(ops.sum(kl_loss, axis=1))
            total_loss = reconstruction_loss + kl_loss
        grads = tape.gradient(total_loss, self.trainable_weights)
        self.optimizer.apply_gradients(zip(grads, self.trainable_weights))
        self.total_loss_tracker.update_state(total_loss)
        self.reconstruction_loss_tracker.update_state(reconstruction_loss)
        self.kl_loss_tracker.update_state(kl_loss)
        return {
            "loss": self.total_loss_tracker.result(),
            "reconstruction_loss": self.reconstruction_loss_tracker.result(),
            "kl_loss": self.kl_loss_tracker.result(),
        }


(x_train, _), (x_test, _) = load_data()
mnist_digits = np.concatenate([x_train, x_test], axis=0)
mnist_digits = np.expand_dims(mnist_digits, -1).astype("float32") / 255

vae = VAE(encoder, decoder)
vae.compile(optimizer=keras.optimizers.Adam())
ckptd.fit(vae, mnist_digits, epochs=6, batch_size=128)

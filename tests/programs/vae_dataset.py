"""A VAE with a custom train_step and no call(): trained on x alone (no targets), from an
already-batched tf.data pipeline that reshuffles every pass, with steps_per_epoch; sampling
uses both a layer's SeedGenerator and unseeded keras.random (Keras's global generator)."""

import keras
import numpy as np
import tensorflow as tf

import ckptd


class Sampling(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator(1337)

    def call(self, inputs):
        z_mean, z_log_var = inputs
        eps = keras.random.normal(keras.ops.shape(z_mean), seed=self.seed_generator)
        return z_mean + keras.ops.exp(0.5 * z_log_var) * eps


inputs = keras.Input((16,))
h = keras.layers.Dense(8, activation="relu")(inputs)
z_mean, z_log_var = keras.layers.Dense(2)(h), keras.layers.Dense(2)(h)
encoder = keras.Model(inputs, [z_mean, z_log_var, Sampling()([z_mean, z_log_var])])
latent = keras.Input((2,))
decoder = keras.Model(latent, keras.layers.Dense(16)(keras.layers.Dense(8, activation="relu")(latent)))


class VAE(keras.Model):
    def __init__(self, encoder, decoder, **kwargs):
        super().__init__(**kwargs)
        self.encoder, self.decoder = encoder, decoder
        self.loss_tracker = keras.metrics.Mean(name="loss")

    @property
    def metrics(self):
        return [self.loss_tracker]

    def train_step(self, data):
        with tf.GradientTape() as tape:
            z_mean, z_log_var, z = self.encoder(data)
            jitter = 0.01 * keras.random.normal(keras.ops.shape(z))  # unseeded: global generator
            reconstruction = self.decoder(z + jitter)
            loss = keras.ops.mean(keras.ops.square(data - reconstruction)) - 0.5 * keras.ops.mean(
                1 + z_log_var - keras.ops.square(z_mean) - keras.ops.exp(z_log_var)
            )
        grads = tape.gradient(loss, self.trainable_weights)
        self.optimizer.apply_gradients(zip(grads, self.trainable_weights))
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}


data = np.random.default_rng(1).normal(size=(300, 16)).astype("float32")
dataset = tf.data.Dataset.from_tensor_slices(data).shuffle(300, seed=5).batch(20)
vae = VAE(encoder, decoder)
vae.compile(optimizer=keras.optimizers.Adam())
ckptd.fit(vae, dataset, epochs=5, steps_per_epoch=12)

"""A GAN with its own compile(d_optimizer, g_optimizer, loss_fn) (the keras-io DCGAN pattern,
dense and small): no model.optimizer, no compiled loss, no call(); fit(x) on arrays."""

import keras
import numpy as np
import tensorflow as tf

import ckptd

LATENT = 4
discriminator = keras.Sequential(
    [
        keras.Input((8,)),
        keras.layers.Dense(8),
        keras.layers.LeakyReLU(0.2),
        keras.layers.Dropout(0.2),
        keras.layers.Dense(1),
    ]
)
generator = keras.Sequential([keras.Input((LATENT,)), keras.layers.Dense(8)])


class GAN(keras.Model):
    def __init__(self, discriminator, generator):
        super().__init__()
        self.discriminator, self.generator = discriminator, generator
        self.seed_generator = keras.random.SeedGenerator(1337)

    def compile(self, d_optimizer, g_optimizer, loss_fn):
        super().compile()
        self.d_optimizer, self.g_optimizer, self.loss_fn = d_optimizer, g_optimizer, loss_fn
        self.d_loss_metric = keras.metrics.Mean(name="d_loss")
        self.g_loss_metric = keras.metrics.Mean(name="g_loss")

    @property
    def metrics(self):
        return [self.d_loss_metric, self.g_loss_metric]

    def train_step(self, real):
        n = tf.shape(real)[0]
        latent = keras.random.normal((n, LATENT), seed=self.seed_generator)
        fake = self.generator(latent)
        both = tf.concat([fake, real], axis=0)
        labels = tf.concat([tf.ones((n, 1)), tf.zeros((n, 1))], axis=0)
        labels += 0.05 * keras.random.uniform(tf.shape(labels), seed=self.seed_generator)
        with tf.GradientTape() as tape:
            d_loss = self.loss_fn(labels, self.discriminator(both, training=True))
        grads = tape.gradient(d_loss, self.discriminator.trainable_weights)
        self.d_optimizer.apply_gradients(zip(grads, self.discriminator.trainable_weights))
        latent = keras.random.normal((n, LATENT), seed=self.seed_generator)
        with tf.GradientTape() as tape:
            g_loss = self.loss_fn(tf.zeros((n, 1)), self.discriminator(self.generator(latent)))
        grads = tape.gradient(g_loss, self.generator.trainable_weights)
        self.g_optimizer.apply_gradients(zip(grads, self.generator.trainable_weights))
        self.d_loss_metric.update_state(d_loss)
        self.g_loss_metric.update_state(g_loss)
        return {"d_loss": self.d_loss_metric.result(), "g_loss": self.g_loss_metric.result()}


real = np.random.default_rng(3).normal(1.0, 0.5, size=(320, 8)).astype("float32")
gan = GAN(discriminator, generator)
gan.compile(
    d_optimizer=keras.optimizers.Adam(1e-3),
    g_optimizer=keras.optimizers.Adam(1e-3),
    loss_fn=keras.losses.BinaryCrossentropy(from_logits=True),
)
ckptd.fit(gan, real, batch_size=32, epochs=4)

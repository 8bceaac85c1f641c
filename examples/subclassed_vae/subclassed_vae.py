"""The subclassing guide's end-to-end VariationalAutoEncoder (Sampling layer, add_loss), ported to ckptd.

Source: https://github.com/keras-team/keras-io/blob/master/guides/making_new_layers_and_models_via_subclassing.py
(fchollet; https://keras.io/guides/making_new_layers_and_models_via_subclassing/), section
"Putting it all together: an end-to-end example" (Keras 3 version).

Changes from the original, and why:
- Only that section is ported (with the guide's setup imports); the guide's earlier sections are
  separate layer demonstrations.
- Data: `keras.datasets.mnist.load_data()` downloads MNIST; the corpus runs offline. `load_data()`
  generates uint8 (n, 28, 28) "digits" from a fixed numpy seed (ten blurry prototypes plus noise).
- Sizes: 3,000 images instead of 60,000 (the original's `reshape(60000, 784)` becomes
  `reshape(-1, 784)`), 3 epochs instead of 2 (47 steps an epoch) so checkpoints commit several
  times. Sampling / Encoder / Decoder / VariationalAutoEncoder, compile and fit are unchanged.
- ckptd: one import and `ckptd.fit(vae, ...)` instead of `vae.fit(...)`.
"""

import numpy as np
import keras
from keras import ops
from keras import layers

import ckptd


def load_data(n_train=3000, n_test=500, seed=60000):
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


class Encoder(layers.Layer):
    """Maps MNIST digits to a triplet (z_mean, z_log_var, z)."""

    def __init__(self, latent_dim=32, intermediate_dim=64, name="encoder", **kwargs):
        super().__init__(name=name, **kwargs)
        self.dense_proj = layers.Dense(intermediate_dim, activation="relu")
        self.dense_mean = layers.Dense(latent_dim)
        self.dense_log_var = layers.Dense(latent_dim)
        self.sampling = Sampling()

    def call(self, inputs):
        x = self.dense_proj(inputs)
        z_mean = self.dense_mean(x)
        z_log_var = self.dense_log_var(x)
        z = self.sampling((z_mean, z_log_var))
        return z_mean, z_log_var, z


class Decoder(layers.Layer):
    """Converts z, the encoded digit vector, back into a readable digit."""

    def __init__(self, original_dim, intermediate_dim=64, name="decoder", **kwargs):
        super().__init__(name=name, **kwargs)
        self.dense_proj = layers.Dense(intermediate_dim, activation="relu")
        self.dense_output = layers.Dense(original_dim, activation="sigmoid")

    def call(self, inputs):
        x = self.dense_proj(inputs)
        return self.dense_output(x)


class VariationalAutoEncoder(keras.Model):
    """Combines the encoder and decoder into an end-to-end model for training."""

    def __init__(self, original_dim, intermediate_dim=64, latent_dim=32, name="autoencoder", **kwargs):
        super().__init__(name=name, **kwargs)
        self.original_dim = original_dim
        self.encoder = Encoder(latent_dim=latent_dim, intermediate_dim=intermediate_dim)
        self.decoder = Decoder(original_dim, intermediate_dim=intermediate_dim)

    def call(self, inputs):
        z_mean, z_log_var, z = self.encoder(inputs)
        reconstructed = self.decoder(z)
        # Add KL divergence regularization loss.
        kl_loss = -0.5 * ops.mean(z_log_var - ops.square(z_mean) - ops.exp(z_log_var) + 1)
        self.add_loss(kl_loss)
        return reconstructed


(x_train, _), _ = load_data()
x_train = x_train.reshape(-1, 784).astype("float32") / 255

original_dim = 784
vae = VariationalAutoEncoder(784, 64, 32)

optimizer = keras.optimizers.Adam(learning_rate=1e-3)
vae.compile(optimizer, loss=keras.losses.MeanSquaredError())

ckptd.fit(vae, x_train, x_train, epochs=3, batch_size=64)

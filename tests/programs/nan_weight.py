"""A weight goes NaN at step 13 while the loss stays finite (an unused trainable variable, set
NaN by the train step): only the weights' check before a commit can see it."""

import keras
import numpy as np
import tensorflow as tf

import ckptd


class Unused(keras.layers.Layer):
    def build(self, input_shape):
        self.unused = self.add_weight(shape=(3,), initializer="zeros", name="unused")

    def call(self, x):
        return x


class Broken(keras.Model):
    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(self(x, training=True) - y))
        pairs = [
            (g, v)
            for g, v in zip(tape.gradient(loss, self.trainable_weights), self.trainable_weights)
            if g is not None
        ]
        self.optimizer.apply_gradients(pairs)
        unused = self.layers[1].unused
        unused.assign(tf.where(self.optimizer.iterations >= 13, np.nan, 0.0) * tf.ones_like(unused))
        return {"loss": loss}


rng = np.random.default_rng(0)
x = rng.normal(size=(1024, 4)).astype("float32")
y = x.sum(axis=1, keepdims=True)
inputs = keras.Input((4,))
model = Broken(inputs, keras.layers.Dense(1)(Unused()(inputs)))
model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01))
ckptd.fit(model, x, y, epochs=1, batch_size=16)

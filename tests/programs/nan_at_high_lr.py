"""Goes NaN at step 13 while its learning rate is above 0.05 (a stand-in for divergence): the
weights turn NaN after two finite commits (every 5 steps). With restart.on_nan: restart and a
learning rate lowered below 0.05, it trains to the end."""

import keras
import numpy as np
import tensorflow as tf

import ckptd


class Diverging(keras.Model):
    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(self(x, training=True) - y))
            blow_up = (self.optimizer.iterations >= 12) & (self.optimizer.learning_rate > 0.05)
            loss = loss * tf.where(blow_up, np.nan, 1.0)  # no NaN on the gradient path before
        grads = tape.gradient(loss, self.trainable_weights)
        self.optimizer.apply_gradients(zip(grads, self.trainable_weights))
        return {"loss": loss}


rng = np.random.default_rng(0)
x = rng.normal(size=(256, 4)).astype("float32")
y = x.sum(axis=1, keepdims=True)
inputs = keras.Input((4,))
model = Diverging(inputs, keras.layers.Dense(1)(inputs))
model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1))
ckptd.fit(model, x, y, epochs=2, batch_size=16)

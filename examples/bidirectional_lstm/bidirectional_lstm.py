"""Bidirectional LSTM on IMDB, ported to ckptd.

Source: https://github.com/keras-team/keras-io/blob/master/examples/nlp/bidirectional_lstm_imdb.py
(fchollet; https://keras.io/examples/nlp/bidirectional_lstm_imdb/).

Changes from the original, and why:
- Data: `keras.datasets.imdb.load_data()` downloads IMDB; the corpus runs offline. `load_data()`
  below returns the same structure (object arrays of variable-length lists of word indices in
  [1, num_words), int64 0/1 labels) from a fixed numpy seed; the label decides how many of a
  fixed set of "positive" or "negative" word indices a review contains, so it is learnable.
- Sizes: 800 train / 200 validation reviews instead of 25,000 / 25,000 and `maxlen` 32 instead
  of 200 (an LSTM step per word is the cost on CPU), 3 epochs instead of 2 so checkpoints commit
  several times; the model (Embedding(20000, 128), 2 x Bidirectional(LSTM(64)), Dense), compile
  and fit (batch 32, validation_data) are as in the original.
- Imports: `import keras` (Keras 3) instead of `from tensorflow import keras`.
- ckptd: one import and `ckptd.fit(model, ...)` instead of `model.fit(...)`.
"""

import numpy as np
import keras
from keras import layers

import ckptd

max_features = 20000  # Only consider the top 20k words
maxlen = 32  # Only consider the first 32 words of each movie review


def load_data(num_words, n_train=800, n_val=200, seed=25000):
    """imdb.load_data stand-in: ((x_train, y_train), (x_val, y_val)), lists of word indices."""
    rng = np.random.default_rng(seed)
    sentiment = rng.choice(np.arange(4, num_words), size=(2, 30), replace=False)

    def make(n):
        xs, ys = np.empty(n, dtype=object), rng.integers(0, 2, n)
        for i in range(n):
            words = list(rng.integers(4, num_words, rng.integers(20, 90)))
            for _ in range(rng.integers(3, 8)):
                words.insert(rng.integers(0, len(words)), int(rng.choice(sentiment[ys[i]])))
            xs[i] = [1] + [int(w) for w in words]  # 1 marks the start, as in imdb.load_data
        return xs, ys

    return make(n_train), make(n_val)


# Input for variable-length sequences of integers
inputs = keras.Input(shape=(None,), dtype="int32")
# Embed each integer in a 128-dimensional vector
x = layers.Embedding(max_features, 128)(inputs)
# Add 2 bidirectional LSTMs
x = layers.Bidirectional(layers.LSTM(64, return_sequences=True))(x)
x = layers.Bidirectional(layers.LSTM(64))(x)
# Add a classifier
outputs = layers.Dense(1, activation="sigmoid")(x)
model = keras.Model(inputs, outputs)
model.summary()

(x_train, y_train), (x_val, y_val) = load_data(num_words=max_features)
print(len(x_train), "Training sequences")
print(len(x_val), "Validation sequences")
# Use pad_sequence to standardize sequence length:
# this will truncate sequences longer than 32 words and zero-pad sequences shorter than 32 words.
x_train = keras.preprocessing.sequence.pad_sequences(x_train, maxlen=maxlen)
x_val = keras.preprocessing.sequence.pad_sequences(x_val, maxlen=maxlen)

model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
ckptd.fit(model, x_train, y_train, batch_size=32, epochs=3, validation_data=(x_val, y_val))

"""Text classification from scratch, ported to ckptd.

Source: https://github.com/keras-team/keras-io/blob/master/examples/nlp/text_classification_from_scratch.py
(Mark Omernick, Francois Chollet; https://keras.io/examples/nlp/text_classification_from_scratch/).

Changes from the original, and why:
- Data: the original downloads the raw IMDB reviews (aclImdb) and reads them with
  `keras.utils.text_dataset_from_directory`; the corpus runs offline. `make_reviews()` generates
  raw review strings (made-up words, sentiment words, punctuation and "<br />" tags, so the custom
  standardization still has work to do) from a fixed numpy seed, and `text_dataset()` builds the
  same batched (string, int32 label) tf.data.Datasets as `text_dataset_from_directory` does:
  a seeded split by `validation_split` / `subset`, a seeded `shuffle(batch_size * 8)`, `batch`.
- Sizes: 2,000 train (1,600 / 400 split) and 500 test reviews instead of 25,000 / 25,000;
  `sequence_length` 200 instead of 500, so a run takes well under a minute on two CPU cores.
  The model (Embedding(20000, 128), Dropout, 2x Conv1D(128, 7, strides=3), GlobalMaxPooling1D,
  Dense, Dropout, Dense), compile and fit (3 epochs) are as in the original.
- ckptd: one import and `ckptd.fit(model, ...)` instead of `model.fit(...)`.
"""

import os

os.environ["KERAS_BACKEND"] = "tensorflow"

import keras
import tensorflow as tf
import numpy as np
from keras import layers

import ckptd


def make_reviews(n, seed):
    """n raw "reviews" and labels (0 = pos, 1 = neg, as class_names=["pos", "neg"] gives)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, rng.integers(2, 9))) for _ in range(4000)]
    positive = ["great", "wonderful", "superb", "moving", "brilliant", "loved", "fun", "touching"]
    negative = ["awful", "boring", "dull", "terrible", "waste", "hated", "poor", "mess"]
    texts, labels = [], []
    for _ in range(n):
        label = int(rng.integers(0, 2))
        words = list(rng.choice(vocab, rng.integers(60, 240)))
        own, other = (negative, positive) if label else (positive, negative)
        for _ in range(rng.integers(10, 25)):
            words.insert(rng.integers(0, len(words)), str(rng.choice(own)))
        for _ in range(rng.integers(0, 3)):
            words.insert(rng.integers(0, len(words)), str(rng.choice(other)))
        for i in rng.choice(len(words), 6, replace=False):
            words[i] = words[i].capitalize() + str(rng.choice([",", ".", "!", "<br />"]))
        texts.append(" ".join(words))
        labels.append(label)
    return np.array(texts), np.array(labels, dtype="int32")


def text_dataset(texts, labels, batch_size, validation_split=None, subset=None, seed=None):
    """What `text_dataset_from_directory` yields for these texts: batches of (string, label)."""
    order = np.random.RandomState(seed if seed is not None else 0).permutation(len(texts))
    texts, labels = texts[order], labels[order]
    if validation_split:
        n_val = int(validation_split * len(texts))
        part = slice(-n_val, None) if subset == "validation" else slice(None, -n_val)
        texts, labels = texts[part], labels[part]
    ds = tf.data.Dataset.from_tensor_slices((texts, labels))
    ds = ds.shuffle(buffer_size=batch_size * 8, seed=seed)
    return ds.batch(batch_size)


train_texts, train_labels = make_reviews(2000, seed=101)
test_texts, test_labels = make_reviews(500, seed=202)

batch_size = 32

raw_train_ds = text_dataset(
    train_texts,
    train_labels,
    batch_size=batch_size,
    validation_split=0.2,
    subset="training",
    seed=1337,
)
raw_val_ds = text_dataset(
    train_texts,
    train_labels,
    batch_size=batch_size,
    validation_split=0.2,
    subset="validation",
    seed=1337,
)
raw_test_ds = text_dataset(test_texts, test_labels, batch_size=batch_size)

print(f"Number of batches in raw_train_ds: {raw_train_ds.cardinality()}")
print(f"Number of batches in raw_val_ds: {raw_val_ds.cardinality()}")
print(f"Number of batches in raw_test_ds: {raw_test_ds.cardinality()}")

# It's important to take a look at your raw data to ensure your normalization
# and tokenization will work as expected. We can do that by taking a few
# examples from the training set and looking at them.
# This is one of the places where eager execution shines:
# we can just evaluate these tensors using .numpy()
# instead of needing to evaluate them in a Session/Graph context.
for text_batch, label_batch in raw_train_ds.take(1):
    for i in range(5):
        print(text_batch.numpy()[i])
        print(label_batch.numpy()[i])

import string  # noqa: E402 (imported here in the original)
import re  # noqa: E402


# Having looked at our data above, we see that the raw text contains HTML break
# tags of the form '<br />'. These tags will not be removed by the default
# standardizer (which doesn't strip HTML). Because of this, we will need to
# create a custom standardization function.
def custom_standardization(input_data):
    lowercase = tf.strings.lower(input_data)
    stripped_html = tf.strings.regex_replace(lowercase, "<br />", " ")
    return tf.strings.regex_replace(stripped_html, f"[{re.escape(string.punctuation)}]", "")


# Model constants.
max_features = 20000
embedding_dim = 128
sequence_length = 200

# Now that we have our custom standardization, we can instantiate our text
# vectorization layer. We are using this layer to normalize, split, and map
# strings to integers, so we set our 'output_mode' to 'int'.
# Note that we're using the default split function,
# and the custom standardization defined above.
# We also set an explicit maximum sequence length, since the CNNs later in our
# model won't support ragged sequences.
vectorize_layer = keras.layers.TextVectorization(
    standardize=custom_standardization,
    max_tokens=max_features,
    output_mode="int",
    output_sequence_length=sequence_length,
)

# Now that the vectorize_layer has been created, call `adapt` on a text-only
# dataset to create the vocabulary. You don't have to batch, but for very large
# datasets this means you're not keeping spare copies of the dataset in memory.

# Let's make a text-only dataset (no labels):
text_ds = raw_train_ds.map(lambda x, y: x)
# Let's call `adapt`:
vectorize_layer.adapt(text_ds)


def vectorize_text(text, label):
    text = tf.expand_dims(text, -1)
    return vectorize_layer(text), label


# Vectorize the data.
train_ds = raw_train_ds.map(vectorize_text)
val_ds = raw_val_ds.map(vectorize_text)
test_ds = raw_test_ds.map(vectorize_text)

# Do async prefetching / buffering of the data for best performance on GPU.
train_ds = train_ds.cache().prefetch(buffer_size=10)
val_ds = val_ds.cache().prefetch(buffer_size=10)
test_ds = test_ds.cache().prefetch(buffer_size=10)

# A integer input for vocab indices.
inputs = keras.Input(shape=(None,), dtype="int64")

# Next, we add a layer to map those vocab indices into a space of dimensionality
# 'embedding_dim'.
x = layers.Embedding(max_features, embedding_dim)(inputs)
x = layers.Dropout(0.5)(x)

# Conv1D + global max pooling
x = layers.Conv1D(128, 7, padding="valid", activation="relu", strides=3)(x)
x = layers.Conv1D(128, 7, padding="valid", activation="relu", strides=3)(x)
x = layers.GlobalMaxPooling1D()(x)

# We add a vanilla hidden layer:
x = layers.Dense(128, activation="relu")(x)
x = layers.Dropout(0.5)(x)

# We project onto a single unit output layer, and squash it with a sigmoid:
predictions = layers.Dense(1, activation="sigmoid", name="predictions")(x)

model = keras.Model(inputs, predictions)

# Compile the model with binary crossentropy loss and an adam optimizer.
model.compile(loss="binary_crossentropy", optimizer="adam", metrics=["accuracy"])

epochs = 3

# Fit the model using the train and test datasets.
ckptd.fit(model, train_ds, validation_data=val_ds, epochs=epochs)

model.evaluate(test_ds)

# A string input
inputs = keras.Input(shape=(1,), dtype="string")
# Turn strings into vocab indices
indices = vectorize_layer(inputs)
# Turn vocab indices into predictions
outputs = model(indices)

# Our end to end model
end_to_end_model = keras.Model(inputs, outputs)
end_to_end_model.compile(loss="binary_crossentropy", optimizer="adam", metrics=["accuracy"])

# Test it with `raw_test_ds`, which yields raw strings
end_to_end_model.evaluate(raw_test_ds)

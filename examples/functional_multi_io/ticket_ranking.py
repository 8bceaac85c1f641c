"""The functional API guide's multi-input / multi-output ticket model, ported to ckptd.

Source: https://github.com/keras-team/keras-io/blob/master/guides/functional_api.py
(fchollet; https://keras.io/guides/functional_api/), section "Models with multiple inputs and
outputs": title / body / tags -> priority / department, with per-output losses and loss_weights.

Changes from the original, and why:
- Only that section of the guide is ported (with the guide's setup imports); the guide's other
  sections are separate demonstrations.
- Data: the guide trains on unseeded `np.random` dummy data with random targets (nothing to learn).
  Here the same arrays (shapes, dtypes, value ranges) come from a fixed numpy seed and the targets
  are a fixed function of the inputs (priority from the tags and a "urgent" word in the title,
  department one-hot from two of the tags), so the loss goes down and runs are reproducible.
- `keras.utils.plot_model(...)` is dropped: it needs pydot / graphviz, which ckptd does not have.
- Epochs 3 instead of 2 (40 steps an epoch), so that checkpoints commit several times a run.
- ckptd: one import and `ckptd.fit(model, ...)` instead of `model.fit(...)`.
"""

import numpy as np
import keras
from keras import layers
from keras import ops  # noqa: F401 (the guide's setup; used by its later sections)

import ckptd

num_tags = 12  # Number of unique issue tags
num_words = 10000  # Size of vocabulary obtained when preprocessing text data
num_departments = 4  # Number of departments for predictions

title_input = keras.Input(shape=(None,), name="title")  # Variable-length sequence of ints
body_input = keras.Input(shape=(None,), name="body")  # Variable-length sequence of ints
tags_input = keras.Input(shape=(num_tags,), name="tags")  # Binary vectors of size `num_tags`

# Embed each word in the title into a 64-dimensional vector
title_features = layers.Embedding(num_words, 64)(title_input)
# Embed each word in the text into a 64-dimensional vector
body_features = layers.Embedding(num_words, 64)(body_input)

# Reduce sequence of embedded words in the title into a single 128-dimensional vector
title_features = layers.LSTM(128)(title_features)
# Reduce sequence of embedded words in the body into a single 32-dimensional vector
body_features = layers.LSTM(32)(body_features)

# Merge all available features into a single large vector via concatenation
x = layers.concatenate([title_features, body_features, tags_input])

# Stick a logistic regression for priority prediction on top of the features
priority_pred = layers.Dense(1, name="priority")(x)
# Stick a department classifier on top of the features
department_pred = layers.Dense(num_departments, name="department")(x)

# Instantiate an end-to-end model predicting both priority and department
model = keras.Model(
    inputs=[title_input, body_input, tags_input],
    outputs={"priority": priority_pred, "department": department_pred},
)

model.compile(
    optimizer=keras.optimizers.RMSprop(1e-3),
    loss=[
        keras.losses.BinaryCrossentropy(from_logits=True),
        keras.losses.CategoricalCrossentropy(from_logits=True),
    ],
    loss_weights=[1.0, 0.2],
)

model.compile(
    optimizer=keras.optimizers.RMSprop(1e-3),
    loss={
        "priority": keras.losses.BinaryCrossentropy(from_logits=True),
        "department": keras.losses.CategoricalCrossentropy(from_logits=True),
    },
    loss_weights={"priority": 1.0, "department": 0.2},
)

# Generated input data (fixed seed) with the dummy data's shapes and dtypes
rng = np.random.default_rng(1280)
title_data = rng.integers(num_words, size=(1280, 10))
body_data = rng.integers(num_words, size=(1280, 100))
tags_data = rng.integers(2, size=(1280, num_tags)).astype("float32")

# Targets: a fixed function of the inputs (learnable)
urgent = (title_data < 500).any(axis=1)
priority_targets = (0.5 * urgent + 0.5 * tags_data[:, :4].mean(axis=1)).reshape(1280, 1)
dept_targets = np.eye(num_departments)[(tags_data[:, 4] + 2 * tags_data[:, 5]).astype(int)]

ckptd.fit(
    model,
    {"title": title_data, "body": body_data, "tags": tags_data},
    {"priority": priority_targets, "department": dept_targets},
    epochs=3,
    batch_size=32,
)

"""Imbalanced classification: credit card fraud detection (class_weight), ported to ckptd.

Source: https://github.com/keras-team/keras-io/blob/master/examples/structured_data/imbalanced_classification.py
(fchollet; https://keras.io/examples/structured_data/imbalanced_classification/).

Changes from the original, and why:
- Data: the original reads Kaggle's creditcard.csv (284,807 rows, 30 float features, 0.17 %
  fraud) from a local path; the corpus has no such file and runs offline. `read_creditcard_rows()`
  generates CSV-like rows of the same layout (30 float features, a 0/1 class) from a fixed numpy
  seed: heavy-tailed features, fraud = the top ~1 % of a fixed random projection plus noise, so the
  minority class is learnable. The original's parsing and vectorizing code then runs on those rows.
- Sizes: 12,000 rows instead of 284,807 (5 steps of 2,048 an epoch) and 20 epochs instead of 30,
  so a run takes about half a minute on two CPU cores.
- The model, metrics, compile, ModelCheckpoint callback and fit (class_weight, validation_data,
  batch_size 2048) are as in the original.
- ckptd: one import and `ckptd.fit(model, ...)` instead of `model.fit(...)`.
"""

import csv  # noqa: F401 (as in the original)
import numpy as np

import ckptd


def read_creditcard_rows(n=12000, seed=284807):
    """Lines of a creditcard.csv stand-in: a header, then 30 features and a quoted class."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(df=4, size=(n, 30)).astype("float32")
    x[:, 0] = np.sort(rng.uniform(0, 172792, n))  # "Time"
    x[:, 29] = rng.gamma(1.0, 88.0, n)  # "Amount"
    score = x[:, 1:29] @ rng.standard_normal(28) + 0.5 * rng.standard_normal(n)
    y = (score > np.quantile(score, 0.99)).astype(int)
    yield ",".join(f'"V{i}"' for i in range(30)) + ',"Class"'
    for row, label in zip(x, y):
        yield ",".join(f"{v:.6f}" for v in row) + f',"{label}"'


all_features = []
all_targets = []
for i, line in enumerate(read_creditcard_rows()):
    if i == 0:
        print("HEADER:", line.strip())
        continue  # Skip header
    fields = line.strip().split(",")
    all_features.append([float(v.replace('"', "")) for v in fields[:-1]])
    all_targets.append([int(fields[-1].replace('"', ""))])
    if i == 1:
        print("EXAMPLE FEATURES:", all_features[-1])

features = np.array(all_features, dtype="float32")
targets = np.array(all_targets, dtype="uint8")
print("features.shape:", features.shape)
print("targets.shape:", targets.shape)

num_val_samples = int(len(features) * 0.2)
train_features = features[:-num_val_samples]
train_targets = targets[:-num_val_samples]
val_features = features[-num_val_samples:]
val_targets = targets[-num_val_samples:]

print("Number of training samples:", len(train_features))
print("Number of validation samples:", len(val_features))

counts = np.bincount(train_targets[:, 0])
print(
    "Number of positive samples in training data: {} ({:.2f}% of total)".format(
        counts[1], 100 * float(counts[1]) / len(train_targets)
    )
)

weight_for_0 = 1.0 / counts[0]
weight_for_1 = 1.0 / counts[1]

mean = np.mean(train_features, axis=0)
train_features -= mean
val_features -= mean
std = np.std(train_features, axis=0)
train_features /= std
val_features /= std

import keras  # noqa: E402 (imported here in the original)

model = keras.Sequential(
    [
        keras.Input(shape=train_features.shape[1:]),
        keras.layers.Dense(256, activation="relu"),
        keras.layers.Dense(256, activation="relu"),
        keras.layers.Dropout(0.3),
        keras.layers.Dense(256, activation="relu"),
        keras.layers.Dropout(0.3),
        keras.layers.Dense(1, activation="sigmoid"),
    ]
)
model.summary()

metrics = [
    keras.metrics.FalseNegatives(name="fn"),
    keras.metrics.FalsePositives(name="fp"),
    keras.metrics.TrueNegatives(name="tn"),
    keras.metrics.TruePositives(name="tp"),
    keras.metrics.Precision(name="precision"),
    keras.metrics.Recall(name="recall"),
]

model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy", metrics=metrics)

callbacks = [keras.callbacks.ModelCheckpoint("fraud_model_at_epoch_{epoch}.keras")]
class_weight = {0: weight_for_0, 1: weight_for_1}

ckptd.fit(
    model,
    train_features,
    train_targets,
    batch_size=2048,
    epochs=20,
    verbose=2,
    callbacks=callbacks,
    validation_data=(val_features, val_targets),
    class_weight=class_weight,
)

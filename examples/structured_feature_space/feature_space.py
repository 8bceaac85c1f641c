"""Structured data classification with FeatureSpace, ported to ckptd.

Source: https://github.com/keras-team/keras-io/blob/master/examples/structured_data/structured_data_classification_with_feature_space.py
(fchollet; https://keras.io/examples/structured_data/structured_data_classification_with_feature_space/).

Changes from the original, and why:
- Data: the original downloads heart.csv into a pandas DataFrame; the corpus runs offline and pandas
  is not a ckptd dependency. `load_heart_dataframe()` generates the same 13 feature columns + target
  (303 rows; same value ranges and dtypes: int64 codes, float64 oldpeak, string thal) from a fixed
  numpy seed, with the target drawn from a fixed logistic model of the features so it is learnable.
  A "dataframe" here is a dict of numpy columns; `sample_rows` / `drop_rows` stand in for
  `DataFrame.sample(frac, random_state)` / `DataFrame.drop(index)`.
- Imports: `import keras` (Keras 3) instead of `from tensorflow import keras`.
- The exploratory `dataframe.head()` line is dropped (no pandas).
- ckptd: one import and `ckptd.fit(training_model, ...)` instead of `training_model.fit(...)`.
The FeatureSpace (Normalization / Discretization / IntegerLookup / StringLookup / HashedCrossing /
CategoryEncoding under the hood), the tf.data pipeline (shuffle, batch, map, prefetch), the model,
compile and fit (20 epochs, batch 32, 8 steps an epoch) are as in the original.
"""

import numpy as np
import tensorflow as tf
import keras

import ckptd


def load_heart_dataframe(n=303, seed=1303):
    """heart.csv stand-in: a dict of numpy columns with the original's names, ranges and dtypes."""
    rng = np.random.default_rng(seed)
    df = {
        "age": rng.integers(29, 78, n),
        "sex": rng.integers(0, 2, n),
        "cp": rng.integers(0, 5, n),
        "trestbps": rng.integers(94, 201, n),
        "chol": rng.integers(126, 565, n),
        "fbs": (rng.random(n) < 0.15).astype("int64"),
        "restecg": rng.integers(0, 3, n),
        "thalach": rng.integers(71, 203, n),
        "exang": rng.integers(0, 2, n),
        "oldpeak": np.round(rng.gamma(1.2, 0.9, n), 1),
        "slope": rng.integers(1, 4, n),
        "ca": rng.integers(0, 4, n),
        "thal": rng.choice(np.array(["normal", "fixed", "reversible"]), n),
    }
    logit = (
        0.05 * (df["age"] - 54)
        + 0.8 * df["sex"]
        + 0.6 * (df["cp"] >= 3)
        + 0.02 * (df["trestbps"] - 131)
        - 0.03 * (df["thalach"] - 150)
        + 1.0 * df["exang"]
        + 0.7 * df["oldpeak"]
        + 0.8 * df["ca"]
        + 1.2 * (df["thal"] == "reversible")
        - 2.2
    )
    df["target"] = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype("int64")
    return df


def sample_rows(df, frac, random_state):
    n = len(df["target"])
    return np.random.default_rng(random_state).permutation(n)[: int(round(frac * n))]


def drop_rows(df, index):
    keep = np.setdiff1d(np.arange(len(df["target"])), index)
    return {k: v[keep] for k, v in df.items()}


dataframe = load_heart_dataframe()

print((len(dataframe["target"]), len(dataframe)))

val_index = sample_rows(dataframe, frac=0.2, random_state=1337)
val_dataframe = {k: v[val_index] for k, v in dataframe.items()}
train_dataframe = drop_rows(dataframe, val_index)

print(
    "Using %d samples for training and %d for validation"
    % (len(train_dataframe["target"]), len(val_dataframe["target"]))
)


def dataframe_to_dataset(dataframe):
    dataframe = dict(dataframe)
    labels = dataframe.pop("target")
    ds = tf.data.Dataset.from_tensor_slices((dict(dataframe), labels))
    ds = ds.shuffle(buffer_size=len(labels))
    return ds


train_ds = dataframe_to_dataset(train_dataframe)
val_ds = dataframe_to_dataset(val_dataframe)

for x, y in train_ds.take(1):
    print("Input:", x)
    print("Target:", y)

train_ds = train_ds.batch(32)
val_ds = val_ds.batch(32)

from keras.utils import FeatureSpace  # noqa: E402 (imported here in the original)

feature_space = FeatureSpace(
    features={
        # Categorical features encoded as integers
        "sex": "integer_categorical",
        "cp": "integer_categorical",
        "fbs": "integer_categorical",
        "restecg": "integer_categorical",
        "exang": "integer_categorical",
        "ca": "integer_categorical",
        # Categorical feature encoded as string
        "thal": "string_categorical",
        # Numerical features to discretize
        "age": "float_discretized",
        # Numerical features to normalize
        "trestbps": "float_normalized",
        "chol": "float_normalized",
        "thalach": "float_normalized",
        "oldpeak": "float_normalized",
        "slope": "float_normalized",
    },
    # We create additional features by hashing
    # value co-occurrences for the
    # following groups of categorical features.
    crosses=[("sex", "age"), ("thal", "ca")],
    # The hashing space for these co-occurrences
    # wil be 32-dimensional.
    crossing_dim=32,
    # Our utility will one-hot encode all categorical
    # features and concat all features into a single
    # vector (one vector per sample).
    output_mode="concat",
)

feature_space = FeatureSpace(
    features={
        # Categorical features encoded as integers
        "sex": FeatureSpace.integer_categorical(num_oov_indices=0),
        "cp": FeatureSpace.integer_categorical(num_oov_indices=0),
        "fbs": FeatureSpace.integer_categorical(num_oov_indices=0),
        "restecg": FeatureSpace.integer_categorical(num_oov_indices=0),
        "exang": FeatureSpace.integer_categorical(num_oov_indices=0),
        "ca": FeatureSpace.integer_categorical(num_oov_indices=0),
        # Categorical feature encoded as string
        "thal": FeatureSpace.string_categorical(num_oov_indices=0),
        # Numerical features to discretize
        "age": FeatureSpace.float_discretized(num_bins=30),
        # Numerical features to normalize
        "trestbps": FeatureSpace.float_normalized(),
        "chol": FeatureSpace.float_normalized(),
        "thalach": FeatureSpace.float_normalized(),
        "oldpeak": FeatureSpace.float_normalized(),
        "slope": FeatureSpace.float_normalized(),
    },
    # Specify feature cross with a custom crossing dim.
    crosses=[
        FeatureSpace.cross(feature_names=("sex", "age"), crossing_dim=64),
        FeatureSpace.cross(
            feature_names=("thal", "ca"),
            crossing_dim=16,
        ),
    ],
    output_mode="concat",
)

train_ds_with_no_labels = train_ds.map(lambda x, _: x)
feature_space.adapt(train_ds_with_no_labels)

for x, _ in train_ds.take(1):
    preprocessed_x = feature_space(x)
    print("preprocessed_x.shape:", preprocessed_x.shape)
    print("preprocessed_x.dtype:", preprocessed_x.dtype)

preprocessed_train_ds = train_ds.map(lambda x, y: (feature_space(x), y), num_parallel_calls=tf.data.AUTOTUNE)
preprocessed_train_ds = preprocessed_train_ds.prefetch(tf.data.AUTOTUNE)

preprocessed_val_ds = val_ds.map(lambda x, y: (feature_space(x), y), num_parallel_calls=tf.data.AUTOTUNE)
preprocessed_val_ds = preprocessed_val_ds.prefetch(tf.data.AUTOTUNE)

dict_inputs = feature_space.get_inputs()
encoded_features = feature_space.get_encoded_features()

x = keras.layers.Dense(32, activation="relu")(encoded_features)
x = keras.layers.Dropout(0.5)(x)
predictions = keras.layers.Dense(1, activation="sigmoid")(x)

training_model = keras.Model(inputs=encoded_features, outputs=predictions)
training_model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])

inference_model = keras.Model(inputs=dict_inputs, outputs=predictions)

ckptd.fit(training_model, preprocessed_train_ds, epochs=20, validation_data=preprocessed_val_ds, verbose=2)

sample = {
    "age": 60,
    "sex": 1,
    "cp": 1,
    "trestbps": 145,
    "chol": 233,
    "fbs": 1,
    "restecg": 2,
    "thalach": 150,
    "exang": 0,
    "oldpeak": 2.3,
    "slope": 3,
    "ca": 0,
    "thal": "fixed",
}

input_dict = {name: tf.convert_to_tensor([value]) for name, value in sample.items()}
predictions = inference_model.predict(input_dict)

print(
    f"This particular patient had a {100 * predictions[0][0]:.2f}% probability "
    "of having a heart disease, as evaluated by our model."
)

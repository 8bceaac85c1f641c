"""ckptd.worker.fit.exactness: the static checks name what an exact resume cannot replay, and only that
(the experiments behind each rule: notes/exactness-findings.md)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.tf


def _range(n: int = 8) -> Any:
    import tensorflow as tf

    return tf.data.Dataset.range(n)


def _f(x: Any) -> Any:
    import tensorflow as tf

    return tf.cast(x, tf.float32)


def _exact_datasets() -> dict[str, Any]:
    import tensorflow as tf

    r = _range()
    return {
        "shuffle unseeded": r.shuffle(8),
        "shuffle seeded": r.shuffle(8, seed=5),
        "shuffle once": r.shuffle(8, seed=5, reshuffle_each_iteration=False),
        "legacy random op in parallel map": r.map(
            lambda x: _f(x) + tf.random.uniform([]), num_parallel_calls=tf.data.AUTOTUNE
        ),
        "stateless map": r.map(lambda x: _f(x) + tf.random.stateless_uniform([], seed=tf.stack([x, 1]))),
        "interleave": r.interleave(
            lambda x: tf.data.Dataset.range(x, x + 2),
            cycle_length=2,
            num_parallel_calls=2,
            deterministic=False,
        ),
        "memory cache": r.cache().shuffle(8, seed=1),
        "Dataset.random": tf.data.Dataset.random(seed=4, rerandomize_each_iteration=True).take(8),
    }


@pytest.fixture
def determinism_on(monkeypatch: pytest.MonkeyPatch) -> None:
    # ckptd's worker enables op determinism; doing it for real would change every later test in this
    # process (unseeded random ops raise), so report it as on to the module under test only.
    from ckptd.worker.fit import exactness

    monkeypatch.setattr(exactness, "op_determinism_enabled", lambda: True)


def test_exact_datasets_are_not_flagged(determinism_on: None) -> None:
    from ckptd.worker.fit.exactness import dataset_risks

    for what, ds in _exact_datasets().items():
        assert dataset_risks(ds.batch(4).prefetch(2)) == [], what


def _gen() -> Iterator[int]:
    yield from range(4)


def test_from_generator_is_flagged(determinism_on: None) -> None:
    import tensorflow as tf

    from ckptd.worker.fit.exactness import dataset_risks

    ds = tf.data.Dataset.from_generator(_gen, output_signature=tf.TensorSpec([], tf.int64)).batch(2)
    risks = dataset_risks(ds)
    assert len(risks) == 1 and "Dataset.from_generator" in risks[0], risks


def test_python_in_map_is_flagged(determinism_on: None) -> None:
    import numpy as np
    import tensorflow as tf

    from ckptd.worker.fit.exactness import dataset_risks

    ds = _range().map(lambda x: tf.numpy_function(lambda: np.float32(np.random.rand()), [], tf.float32))
    risks = dataset_risks(ds.batch(2))
    assert len(risks) == 1 and "tf.numpy_function" in risks[0], risks


def test_generator_in_map_is_flagged(determinism_on: None) -> None:
    import tensorflow as tf

    from ckptd.worker.fit.exactness import dataset_risks

    g = tf.random.Generator.from_seed(1)
    risks = dataset_risks(_range().map(lambda x: _f(x) + g.uniform([])).batch(2))
    assert len(risks) == 1 and "tf.random.Generator" in risks[0], risks


def test_keras_random_layer_in_map_is_flagged(determinism_on: None) -> None:
    import keras
    import tensorflow as tf

    from ckptd.worker.fit.exactness import dataset_risks

    flip = keras.layers.RandomFlip("horizontal", seed=3)
    ds = _range().map(lambda x: flip(tf.fill([2, 2, 1], _f(x)), training=True)).batch(2)
    risks = dataset_risks(ds)
    assert len(risks) == 1 and "Keras random layer" in risks[0], risks


def test_file_cache_is_flagged(tmp_path: Path, determinism_on: None) -> None:
    from ckptd.worker.fit.exactness import dataset_risks

    risks = dataset_risks(_range().cache(str(tmp_path / "c")).batch(2))
    assert len(risks) == 1 and "lockfile" in risks[0], risks


def test_nondeterministic_order_flagged_only_without_op_determinism(monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptd.worker.fit import exactness
    from ckptd.worker.fit.exactness import dataset_risks

    ds = _range().map(lambda x: x + 1, num_parallel_calls=2, deterministic=False).batch(2)
    monkeypatch.setattr(exactness, "op_determinism_enabled", lambda: False)
    risks = dataset_risks(ds)
    assert len(risks) == 1 and "deterministic=False" in risks[0], risks
    monkeypatch.setattr(exactness, "op_determinism_enabled", lambda: True)
    assert dataset_risks(ds) == []


def test_replaying_iterator_creations_reproduces_a_reshuffled_epoch() -> None:
    """The assumption the resume relies on (findings, scenario shuffle_*): creating k iterators without
    pulling from them advances a reshuffling seed exactly as k full epochs do."""

    def build() -> Any:
        return _range(16).shuffle(16, seed=5).batch(4)

    def epoch(ds: Any) -> list[list[int]]:
        return [b.numpy().tolist() for b in ds]

    full = build()
    epochs = [epoch(full) for _ in range(3)]
    replayed = build()
    for _ in range(2):
        iter(replayed)
    assert epochs[0] != epochs[2]
    assert epoch(replayed) == epochs[2]


# ---------------------------------------------------------------------------------------------- train step


def _fitted(model_cls: Any, dropout: bool) -> Any:
    import keras
    import numpy as np

    keras.utils.set_random_seed(1)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(8)(inputs)
    if dropout:
        hidden = keras.layers.Dropout(0.5)(hidden)
    model = model_cls(inputs, keras.layers.Dense(1)(hidden))
    model.compile(optimizer="sgd", loss="mse")
    model.fit(np.ones((8, 4)), np.ones((8, 1)), batch_size=4, epochs=1, verbose=0)
    return model


def test_custom_train_step_with_tf_random_normal_is_flagged() -> None:
    import keras
    import tensorflow as tf

    from ckptd.worker.fit.exactness import graph_risks

    class Noisy(keras.Model):  # type: ignore[misc]
        def train_step(self, data: Any) -> Any:
            x, y = data
            return super().train_step((x + tf.random.normal(tf.shape(x), stddev=0.01), y))

    risks = graph_risks(_fitted(Noisy, dropout=False).train_function)
    assert len(risks) == 1 and "RandomStandardNormal" in risks[0] and "SeedGenerator" in risks[0], risks


def test_dropout_model_is_not_flagged() -> None:
    import keras

    from ckptd.worker.fit.exactness import graph_risks

    assert graph_risks(_fitted(keras.Model, dropout=True).train_function) == []


def test_tf_function_and_concrete_function() -> None:
    import tensorflow as tf

    from ckptd.worker.fit.exactness import graph_risks

    noisy = tf.function(lambda x: x + tf.random.uniform([2]))
    clean = tf.function(lambda x: x + tf.random.stateless_uniform([2], seed=[1, 2]))
    spec = tf.TensorSpec([2], tf.float32)
    assert graph_risks(noisy)[0].startswith("train step: no traced graph")  # never called yet
    concrete = noisy.get_concrete_function(spec)
    assert any("RandomUniform" in r for r in graph_risks(concrete))
    assert any("RandomUniform" in r for r in graph_risks(noisy))  # traced now
    clean(tf.zeros([2]))
    assert graph_risks(clean) == []


# ---------------------------------------------------------------------------------------------- Python data


def test_python_data_sources() -> None:
    import keras
    import numpy as np

    from ckptd.worker.fit.exactness import python_data_risks

    class Plain(keras.utils.PyDataset):  # type: ignore[misc]
        def __len__(self) -> int:
            return 1

        def __getitem__(self, i: int) -> Any:
            return np.ones((2, 1)), np.ones((2, 1))

    class Reshuffling(Plain):
        def on_epoch_end(self) -> None:
            np.random.shuffle(np.arange(4))

    assert python_data_risks(Plain()) == []
    risks = python_data_risks(Reshuffling())
    assert len(risks) == 1 and "Reshuffling overrides on_epoch_end" in risks[0], risks
    assert "Python generator" in python_data_risks(_gen())[0]
    assert "iterator" in python_data_risks(iter([1, 2]))[0]
    assert python_data_risks(np.ones(3)) == []

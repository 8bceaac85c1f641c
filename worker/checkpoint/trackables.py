"""Everything a training step's result depends on, gathered into one tf.train.Checkpoint.

`tf.train.Checkpoint(model=..., optimizer=...)` misses state that Keras 3 keeps outside its
object graph: every `keras.random.SeedGenerator` (Dropout, GaussianNoise, RandomFlip, a VAE's
sampling layer, `keras.random.*` in `train_step`) holds its state in a variable that the model
lists but the checkpoint does not track, and the global generator of unseeded `keras.random`
calls belongs to no model at all. Resumed without them, every random layer restarts from its
initial seed. So the checkpoint also carries every variable of the model, optimizer and metrics
that its graph does not already reach, Keras's global generator, TF's global generator and
Python's and NumPy's global generators.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ckptd.worker.distribute import ReplicaFeed, multi_worker, reduce_logs


def keras_global_generator(create: bool = True) -> Any:
    """Keras's generator for `keras.random.*(seed=None)`, created now if asked: a generator
    created later than the checkpoint object would be missing from it."""
    from keras.src.backend.common import global_state
    from keras.src.random.seed_generator import global_seed_generator

    if create:
        return global_seed_generator()
    return global_state.get_global_attribute("global_seed_generator")


def untracked_variables(ckpt: tf.train.Checkpoint, candidates: Iterable[Any]) -> list[Any]:
    """The candidates the checkpoint's object graph does not reach, in their given order (stable
    across processes: the order in which the program created them)."""
    tracked = {id(obj) for obj in tf.train.TrackableView(ckpt).descendants()}
    out, seen = [], set()
    for v in candidates:
        if id(v) not in tracked and id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


def as_trackable(obj: Any) -> Any:
    """Keras 3 metrics and seed generators are not TensorFlow trackables; their variables are."""
    if isinstance(obj, tf.__internal__.tracking.Trackable | list | dict):
        return obj
    if isinstance(obj, keras.random.SeedGenerator):
        return obj.state
    if hasattr(obj, "variables"):
        return list(obj.variables)
    raise TypeError(f"{type(obj).__name__} holds no TensorFlow state ckptd can checkpoint")


def replica_parts(variables: Iterable[Any]) -> list[Any]:
    """Under several replicas a metric's variable is on-read: one value per replica, summed when
    read. TensorFlow's checkpoint saves the sum and restores sum/N into each replica, so a
    resume in mid-epoch would change that epoch's metrics (each replica reports its own, and
    Keras averages them). Checkpoint every replica's own variable instead."""
    out = []
    for v in variables:
        inner = getattr(v, "_value", v)  # a Keras 3 Variable wraps the TensorFlow one
        if (
            isinstance(inner, tf.distribute.DistributedValues)
            and getattr(inner, "synchronization", None) == tf.VariableSynchronization.ON_READ
        ):
            out.extend(inner._distribute_strategy.experimental_local_results(inner))
        else:
            out.append(v)
    return out


def model_state_variables(model: Any) -> list[Any]:
    """Every variable a fit step reads or writes: weights, non-trainable state (seed
    generators, normalisation statistics), optimizer and metric variables."""
    out = list(model.variables)
    # model.optimizer is absent on a model never compiled; a GAN keeps its two optimizers in
    # attributes of its own (compile(d_optimizer=..., g_optimizer=...)).
    optimizers = [getattr(model, "optimizer", None)] + [
        v for v in vars(model).values() if isinstance(v, keras.optimizers.Optimizer)
    ]
    for optimizer in dict.fromkeys(o for o in optimizers if o is not None):
        out += list(optimizer.variables)
    out += list(model.metrics_variables)
    return out


class HostRandom:
    """Python's and NumPy's global generators, in a string variable of the checkpoint. Written
    only when they moved since the last save: most jobs never draw from them while training."""

    def __init__(self) -> None:
        self.var = tf.Variable("", dtype=tf.string, trainable=False)
        self._last: tuple[Any, Any] | None = None

    def capture(self) -> None:
        py, npy = random.getstate(), np.random.get_state(legacy=False)
        key = (py, (npy["state"]["key"].tobytes(), npy["state"]["pos"], npy["has_gauss"], npy["gauss"]))
        if key == self._last:
            return
        self._last = key
        self.var.assign(
            json.dumps(
                {
                    "python": [py[0], list(py[1]), py[2]],
                    "numpy": {
                        "key": npy["state"]["key"].tolist(),
                        "pos": npy["state"]["pos"],
                        "has_gauss": npy["has_gauss"],
                        "gauss": npy["gauss"],
                    },
                }
            )
        )

    def apply(self) -> None:
        """Set the global generators to the restored state (no-op for a fresh start)."""
        text = self.var.numpy().decode()
        if not text:
            return
        d = json.loads(text)
        py = d["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        n = d["numpy"]
        np.random.set_state(
            {
                "bit_generator": "MT19937",
                "has_gauss": n["has_gauss"],
                "gauss": n["gauss"],
                "state": {"key": np.asarray(n["key"], dtype=np.uint32), "pos": n["pos"]},
            }
        )
        self._last = None


def make_step_function(model: Any, feed: ReplicaFeed | None = None) -> Callable[[Any], Any]:
    """One training step, built as `model.fit` builds it for the TensorFlow backend
    (keras.src.backend.tensorflow.trainer._make_function): the strategy runs `train_step` on the
    batch fit would hand it, the outputs reduced across replicas. With several replicas, `feed`
    splits the global batch among them as fit's distributed dataset would."""
    from keras.src.backend.tensorflow.trainer import reduce_per_replica

    def replica_step(data: Any) -> Any:
        if feed is not None:
            feed.seen(data)
        return model.train_step(data)

    def one_step_on_data(data: Any) -> Any:
        strategy = model.distribute_strategy
        if feed is not None:
            data = feed.split(data)
        outputs = strategy.run(replica_step, args=(data,))
        if multi_worker(strategy):
            return reduce_logs(strategy, outputs)
        return reduce_per_replica(outputs, strategy, reduction="auto")

    if model.run_eagerly:
        return one_step_on_data
    step: Callable[[Any], Any] = tf.function(
        one_step_on_data, reduce_retracing=True, jit_compile=model.jit_compile
    )
    return step


def prime(model: Any, step: Callable[[Any], Any], batch: Any) -> None:
    """Create every variable before a restore, as fit's first step would, without taking it:
    Keras 3 builds layers, optimizer slots, compiled metrics and seed generators lazily, and a
    restore into variables that do not exist yet is silently skipped. Tracing the step on the
    first batch creates them and runs nothing; ckptd calls no model method the user's own `fit`
    would not (no `call()` for a VAE that has none, no compiled loss for a model without one)."""
    keras_global_generator()
    tensors = keras.tree.map_structure(tf.convert_to_tensor, batch)
    strategy = model.distribute_strategy
    if strategy.num_replicas_in_sync > 1:
        # Under several replicas, variables cannot be created inside the traced step (Keras 3
        # builds optimizer slots lazily, and a MirroredVariable's initializer cannot be lifted
        # out of the function): build them first, as fit does before its first step.
        with strategy.scope():
            model._symbolic_build(data_batch=tensors)
    if isinstance(step, tf.types.experimental.PolymorphicFunction):
        step.get_concrete_function(tensors)
    elif not model.built or (model.optimizer is not None and not model.optimizer.built):
        # run_eagerly: nothing can be traced; build what a step would.
        x = keras.utils.unpack_x_y_sample_weight(tensors)[0]
        model(x)
        model.optimizer.build(model.trainable_variables)
    model.reset_metrics()

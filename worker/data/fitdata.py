"""The data of a `ckptd.fit(...)` call, batched as `keras.Model.fit` batches it.

Each batch reaches `train_step` packed the way fit packs it (`x`, `(x, y)` or `(x, y, sw)`:
keras.utils.pack_x_y_sample_weight), so custom `train_step`s see exactly what fit hands them.
What differs from fit is only where the order comes from: a pass's shuffle is a pure function of
(seed, pass), and an epoch's batches come from `fitplan.epoch_plan`, so after a restart the data
position follows from the epoch and step alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ckptd.worker.api import FitArgs
from ckptd.worker.data.fitplan import EpochPlan, epoch_plan
from ckptd.worker.data.pipestate import PipelineState
from ckptd.worker.errors import ConfigError


def _to_array(value: Any) -> Any:
    """NumPy, with floats in Keras's floatx as fit's array adapter makes them."""
    if value is None:
        return None
    a = np.asarray(value)
    if a.dtype.kind == "f" and a.dtype != np.dtype(keras.backend.floatx()):
        a = a.astype(keras.backend.floatx())
    return a


def _rows(structure: Any, what: str) -> int | None:
    sizes = {len(leaf) for leaf in keras.tree.flatten(structure) if leaf is not None}
    if len(sizes) > 1:
        raise ConfigError(
            f"fit(): the arrays of {what} have different numbers of rows "
            f"({sorted(sizes)}); every input, target and weight needs one row "
            "per example"
        )
    return sizes.pop() if sizes else None


def _take(structure: Any, idx: np.ndarray) -> Any:
    return keras.tree.map_structure(lambda a: None if a is None else a[idx], structure)


class ArraySource:
    """Arrays (or nested dicts/lists/tuples of arrays), batched and shuffled by ckptd."""

    def __init__(
        self,
        x: Any,
        y: Any,
        sw: Any,
        batch_size: int,
        shuffle: Any,
        seed: int,
        class_weight: dict[int, float] | None,
        what: str,
    ) -> None:
        try:
            x, y, sw = (keras.tree.map_structure(_to_array, v) if v is not None else None for v in (x, y, sw))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"fit(): {what} cannot be read as arrays: {e}") from e
        if class_weight:
            sw = _class_weights(y, sw, class_weight)
        n = _rows((x, y, sw), what)
        if not n:
            raise ConfigError(f"fit(): {what} has no examples")
        self.data, self.n, self.batch_size = (x, y, sw), n, batch_size
        self.shuffle, self.seed = shuffle, seed
        self.num_batches: int | None = math.ceil(n / batch_size)

    def _order(self, pass_index: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        rng = np.random.Generator(np.random.PCG64([self.seed, pass_index]))
        if self.shuffle == "batch":  # Keras: shuffle whole batch-sized chunks
            chunks = np.array_split(np.arange(self.n), self.num_batches or 1)
            return np.concatenate([chunks[i] for i in rng.permutation(len(chunks))])
        return rng.permutation(self.n)

    def batches(self, plan: EpochPlan, start: int) -> Iterator[Any]:
        order, bs = self._order(plan.pass_index), self.batch_size
        end = plan.first_batch + (plan.steps if plan.steps is not None else self.num_batches or 0)
        for i in range(plan.first_batch + start, end):
            x, y, sw = _take(self.data, order[i * bs : (i + 1) * bs])
            yield keras.utils.pack_x_y_sample_weight(x, y, sw)


def _class_weights(y: Any, sw: Any, class_weight: dict[int, float]) -> Any:
    from keras.src.trainers.data_adapters.data_adapter_utils import (
        class_weight_to_sample_weights,
    )

    if sw is not None:
        raise ConfigError(
            "fit(): class_weight and sample_weight cannot both be given "
            "(as in Keras); fold the class weights into sample_weight"
        )
    if not isinstance(y, np.ndarray):
        raise ConfigError(
            "fit(): class_weight needs a single target array (as in Keras); for "
            "several outputs pass sample_weight instead"
        )
    return class_weight_to_sample_weights(y, class_weight)


class DatasetSource:
    """A user's already-batched tf.data pipeline, iterated as fit iterates it: one iterator per
    pass over the data, kept across the epochs of that pass (steps_per_epoch). The iterator of
    pass p is the (p + 2)-th made since start-up (the first primes the model) in every run,
    resumed or not: creating an iterator advances a reshuffling pipeline's seed, so a resumed
    run creates (and drops) the earlier passes' iterators first and sees the same order."""

    def __init__(self, ds: tf.data.Dataset, class_weight: dict[int, float] | None) -> None:
        if class_weight:
            from keras.src.trainers.data_adapters.tf_dataset_adapter import (
                make_class_weight_map_fn,
            )

            ds = ds.map(make_class_weight_map_fn(class_weight))
        self.ds = ds
        card = int(ds.cardinality())
        self.num_batches = card if card >= 0 else None
        self.made = 0
        self.current: tuple[int, Iterator[Any]] | None = None
        self.position = 0  # batches taken from the current pass's iterator
        self.state = PipelineState(ds)

    def first(self) -> Any:
        self.made += 1
        it = iter(self.ds)
        batch = next(it)
        del it  # stops its prefetching before the pipeline's variables are snapshot
        return batch

    def _iterator(self, pass_index: int, position: int) -> Iterator[Any]:
        if self.current is not None and self.current[0] == pass_index and self.position == position:
            return self.current[1]
        while self.made < pass_index + 1:
            iter(self.ds)  # replays the iterator creations of the passes before this one
            self.made += 1
        self.made += 1
        self.state.enter(pass_index)
        it: Iterator[Any] = iter(self.ds.skip(position) if position else self.ds)
        self.current, self.position = (pass_index, it), position
        return it

    def batches(self, plan: EpochPlan, start: int) -> Iterator[Any]:
        it = self._iterator(plan.pass_index, plan.first_batch + start)
        remaining = None if plan.steps is None else plan.steps - start
        while remaining is None or remaining > 0:
            try:
                batch = next(it)
            except StopIteration:
                self.state.snapshot(plan.pass_index + 1)  # the pass is used up
                return
            self.position += 1
            if self.position == self.num_batches:
                self.state.snapshot(plan.pass_index + 1)
            yield batch
            if remaining is not None:
                remaining -= 1


class PySource:
    """A keras.utils.PyDataset: batch i is dataset[i]; on_epoch_end() runs after every epoch
    as fit runs it (replayed up to the resumed epoch)."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds
        self.num_batches = ds.num_batches
        self.epochs_ended = 0

    def end_epochs(self, count: int) -> None:
        while self.epochs_ended < count:
            self.ds.on_epoch_end()
            self.epochs_ended += 1

    def batches(self, plan: EpochPlan, start: int) -> Iterator[Any]:
        end = plan.first_batch + (plan.steps if plan.steps is not None else self.num_batches)
        for i in range(plan.first_batch + start, end):
            batch = self.ds[i]
            yield tuple(batch) if isinstance(batch, list) else batch


Source = ArraySource | DatasetSource | PySource


def _is_pydataset(x: Any) -> bool:
    return isinstance(x, keras.utils.PyDataset)


def make_source(
    x: Any, y: Any, sw: Any, args: FitArgs, batch_size: int, shuffle: Any, seed: int, what: str
) -> Source:
    if isinstance(x, tf.data.Dataset) or _is_pydataset(x):
        given = [k for k, v in (("y", y), ("sample_weight", sw)) if v is not None]
        if given:
            raise ConfigError(
                f"fit(): {what} is a {type(x).__name__}; it must yield the "
                f"targets and weights itself, so {', '.join(given)} must be None "
                "(as in Keras)"
            )
        if isinstance(x, tf.data.Dataset):
            return DatasetSource(x, args.class_weight if what == "x" else None)
        return PySource(x)
    if hasattr(x, "__next__") or (hasattr(x, "__iter__") and not hasattr(x, "__len__")):
        raise ConfigError(
            f"fit(): {what} is a Python generator or iterator, whose position "
            "ckptd cannot restore after a restart; pass arrays, a tf.data.Dataset "
            "or a keras.utils.PyDataset"
        )
    if x is None:
        raise ConfigError(f"fit(): {what} is missing")
    return ArraySource(x, y, sw, batch_size, shuffle, seed, args.class_weight if what == "x" else None, what)


def _split(args: FitArgs) -> tuple[Any, Any]:
    """Keras's validation_split: the last fraction of the arrays, before any shuffle."""
    from keras.src.trainers.data_adapters.array_slicing import train_validation_split

    if isinstance(args.x, tf.data.Dataset) or _is_pydataset(args.x):
        raise ConfigError(
            "fit(): validation_split needs arrays (as in Keras); pass validation_data for a dataset"
        )
    try:
        (x, y, sw), val = train_validation_split(
            (args.x, args.y, args.sample_weight), validation_split=args.validation_split
        )
    except ValueError as e:
        raise ConfigError(f"fit(): validation_split={args.validation_split}: {e}") from e
    return (x, y, sw), val


class FitData:
    """Training and validation batches of one fit call, by epoch."""

    def __init__(self, args: FitArgs, seed: int) -> None:
        self.args = args
        self.batch_size = args.batch_size or 32
        x, y, sw = args.x, args.y, args.sample_weight
        validation = args.validation_data
        if args.validation_split and validation is None:
            (x, y, sw), validation = _split(args)
        self.train = make_source(x, y, sw, args, self.batch_size, args.shuffle, seed, "x")
        self.validation: Source | None = None
        if validation is not None:
            vx, vy, vsw = (
                keras.utils.unpack_x_y_sample_weight(validation)
                if isinstance(validation, tuple | list)
                else (validation, None, None)
            )
            self.validation = make_source(
                vx,
                vy,
                vsw,
                args,
                args.validation_batch_size or self.batch_size,
                False,
                seed,
                "validation_data",
            )
        self.steps_per_epoch = args.steps_per_epoch if args.steps_per_epoch else self.train.num_batches

    def state_variables(self) -> list[Any]:
        """What the checkpoint must carry for the pipeline (see ckptd.worker.data.pipestate)."""
        return self.train.state.variables() if isinstance(self.train, DatasetSource) else []

    def plan(self, epoch: int) -> EpochPlan:
        return epoch_plan(epoch - self.args.initial_epoch, self.train.num_batches, self.args.steps_per_epoch)

    def epoch_steps(self, epoch: int) -> int | None:
        return self.plan(epoch).steps

    def epoch(self, epoch: int, start_step: int) -> Iterator[Any]:
        if isinstance(self.train, PySource):
            self.train.end_epochs(epoch - self.args.initial_epoch)
        yield from self.train.batches(self.plan(epoch), start_step)

    def first_batch(self) -> Any:
        try:
            if isinstance(self.train, DatasetSource):
                return self.train.first()
            return next(iter(self.train.batches(self.plan(self.args.initial_epoch), 0)))
        except (StopIteration, tf.errors.OutOfRangeError):
            raise ConfigError("fit(): the training data yields no batch") from None

    def validation_batches(self, evaluations_done: int) -> Iterator[Any] | None:
        """The batches of the next validation, as fit's cached evaluation iterator gives them
        (with validation_steps it continues where the previous validation stopped)."""
        if self.validation is None:
            return None
        plan = epoch_plan(evaluations_done, self.validation.num_batches, self.args.validation_steps)
        return self.validation.batches(plan, 0)

"""Batching, shuffling and the validation split, owned by ckptd so the data position checkpoints.

The batches of an epoch are a pure function of (seed, epoch): arrays are permuted with a generator
seeded by both, datasets are shuffled with a per-epoch seed. Resuming at (epoch, step) therefore
replays exactly the batches an uninterrupted run would have seen, with no iterator state to save.

A dataset the program shuffles itself (`ds.shuffle(n)`, reshuffle_each_iteration=True) draws each
iterator's order from a seed generator that every iterator creation advances. So the iterator of
an epoch is made as the same n-th creation in every run, resumed or not: a resumed run first
creates (and drops, without pulling) the iterators the epochs before it made.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from ckptd.state.jobspec import Train
from ckptd.worker.errors import ConfigError

ArrayPair = tuple[Any, Any]


def _num_rows(x: Any) -> int:
    if isinstance(x, dict):
        return len(next(iter(x.values())))
    return len(x)


def _take(x: Any, idx: np.ndarray) -> Any:
    if isinstance(x, dict):
        return {k: np.asarray(v)[idx] for k, v in x.items()}
    return np.asarray(x)[idx]


def _as_arrays(pair: Any, what: str) -> ArrayPair:
    if not (isinstance(pair, tuple | list) and len(pair) == 2):
        raise ConfigError(f"{what} must be (x, y) arrays or an unbatched tf.data.Dataset")
    x, y = pair
    x = {k: np.asarray(v) for k, v in x.items()} if isinstance(x, dict) else np.asarray(x)
    y = np.asarray(y)
    if _num_rows(x) != len(y):
        raise ConfigError(f"{what}: x has {_num_rows(x)} rows but y has {len(y)}")
    if len(y) == 0:
        raise ConfigError(f"{what}: no examples")
    return x, y


def _looks_batched(ds: tf.data.Dataset) -> bool:
    specs = tf.nest.flatten(ds.element_spec)
    return bool(specs) and all(
        getattr(s, "shape", None) is not None and s.shape.rank and s.shape[0] is None for s in specs
    )


def _split_at(n: int, validation_split: float) -> int:
    # Keras's validation_split semantics: the *last* fraction, split at floor(n * (1 - split)).
    split_at = math.floor(n * (1.0 - validation_split))
    if split_at in (0, n):
        raise ConfigError(
            f"train.validation_split={validation_split} leaves an empty training or "
            f"validation set with {n} examples"
        )
    return split_at


class Batches:
    def __init__(self, train: Any, validation: Any | None, cfg: Train) -> None:
        self.cfg = cfg
        self.dataset_mode = isinstance(train, tf.data.Dataset)
        if self.dataset_mode:
            self._init_dataset(train, validation)
        else:
            self._init_arrays(train, validation)

    def _init_arrays(self, train: Any, validation: Any | None) -> None:
        x, y = _as_arrays(train, "train")
        if validation is None and self.cfg.validation_split > 0:
            at = _split_at(len(y), self.cfg.validation_split)
            validation = (_take(x, np.arange(at, len(y))), y[at:])
            x, y = _take(x, np.arange(at)), y[:at]
        elif validation is not None:
            validation = _as_arrays(validation, "validation")
        self.x, self.y = x, y
        self.n = len(y)
        self.validation = validation
        self.steps_per_epoch: int | None = math.ceil(self.n / self.cfg.batch_size)

    def _init_dataset(self, train: tf.data.Dataset, validation: Any | None) -> None:
        self._shared_validation = False
        self._made = {"train": 0, "validation": 0}  # iterator creations per pipeline
        self._last_epoch = 0
        if _looks_batched(train):
            raise ConfigError(
                "train: the dataset looks batched (every component has a leading dimension of "
                "unknown size), but build() returns unbatched examples that ckptd batches and "
                "shuffles: return dataset.unbatch(), or keep your batches with "
                "ckptd.worker.api.fit_args(model, dataset, ...)"
            )
        n = int(train.cardinality())
        if validation is None and self.cfg.validation_split > 0:
            if n < 0:
                raise ConfigError(
                    "train.validation_split needs a dataset of known size; return "
                    "validation data from build() instead"
                )
            at = _split_at(n, self.cfg.validation_split)
            validation, train, n = train.skip(at), train.take(at), at
            # Both halves share the program's shuffle (and its seed generator): one count.
            self._shared_validation = True
        self.ds = train
        self.n = n
        self.validation = validation
        self.steps_per_epoch = math.ceil(n / self.cfg.batch_size) if n >= 0 else None

    def first_batch(self) -> ArrayPair:
        for batch in self.epoch(0, 0, replay=False):
            return batch
        raise ConfigError("train: no examples")

    def _replay(self, pipeline: str, ds: tf.data.Dataset, before: int) -> None:
        """Create (and drop) iterators until `before` were made on `pipeline`."""
        key = "train" if self._shared_validation else pipeline
        while self._made[key] < before:
            iter(ds)
            self._made[key] += 1
        self._made[key] += 1

    def _train_creations(self, epoch: int) -> int:
        # Every run makes one iterator to prime the model, then per epoch the training one and
        # (model: jobs validate every epoch) the validation one, on the same pipeline if split.
        return 1 + epoch * (2 if self._shared_validation else 1)

    def epoch(self, epoch: int, start_step: int, replay: bool = True) -> Iterator[ArrayPair]:
        """Yield the batches of `epoch` from batch index `start_step` on."""
        if self.dataset_mode:
            self._last_epoch = epoch
            self._replay("train", self.ds, self._train_creations(epoch) if replay else 0)
            yield from self._dataset_epoch(epoch, start_step)
            return
        bs = self.cfg.batch_size
        if self.cfg.shuffle:
            rng = np.random.Generator(np.random.PCG64([self.cfg.seed, epoch]))
            order = rng.permutation(self.n)
        else:
            order = np.arange(self.n)
        assert self.steps_per_epoch is not None
        for i in range(start_step, self.steps_per_epoch):
            idx = order[i * bs : (i + 1) * bs]
            yield _take(self.x, idx), self.y[idx]

    def _dataset_epoch(self, epoch: int, start_step: int) -> Iterator[ArrayPair]:
        ds = self.ds
        if self.cfg.shuffle:
            ds = ds.shuffle(
                self.cfg.shuffle_buffer,
                seed=self.cfg.seed * 1_000_003 + epoch,
                reshuffle_each_iteration=False,
            )
        ds = ds.batch(self.cfg.batch_size).skip(start_step).prefetch(2)
        yield from ds

    def state_variables(self) -> list[Any]:
        return []  # ckptd shuffles and batches: the position alone is the state

    def epoch_steps(self, epoch: int) -> int | None:
        return self.steps_per_epoch

    def validation_batches(self, evaluations_done: int = 0) -> Iterator[ArrayPair] | None:
        """The validation batches in order (as `model.evaluate` batches them), or None."""
        if self.validation is None:
            return None
        if isinstance(self.validation, tf.data.Dataset):
            # The validation after epoch e; with a split, it follows that epoch's training iterator.
            before = (
                self._train_creations(self._last_epoch) + 1 if self._shared_validation else evaluations_done
            )
            self._replay("validation", self.validation, before)
            batches: Iterator[ArrayPair] = iter(self.validation.batch(self.cfg.batch_size))
            return batches
        x, y = self.validation
        bs = self.cfg.batch_size
        return ((_take(x, np.arange(i, min(i + bs, len(y)))), y[i : i + bs]) for i in range(0, len(y), bs))

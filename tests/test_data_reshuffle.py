"""ckptd.worker.data.batches: a build() dataset the program shuffles itself (reshuffle_each_iteration=True,
seeded or not, shuffle before or after a map, with or without a validation split) gives a resumed
process the same batches as an uninterrupted one (issue 26, part 2)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.tf


def _pipeline(variant: str) -> Any:
    import tensorflow as tf

    # unbatch() hides the size, which validation_split needs: state it, as a program may.
    return _unshuffled_size(_shuffled(variant), tf)


def _unshuffled_size(ds: Any, tf: Any) -> Any:
    return ds.apply(tf.data.experimental.assert_cardinality(100))


def _shuffled(variant: str) -> Any:
    import tensorflow as tf

    x = np.arange(200, dtype=np.float32).reshape(100, 2)
    y = np.arange(100, dtype=np.float32)
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if variant == "seeded":
        return ds.shuffle(64, seed=7).batch(8).unbatch()
    if variant == "map_after":
        return ds.shuffle(64).map(lambda a, b: (a * 2.0, b)).batch(8).unbatch()
    if variant == "map_before":
        return ds.map(lambda a, b: (a + 1.0, b)).shuffle(64).batch(8).unbatch()
    return ds.shuffle(64).batch(8).unbatch()


def _batches(variant: str, split: float, shuffle: bool) -> Any:
    import keras

    from ckptd.state.jobspec import Train
    from ckptd.worker.data.batches import Batches

    keras.utils.set_random_seed(3)  # as configure_tf does in every worker, before build()
    cfg = Train(batch_size=10, validation_split=split, shuffle=shuffle)
    return Batches(_pipeline(variant), None, cfg)


def _run(b: Any, epochs: range, start: int) -> list[list[list[float]]]:
    """Per epoch: the y of every training, then validation, batch, as the loop and the epoch end
    pull them (the first epoch from batch `start` on)."""
    seen = []
    for epoch in epochs:
        got = [list(np.asarray(y)) for _, y in b.epoch(epoch, start if epoch == epochs[0] else 0)]
        val = b.validation_batches(epoch)
        if val is not None:
            got += [list(np.asarray(y)) for _, y in val]
        seen.append(got)
    return seen


@pytest.mark.parametrize("variant", ["default", "seeded", "map_after", "map_before"])
@pytest.mark.parametrize(("split", "shuffle"), [(0.0, True), (0.2, False)])
def test_resumed_process_sees_the_same_batches(variant: str, split: float, shuffle: bool) -> None:
    whole = _batches(variant, split, shuffle)
    whole.first_batch()
    uninterrupted = _run(whole, range(4), 0)
    assert uninterrupted[2] != uninterrupted[3]  # the program's shuffle does reshuffle
    # A "new process": the same seed, a fresh build, primed, then resumed at epoch 2, step 3.
    resumed = _batches(variant, split, shuffle)
    resumed.first_batch()
    got = _run(resumed, range(2, 4), 3)
    assert got == [uninterrupted[2][3:], uninterrupted[3]]

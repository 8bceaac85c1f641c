"""ckptd.fit's data contract, in process (no training): what train_step receives, the order of
batches as a function of (seed, pass), callbacks mapped onto the job and their saved state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.tf


def _data(**kw: Any) -> Any:
    from ckptd.worker.api import fit_args
    from ckptd.worker.data.fitdata import FitData

    return FitData(fit_args(None, **kw), seed=7)


def _epoch(data: Any, epoch: int, start: int = 0) -> list[Any]:
    return list(data.epoch(epoch, start))


def test_x_alone_reaches_train_step_unwrapped_and_sample_weights_as_a_third_element() -> None:
    x = np.arange(10, dtype="float64").reshape(10, 1)
    batches = _epoch(_data(x=x, batch_size=4, shuffle=False), 0)
    assert [b.shape for b in batches] == [(4, 1), (4, 1), (2, 1)]
    assert batches[0].dtype == np.float32  # floats in floatx, as fit's array adapter casts them
    xb, yb, sw = _epoch(_data(x=x, y=x[:, 0], sample_weight=np.ones(10), batch_size=5, shuffle=False), 0)[0]
    assert xb.shape == (5, 1) and yb.shape == (5,) and sw.shape == (5,)


def test_dict_inputs_and_targets_keep_their_structure() -> None:
    x = {"a": np.zeros((6, 2)), "b": np.ones((6, 3))}
    y = {"out": np.arange(6)}
    xb, yb = _epoch(_data(x=x, y=y, batch_size=4), 0)[0]
    assert set(xb) == {"a", "b"} and xb["b"].shape == (4, 3) and yb["out"].shape == (4,)


def test_class_weight_becomes_per_example_weights() -> None:
    y = np.array([0, 1, 1, 0])
    _, _, sw = _epoch(
        _data(x=np.zeros((4, 1)), y=y, batch_size=4, shuffle=False, class_weight={0: 1.0, 1: 3.0}), 0
    )[0]
    assert sw.tolist() == [1.0, 3.0, 3.0, 1.0]


def test_order_is_a_function_of_seed_and_pass() -> None:
    kw = {"x": np.arange(20).reshape(20, 1), "batch_size": 5}
    a, b = _data(**kw), _data(**kw)
    first = [x.ravel().tolist() for x in _epoch(a, 1)]
    assert first == [x.ravel().tolist() for x in _epoch(b, 1)]  # same (seed, pass)
    assert first != [x.ravel().tolist() for x in _epoch(a, 2)]  # another pass, another order
    # a resume at step 2 of epoch 1 continues with exactly the remaining batches
    assert [x.ravel().tolist() for x in _epoch(b, 1, 2)] == first[2:]


def test_validation_split_takes_the_last_fraction_before_any_shuffle() -> None:
    x = np.arange(10).reshape(10, 1)
    data = _data(x=x, y=x[:, 0], batch_size=3, validation_split=0.2)
    val = list(data.validation_batches(0))
    assert [v[1].tolist() for v in val] == [[8, 9]]
    assert data.train.n == 8


def test_steps_per_epoch_continues_the_pass_across_epochs() -> None:
    x = np.arange(12).reshape(12, 1)
    data = _data(x=x, batch_size=4, steps_per_epoch=2, shuffle=False)
    seen = [b.ravel().tolist() for e in range(3) for b in _epoch(data, e)]
    # 3 batches a pass: epoch 0 takes two, epoch 1 the third (the pass ends it), epoch 2 anew
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [0, 1, 2, 3], [4, 5, 6, 7]]


def test_batched_dataset_resume_replays_the_reshuffle() -> None:
    import tensorflow as tf

    def make() -> Any:
        ds = tf.data.Dataset.range(12).shuffle(12, seed=3).batch(4)
        return _data(x=ds)

    run = make()
    run.first_batch()  # the worker primes the model on it
    uninterrupted = [[b.numpy().tolist() for b in _epoch(run, e)] for e in range(3)]
    resumed = make()
    resumed.first_batch()
    assert [b.numpy().tolist() for b in _epoch(resumed, 2, 1)] == uninterrupted[2][1:]
    assert uninterrupted[1] != uninterrupted[2]  # it does reshuffle


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({"x": (i for i in range(3))}, "Python generator"),
        ({"x": np.zeros((4, 1)), "y": np.zeros(5)}, "different numbers of rows"),
        (
            {"x": np.zeros((4, 1)), "y": np.zeros(4), "sample_weight": np.ones(4), "class_weight": {0: 1.0}},
            "class_weight and sample_weight",
        ),
        ({"x": None}, "x is missing"),
    ],
)
def test_bad_data_is_a_config_error_naming_the_cause(kw: dict[str, Any], fragment: str) -> None:
    from ckptd.worker.errors import ConfigError

    with pytest.raises(ConfigError, match=fragment):
        _data(**kw).first_batch()


def test_legacy_build_dataset_that_looks_batched_names_unbatch() -> None:
    import tensorflow as tf

    from ckptd.state.jobspec import Train
    from ckptd.worker.data.batches import Batches
    from ckptd.worker.errors import ConfigError

    ds = tf.data.Dataset.from_tensor_slices((np.zeros((8, 2)), np.zeros(8))).batch(4)
    with pytest.raises(ConfigError, match=r"\.unbatch\(\)"):
        Batches(ds, None, Train())


def _spec(extra: str = "") -> Any:
    from ckptd.state.jobfile import parse_job

    return parse_job(f"name: x\nmodel: a.b:c\n{extra}".encode(), "job.yaml", Path("."))


def test_model_checkpoint_and_early_stopping_map_onto_the_job() -> None:
    import keras

    from ckptd.worker.errors import ConfigError
    from ckptd.worker.fit.callbacks import map_callbacks

    keep = keras.callbacks.ReduceLROnPlateau()
    spec, kept, notes = map_callbacks(
        [
            keras.callbacks.ModelCheckpoint(
                "best.weights.h5",
                monitor="val_accuracy",
                mode="max",
                save_best_only=True,
                save_weights_only=True,
            ),
            keras.callbacks.EarlyStopping(patience=4, restore_best_weights=True),
            keras.callbacks.BackupAndRestore("backup"),
            keep,
        ],
        _spec(),
    )
    assert kept == [keep] and len(notes) == 3
    assert spec.best is not None and spec.best.filepath == "best.weights.h5"
    assert spec.best.monitor == "val_accuracy" and spec.best.mode == "max"
    assert spec.early_stopping is not None and spec.early_stopping.patience == 4
    with pytest.raises(ConfigError, match="best"):
        map_callbacks([keras.callbacks.ModelCheckpoint("m.keras")], _spec("best: {filepath: w.hdf5}\n"))
    with pytest.raises(ConfigError, match="save_freq"):
        map_callbacks([keras.callbacks.ModelCheckpoint("m.keras", save_freq=10)], _spec())


def test_callback_state_round_trip_and_csv_cut(tmp_path: Path) -> None:
    import keras

    from ckptd.worker.fit import callbacks as cbs

    class Counter(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.seen, self.best = 0, float("inf")

    before = [keras.callbacks.ReduceLROnPlateau(patience=3), Counter()]
    before[0].wait, before[0].best, before[0].cooldown_counter = 2, 0.25, 1
    before[1].seen = 17
    text = cbs.callback_state(before)
    after = [keras.callbacks.ReduceLROnPlateau(patience=3), Counter()]
    cbs.apply_callback_state(after, text)
    assert (after[0].wait, after[0].best, after[0].cooldown_counter) == (2, 0.25, 1)
    assert after[1].seen == 17 and after[1].best == float("inf")
    log = tmp_path / "log.csv"
    log.write_text("epoch,loss\n0,1.0\n1,0.9\n2,0.8\n")
    logger = keras.callbacks.CSVLogger(str(log))
    cbs.cut_csv_logs([logger], 2)
    assert log.read_text() == "epoch,loss\n0,1.0\n1,0.9\n" and logger.append


def test_initial_epoch_starts_the_plan_at_the_first_pass() -> None:
    x = np.arange(8).reshape(8, 1)
    data = _data(x=x, batch_size=4, initial_epoch=3, epochs=5, shuffle=False)
    assert data.plan(3).pass_index == 0 and data.plan(4).pass_index == 1
    assert [b.ravel().tolist() for b in _epoch(data, 3)] == [[0, 1, 2, 3], [4, 5, 6, 7]]

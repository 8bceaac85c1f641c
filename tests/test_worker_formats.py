"""Worker-side pieces that need TensorFlow: weights-file formats and tf.data inputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import CSV, write_job
from .procs import final_state_hash, finish, run_dir, start_run, status

pytestmark = pytest.mark.tf


def _model() -> object:
    import keras

    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(4, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(1),
        ]
    )


@pytest.mark.parametrize("name", ["w.hdf5", "w.h5", "w.weights.h5", "w.keras"])
def test_weights_files_round_trip(tmp_path: Path, name: str) -> None:
    import keras
    import numpy as np

    from ckptd.worker.checkpoint.h5export import save_weights_file

    a = _model()
    target = tmp_path / "sub" / name
    save_weights_file(a, target)
    if name.endswith(".keras"):
        b = keras.saving.load_model(target)
    else:
        b = _model()
        b.load_weights(str(target))  # type: ignore[attr-defined]
    for x, y in zip(a.get_weights(), b.get_weights(), strict=True):  # type: ignore[attr-defined]
        assert np.array_equal(x, y)
    assert sorted(p.name for p in target.parent.iterdir()) == [name]  # no temp left


def test_keras2_layout_attributes(tmp_path: Path) -> None:
    import h5py

    from ckptd.worker.checkpoint.h5export import save_weights_file

    save_weights_file(_model(), tmp_path / "w.hdf5")
    with h5py.File(tmp_path / "w.hdf5") as f:
        layers = [n.decode() for n in f.attrs["layer_names"]]
        assert len(layers) == 3 and f.attrs["backend"] in (b"tensorflow", "tensorflow")
        names = [n.decode() for n in f[layers[1]].attrs["weight_names"]]
        # Keras 2 order: trainable first (gamma, beta), then moving mean/variance.
        assert [n.split("/")[-1].split(":")[0] for n in names] == [
            "gamma",
            "beta",
            "moving_mean",
            "moving_variance",
        ]


DATASET_MODEL = f"""
import keras, numpy as np, tensorflow as tf

def build(params):
    data = np.loadtxt({str(CSV)!r}, delimiter=",", dtype="float32")
    ds = tf.data.Dataset.from_tensor_slices((data[:, :8], data[:, 8]))
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(1, activation="sigmoid")])
    model.compile(loss="binary_crossentropy", optimizer="adam", metrics=["accuracy"])
    return model, ds
"""


def test_tf_data_input_resumes_exactly(tmp_path: Path) -> None:
    """An unbatched tf.data.Dataset: per-epoch seeded shuffle + skip() to the resume position."""
    model = tmp_path / "dsmodel.py"
    model.write_text(DATASET_MODEL)
    hashes = []
    for faults in ("", "sigkill_at_step=70,attempt=1"):
        home = tmp_path / f"home{len(hashes)}"
        job = write_job(tmp_path / f"j{len(hashes)}", epochs=3, model=f"{model}:build")
        rc, out = finish(start_run(home, str(job), faults=faults))
        assert rc == 0, out
        run = run_dir(home)
        st = status(home, run.name)
        assert st["last_committed_step"] == 3 * 52  # 514 training rows after the split
        hashes.append(final_state_hash(run))
    assert status(home, run.name)["attempt_list"][1]["restored_step"] == 60
    assert hashes[0] == hashes[1]


def test_corrupt_hdf5_is_reported_not_hung(tmp_path: Path) -> None:
    from ckptd.worker.checkpoint.h5export import check_readable, save_weights_file

    good = tmp_path / "w.hdf5"
    save_weights_file(_model(), good)
    assert check_readable(good) is None
    data = good.read_bytes()
    for name, damaged in {
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "garbage": b"\x89HDF\r\n\x1a\n" + b"\xff" * 4000,
    }.items():
        bad = tmp_path / f"{name}.hdf5"
        bad.write_bytes(damaged)
        problem = check_readable(bad, timeout=20)
        assert problem is not None and str(bad) in problem
    assert check_readable(tmp_path / "missing.hdf5") is not None

"""Weights files written atomically and durably (temp → fsync → rename → fsync dir).

- `.hdf5` / `.h5`: the Keras-2 HDF5 weights layout (`layer_names`, per-layer `weight_names`), which
  Keras 3's `model.load_weights("x.hdf5")` still reads, while its own ModelCheckpoint refuses such names.
- `.weights.h5`: Keras 3's own weights layout, through `model.save_weights`.
- `.keras`: the whole model, through `model.save`.
Keras's own writers open the final path with O_TRUNC, so a crash mid-save would destroy the previous
good file; here they only ever write a temp file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import keras
import numpy as np

from ckptd.state.durable import atomic_write_with


def _legacy_weights(layer: Any) -> list[Any]:
    # Keras 2 stored trainable weights first, then non-trainable ones; its loader expects that order.
    return list(layer.trainable_weights) + list(layer.non_trainable_weights)


def _write_keras2_layout(path: Path, model: Any) -> None:
    with h5py.File(path, "w") as f:
        layers = list(model.layers)
        f.attrs["layer_names"] = np.array([layer.name.encode("utf8") for layer in layers])
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = str(keras.__version__).encode("utf8")
        for layer in layers:
            group = f.create_group(layer.name)
            weights = _legacy_weights(layer)
            names = [f"{layer.name}/{w.name}:{i}".encode() for i, w in enumerate(weights)]
            group.attrs["weight_names"] = np.array(names, dtype="S") if names else np.array([], dtype="S1")
            for name, w in zip(names, weights, strict=True):
                # The variable's own numpy(): keras.ops.convert_to_numpy passes copy=False to an
                # __array__ that does not take it (a NumPy 2 DeprecationWarning).
                value = np.asarray(w.numpy() if hasattr(w, "numpy") else keras.ops.convert_to_numpy(w))
                dset = group.create_dataset(name.decode(), value.shape, dtype=value.dtype)
                if value.shape:
                    dset[:] = value
                else:
                    dset[()] = value


def save_weights_file(model: Any, target: Path) -> None:
    """Write `model`'s weights to `target` in the layout its suffix names, atomically and durably."""
    target.parent.mkdir(parents=True, exist_ok=True)
    name = target.name
    if name.endswith(".weights.h5"):
        atomic_write_with(target, lambda tmp: model.save_weights(str(tmp)), suffix=".weights.h5")
    elif name.endswith(".keras"):
        atomic_write_with(target, lambda tmp: model.save(str(tmp)), suffix=".keras")
    elif name.endswith((".hdf5", ".h5")):
        atomic_write_with(target, lambda tmp: _write_keras2_layout(tmp, model))
    else:
        raise ValueError(f"{target}: unsupported weights file suffix")


_READ_ALL = """
import sys, h5py
def visit(name, obj):
    if isinstance(obj, h5py.Dataset):
        obj[()]
with h5py.File(sys.argv[1], "r") as f:
    f.visititems(visit)
"""


def check_readable(path: Path, timeout: float = 30.0) -> str | None:
    """Read every dataset of an HDF5 file in a subprocess with a timeout: reading a corrupt
    HDF5 file can spin forever (HDFGroup/hdf5#1707). Returns why it is unreadable, or None."""
    import subprocess
    import sys

    try:
        r = subprocess.run(
            [sys.executable, "-c", _READ_ALL, str(path)], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return f"{path}: reading it did not finish within {timeout:.0f}s"
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["unknown error"])[-1]
        return f"{path}: unreadable: {last[:300]}"
    return None

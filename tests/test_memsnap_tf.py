"""Memory-tier snapshots with TensorFlow (ckptd.worker.checkpoint.memsnap): a small Keras model trained a few
steps, snapshotted into the tier, trained on into another state, then restored (into itself and
into a freshly built twin) bit for bit: every weight, optimizer slot, counter, generator and
string."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from ckptd.state import memtier as mt
from ckptd.state.memdigest import value_digest
from ckptd.state.mempolicy import DurableHead, choose

pytestmark = pytest.mark.tf


@pytest.fixture
def tier(tier_root: Path) -> Path:
    return mt.open_tier(str(tier_root), "job-1", os.geteuid())


def _build(seed: int, width: int = 16) -> tuple[Any, Any, Any]:
    """A model with its Adam slots built (as the worker builds them before any restore), in a
    checkpoint with a counter, a generator, a string and an object that serialises itself."""
    import keras
    import numpy as np
    import tensorflow as tf

    class Notes(tf.train.experimental.PythonState):  # type: ignore[misc]
        def __init__(self) -> None:
            self.text = f"notes of {seed}"

        def serialize(self) -> str:
            return self.text

        def deserialize(self, string_value: bytes) -> None:
            self.text = string_value.decode() if isinstance(string_value, bytes) else string_value

    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(width, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    model.optimizer.build(model.trainable_variables)
    ckpt = tf.train.Checkpoint(
        model=model,
        optimizer=model.optimizer,
        step=tf.Variable(0, dtype=tf.int64),
        gen=tf.random.Generator.from_seed(seed),
        note=tf.Variable(f"epoch {seed}"),
        notes=Notes(),
    )
    rng = np.random.default_rng(0)
    batch = (rng.standard_normal((16, 8)).astype("float32"), rng.standard_normal((16, 1)).astype("float32"))
    return ckpt, model, batch


def _plan(ckpt: Any, tmp_path: Path) -> Any:
    from ckptd.worker.checkpoint.snapshot import SnapshotPlan, object_graph_now

    _ = ckpt.save_counter  # created lazily by TF; the worker creates it before planning
    graph = object_graph_now(ckpt)
    assert graph is not None
    return SnapshotPlan(ckpt, graph)


def _train(ckpt: Any, model: Any, batch: Any, n: int) -> None:
    for i in range(n):
        model.train_on_batch(*batch)
        ckpt.step.assign_add(1)
        ckpt.gen.normal([3])
        ckpt.note.assign(f"step {int(ckpt.step)}")
        ckpt.notes.text = f"after {int(ckpt.step)} {i}"


def _state(plan: Any) -> dict[str, bytes]:
    """Every checkpointed value, as bytes (so equality is bit-for-bit, NaNs and -0.0 included)."""
    import numpy as np

    out = {}
    for key, value in plan._values(plan.capture()):
        out[key] = value if isinstance(value, bytes) else np.ascontiguousarray(value).tobytes()
    return out


def _at(step: int, generation: int = 1) -> Any:
    from ckptd.worker.checkpoint.memsnap import Position

    return Position("job-1@x", generation, step, 0, step)


def test_restore_from_memory_is_bit_identical(tier: Path, tmp_path: Path) -> None:
    from ckptd.worker.checkpoint import memsnap

    ckpt, model, batch = _build(3)
    plan = _plan(ckpt, tmp_path)
    assert plan.others and plan.slots  # both kinds of value are covered
    _train(ckpt, model, batch, 3)
    snap = memsnap.write(tier, plan, plan.capture(), _at(3))
    taken = _state(plan)
    assert len(taken) > 10 and b"step 3" in taken.values()
    _train(ckpt, model, batch, 4)
    moved = _state(plan)
    assert sorted(k for k in taken if taken[k] != moved[k])  # training changed it

    choice = choose(DurableHead(0, 1), mt.snapshots(tier)[0], "job-1@x", 2, memsnap.verifier(plan))
    assert choice.source == "memory" and choice.snapshot == snap
    memsnap.restore(snap, ckpt, plan)
    assert _state(plan) == taken

    # A worker restarting builds its model afresh (other initial weights), then restores.
    twin, twin_model, _ = _build(99)
    twin_plan = _plan(twin, tmp_path)
    assert _state(twin_plan) != taken
    memsnap.restore(snap, twin, twin_plan)
    assert _state(twin_plan) == taken
    # And goes on exactly as the original would have from there.
    _train(ckpt, model, batch, 2)
    _train(twin, twin_model, batch, 2)
    assert _state(twin_plan) == _state(plan)


def _sharing(seed: int) -> tuple[Any, Any]:
    """Variables that share one buffer with a tensor and with each other, as TF makes them: two
    made from one tensor adopt its buffer, and scalar constants come from a cache."""
    import tensorflow as tf

    anchor = tf.random.stateless_normal([50_000], seed=[seed, 1])
    ckpt = tf.train.Checkpoint(
        left=tf.Variable(anchor),
        right=tf.Variable(anchor),
        step=tf.Variable(0, dtype=tf.int64),
        epoch=tf.Variable(0, dtype=tf.int64),
    )
    return ckpt, anchor


def test_a_restore_changes_the_variables_and_nothing_that_shares_their_buffers(
    tier: Path, tmp_path: Path
) -> None:
    """TF copies a shared buffer at a variable's first update; a restore must not write into
    one either: the tensor the variables were made from and the cached constant 0 stay as they
    are, and each variable gets its own value. A mirrored variable is restored too."""
    import numpy as np
    import tensorflow as tf

    from ckptd.worker.checkpoint import memsnap

    ckpt, _ = _sharing(1)
    plan = _plan(ckpt, tmp_path)
    ckpt.left.assign_add(tf.ones([50_000]))
    ckpt.right.assign_sub(tf.ones([50_000]))
    ckpt.step.assign(7)
    ckpt.epoch.assign(3)
    snap = memsnap.write(tier, plan, plan.capture(), _at(7))
    taken = _state(plan)

    twin, anchor = _sharing(1)
    before = anchor.numpy().copy()
    twin_plan = _plan(twin, tmp_path)
    memsnap.restore(snap, twin, twin_plan)
    assert _state(twin_plan) == taken
    assert np.array_equal(anchor.numpy(), before)
    assert int(tf.constant(0, tf.int64)) == 0 and int(twin.step) == 7 and int(twin.epoch) == 3

    full, model, batch = _build(3)
    full_plan = _plan(full, tmp_path)
    _train(full, model, batch, 2)
    snap = memsnap.write(tier, full_plan, full_plan.capture(), _at(9))
    taken = _state(full_plan)
    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
        mirrored, _, _ = _build(77)
    mirrored_plan = _plan(mirrored, tmp_path)
    memsnap.restore(snap, mirrored, mirrored_plan)
    assert _state(mirrored_plan) == taken


def test_a_damaged_or_foreign_snapshot_is_not_restored(tier: Path, tmp_path: Path) -> None:
    from ckptd.worker.checkpoint import memsnap

    ckpt, model, batch = _build(3)
    plan = _plan(ckpt, tmp_path)
    _train(ckpt, model, batch, 1)
    older = memsnap.write(tier, plan, plan.capture(), _at(1))
    _train(ckpt, model, batch, 1)
    newer = memsnap.write(tier, plan, plan.capture(), _at(2))
    with open(newer.path / mt.VALUES, "r+b") as f:  # one flipped bit in memory
        f.seek(plan.nbytes // 2)
        byte = f.read(1)
        f.seek(plan.nbytes // 2)
        f.write(bytes([byte[0] ^ 1]))
    choice = choose(None, mt.snapshots(tier)[0], "job-1@x", 2, memsnap.verifier(plan))
    assert choice.snapshot == older
    assert [(s, r.split(" ")[0]) for s, r in choice.quarantine] == [(newer, "value")]

    wider, _, _ = _build(3, width=32)  # another model: its plan cannot take these bytes
    wider_plan = _plan(wider, tmp_path)
    assert "another object graph" in (memsnap.verifier(wider_plan)(older) or "")
    with pytest.raises(memsnap.SnapshotMismatch):
        memsnap.restore(older, wider, wider_plan)


def test_a_tier_writer_reuses_pruned_files_and_keeps_n(tier: Path, tmp_path: Path) -> None:
    from ckptd.worker.checkpoint import memsnap

    ckpt, model, batch = _build(5, width=64)
    plan = _plan(ckpt, tmp_path)
    writer = memsnap.TierWriter(tier, plan, keep=2)
    inodes, states = [], {}
    try:
        for step in range(1, 6):
            _train(ckpt, model, batch, 1)
            snap = writer.write(plan.capture(), _at(step))
            inodes.append(os.lstat(snap.path / mt.VALUES).st_ino)
            states[step] = _state(plan)
            kept = mt.snapshots(tier)[0]
            assert [s.manifest.step for s in kept] == list(range(max(1, step - 1), step + 1))
            assert all(mt.verify(s) is None for s in kept)
        assert (tier / mt.SPARE).exists() and len(writer.maps) == 3  # keep + the spare
        assert set(inodes[3:]) <= set(inodes[:3])  # from the fourth on, pruned files are reused
    finally:
        writer.close()
    _train(ckpt, model, batch, 2)
    for s in mt.snapshots(tier)[0]:
        memsnap.restore(s, ckpt, plan)
        assert _state(plan) == states[s.manifest.step]


def test_a_snapshot_with_a_nan_weight_is_never_committed(tier: Path, tmp_path: Path) -> None:
    """restart.on_nan restores the newest state: it must not be the broken one."""
    import numpy as np

    from ckptd.worker.checkpoint import memsnap
    from ckptd.worker.checkpoint.snapshot import SnapshotPlan, object_graph_now
    from ckptd.worker.checkpoint.writer import NonFiniteSnapshot

    ckpt, model, batch = _build(4)
    _ = ckpt.save_counter
    graph = object_graph_now(ckpt)
    assert graph is not None
    plan = SnapshotPlan(ckpt, graph, finite=model.trainable_variables)
    assert plan.finite_keys
    _train(ckpt, model, batch, 1)
    memsnap.write(tier, plan, plan.capture(), _at(1))
    kernel = model.trainable_variables[0]
    value = kernel.numpy()
    value[0, 0] = np.nan
    kernel.assign(value)
    with pytest.raises(NonFiniteSnapshot, match="NaN or infinite"):
        memsnap.write(tier, plan, plan.capture(), _at(2))
    assert [s.manifest.step for s in mt.snapshots(tier)[0]] == [1]


@pytest.mark.parametrize(
    ("limit", "nbytes", "keep", "fits"),
    [(None, 10**12, 2, True), (2**40, 2**20, 2, True), (2**30, 2**28, 3, False), (2**30, 2**28, 2, None)],
)
def test_a_tier_that_would_pass_the_memory_limit_is_not_used(
    limit: int | None, nbytes: int, keep: int, fits: bool | None
) -> None:
    """keep snapshots and the spare beside the worker's own RSS, against resources.memory_limit."""
    from types import SimpleNamespace

    import psutil

    from ckptd.worker.checkpoint.tierrestore import _does_not_fit

    s: Any = SimpleNamespace(spec=SimpleNamespace(resources=SimpleNamespace(memory_limit=limit)))
    rss = psutil.Process().memory_info().rss
    expected = fits if fits is not None else rss + nbytes * (keep + 1) <= (limit or 0)
    why = _does_not_fit(s, nbytes, keep)
    assert (why is None) == expected, why
    if why is not None:
        assert "resources.memory_limit" in why and f"{keep} snapshots" in why


@pytest.mark.parametrize("order", ["in order", "out of order"])
def test_the_digest_taken_while_copying_is_the_files(order: str) -> None:
    """The writer digests each chunk as it copies it; the result must be what verify computes
    over the file (alignment padding included), also if chunks come out of offset order."""
    from types import SimpleNamespace

    import numpy as np

    from ckptd.worker.checkpoint.memsnap import _Sealer
    from ckptd.worker.checkpoint.snapshot import Slot

    slots = [Slot("a", "<f4", (3,), 0, 12), Slot("b", "<f4", (5,), 64, 20), Slot("c", "<f4", (2,), 128, 8)]
    plan = SimpleNamespace(finite_keys={"b": "dense/kernel"})
    buf = bytearray(b"\x07" * 192)  # padding bytes that are not zero must be digested too
    view = memoryview(buf)
    sealer = _Sealer(view, plan)  # type: ignore[arg-type]
    for slot in slots if order == "in order" else reversed(slots):
        dst = np.ndarray(slot.shape, dtype=slot.dtype, buffer=view, offset=slot.offset)
        dst[:] = np.arange(slot.shape[0], dtype=np.float32) + slot.offset
        sealer.chunk(slot, 0, dst)
        del dst
    assert sealer.digest(b"strings") == value_digest([bytes(buf), b"strings"])
    bad = np.ndarray((5,), dtype="<f4", buffer=view, offset=64)
    bad[2] = np.nan
    with pytest.raises(Exception, match="dense/kernel is NaN"):
        _Sealer(view, plan).chunk(slots[1], 0, bad)  # type: ignore[arg-type]

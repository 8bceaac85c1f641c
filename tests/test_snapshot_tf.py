"""Async snapshots (ckptd.worker.checkpoint.snapshot / asyncsave): a capture freezes the values of its instant
at O(1) cost (TensorFlow copies a variable's buffer before updating it while a capture holds it),
so the copy into shared memory may overlap the next training steps, inline or in a thread."""

from __future__ import annotations

from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import pytest

from .procs import wait_for

pytestmark = pytest.mark.tf


def _setup(tmp_path: Path, width: int) -> tuple[Any, Any, Any, Any]:
    import keras
    import numpy as np
    import tensorflow as tf

    from ckptd.worker.checkpoint.snapshot import SnapshotPlan, object_graph_of

    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(width, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    model.optimizer.build(model.trainable_variables)
    step = tf.Variable(0, dtype=tf.int64)
    ckpt = tf.train.Checkpoint(model=model, optimizer=model.optimizer, step=step, note=tf.Variable("epoch 0"))
    plan = SnapshotPlan(ckpt, object_graph_of(ckpt.write(str(tmp_path / "probe" / "p"))))
    rng = np.random.default_rng(0)
    batch = (rng.standard_normal((16, 8)).astype("float32"), rng.standard_normal((16, 1)).astype("float32"))
    return plan, model, step, batch


def _values_now(plan: Any) -> dict[str, Any]:
    import numpy as np

    return {k: np.array(v, copy=True) for k, v in plan._values(plan.capture()) if not isinstance(v, bytes)}


def _read_shm(plan: Any, shm: shared_memory.SharedMemory) -> dict[str, Any]:
    import numpy as np

    return {
        s.key: np.ndarray(s.shape, dtype=s.dtype, buffer=shm.buf, offset=s.offset).copy() for s in plan.slots
    }


def _train(model: Any, step: Any, batch: Any, n: int) -> None:
    for _ in range(n):
        model.train_on_batch(*batch)
        step.assign_add(1)


@pytest.mark.parametrize("width", [16, 300_000])  # 0.5 kB inline; ~20 MB copied in a thread
def test_capture_freezes_values_while_training_goes_on(tmp_path: Path, width: int) -> None:
    import numpy as np

    from ckptd.worker.checkpoint.asyncsave import FILL_IN_THREAD_BYTES, Filler

    plan, model, step, batch = _setup(tmp_path, width)
    assert (plan.nbytes >= FILL_IN_THREAD_BYTES) is (width > 1000)
    _train(model, step, batch, 2)
    expected = _values_now(plan)
    shm = shared_memory.SharedMemory(create=True, size=plan.nbytes)
    try:
        filler = Filler()
        filler.start(plan, shm, plan.capture())
        _train(model, step, batch, 3)  # updates every trainable variable, slot and the counter
        assert filler.done(block=True) and filler.error is None
        got = _read_shm(plan, shm)
        after = _values_now(plan)
        strings = filler.strings
    finally:
        shm.close()
        shm.unlink()
    assert set(got) == set(expected)
    changed = [k for k in got if not np.array_equal(expected[k], after[k])]
    assert len(changed) >= 5  # kernels, biases, Adam slots, iterations and step moved on...
    for key in got:  # ...but the snapshot holds the values of the capture's instant
        assert np.array_equal(got[key], expected[key]), key
    assert b"epoch 0" in strings.values()  # string variables travel in the message


def test_fill_lets_go_of_each_value_once_copied(tmp_path: Path) -> None:
    """Each captured tensor is dropped from the list once it is in shared memory: a value still
    held makes the next training step copy the variable first (TF's copy-on-write)."""
    plan = _setup(tmp_path, 16)[0]
    captured = plan.capture()
    expected = _values_now(plan)
    shm = shared_memory.SharedMemory(create=True, size=plan.nbytes)
    try:
        strings = plan.fill(shm, captured)
        got = _read_shm(plan, shm)
    finally:
        shm.close()
        shm.unlink()
    assert len(captured) == len(plan.plain_keys) + sum(len(a) for _, a in plan.others)
    assert all(value is None for _, value in captured), captured
    assert all((got[k] == expected[k]).all() for k in got) and b"epoch 0" in strings.values()


class _NoProcess:
    def join(self, timeout: float | None = None) -> None:
        pass


def test_snapshots_go_to_a_ready_writer_and_the_layout_is_sent_once(tmp_path: Path) -> None:
    """Until the writer has imported TensorFlow it is not ready (Checkpointing saves
    synchronously meanwhile); then snapshots are handed over, the layout with the first only; a
    writer that dies is reported."""
    import multiprocessing

    import tensorflow as tf

    from ckptd.worker.checkpoint.asyncsave import AsyncSaver

    _, model, step, _ = _setup(tmp_path, 16)
    ckpt = tf.train.Checkpoint(model=model, optimizer=model.optimizer, step=step, note=tf.Variable("epoch 0"))
    ours, fake_writer = multiprocessing.Pipe()
    saver = AsyncSaver(ckpt, tmp_path / "ck", 3, None, writer=(_NoProcess(), ours))  # type: ignore[arg-type]
    (tmp_path / "ck").mkdir()
    saver.prepare(None)
    try:
        assert not saver.is_ready()
        fake_writer.send({"ready": True})
        wait_for("the writer to be ready", saver.is_ready, 5)
        saver.submit(20, 0, 20, {"loss": 1.0}, "interval")
        assert saver.busy()  # in flight
        assert fake_writer.poll(5)
        first = fake_writer.recv()
        assert first["step"] == 20 and first["slots"] and first["object_graph"]
        assert b"epoch 0" in first["strings"].values()
        fake_writer.send({"ok": False, "error": "EIO", "number": first["number"], "seconds": 0.01})
        reply = saver.poll(block=True)
        assert reply is not None and reply["error"] == "EIO" and reply["reason"] == "interval"
        assert not saver.busy()
        saver.submit(40, 0, 40, {}, "final")
        second = fake_writer.recv()
        assert second["step"] == 40 and "slots" not in second  # the layout went with the first
        fake_writer.close()  # the writer dies with a save in flight
        reply = saver.poll(block=True)
        assert reply is not None and not reply["ok"] and "died" in reply["error"] and saver.died()
    finally:
        saver.close()


def test_the_object_graph_is_known_without_writing_the_state(tmp_path: Path) -> None:
    """A fresh start learns the object graph from TF's own save path instead of one throw-away
    write of the whole state (minutes of disk time at GB scale)."""
    import tensorflow as tf

    from ckptd.worker.checkpoint.snapshot import object_graph_now, object_graph_of

    _, model, step, _ = _setup(tmp_path, 16)
    ckpt = tf.train.Checkpoint(model=model, optimizer=model.optimizer, step=step, note=tf.Variable("x"))
    _ = ckpt.save_counter
    assert object_graph_now(ckpt) == object_graph_of(ckpt.write(str(tmp_path / "w" / "w")))


def test_thread_writer_commits_the_capture_and_refuses_a_nan_weight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large states are written by a thread from the captured tensors themselves (no
    shared-memory copy): the commit holds the values of the capture's instant although training
    went on, and a snapshot with a NaN weight is refused (the weights' finiteness is checked by
    the writer, off the step loop)."""
    import multiprocessing

    import numpy as np
    import tensorflow as tf

    from ckptd.state import ckptfiles as cf
    from ckptd.worker.checkpoint import asyncsave

    monkeypatch.setattr(asyncsave, "THREAD_WRITER_BYTES", 0)
    _, model, step, batch = _setup(tmp_path, 16)
    ckpt = tf.train.Checkpoint(model=model, optimizer=model.optimizer, step=step, note=tf.Variable("epoch 0"))
    ours, _theirs = multiprocessing.Pipe()
    directory = tmp_path / "ck"
    directory.mkdir()
    saver = asyncsave.AsyncSaver(
        ckpt,
        directory,
        3,
        None,
        writer=(_NoProcess(), ours),
        finite=model.trainable_variables,  # type: ignore[arg-type]
    )
    saver.prepare(None)
    try:
        assert saver.link.thread is not None and saver.layout.shm is None
        wait_for("the thread writer to be ready", saver.is_ready, 5)
        _train(model, step, batch, 2)
        expected = [np.array(v) for v in model.trainable_variables + model.optimizer.variables]
        saver.submit(2, 0, 2, {"loss": 1.0}, "interval")
        _train(model, step, batch, 3)
        reply = saver.poll(block=True)
        assert reply is not None and reply["ok"], reply
        kernel = model.trainable_variables[0]
        kernel.assign(tf.fill(kernel.shape, float("nan")))
        saver.submit(5, 0, 5, {"loss": 1.0}, "interval")
        refused = saver.poll(block=True)
    finally:
        saver.close()
    assert refused is not None and refused.get("nonfinite") and kernel.path in refused["error"], refused
    manifests = cf.read_manifests(directory)[0]
    assert [m.step for m in manifests] == [2]
    ckpt.restore(str(directory / manifests[0].prefix)).assert_existing_objects_matched()
    got = [np.array(v) for v in model.trainable_variables + model.optimizer.variables]
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the bug, on purpose
def test_a_thread_writer_that_dies_looks_like_a_dead_writer_process(tmp_path: Path) -> None:
    """A bug that kills the writer thread closes its end of the reply pipe: the training side
    sees EOF ("the writer died": saves go synchronous), not a save to wait for forever."""
    from ckptd.worker.checkpoint.writer import ThreadWriter

    writer = ThreadWriter(tmp_path)
    assert writer.poll(5) and writer.recv() == {"ready": True}
    writer.send({})  # no number: the error reply itself fails, and the thread ends
    assert writer.poll(5)
    with pytest.raises(EOFError):
        writer.recv()
    writer.join(5)
    writer.close()

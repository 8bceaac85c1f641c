"""The asynchronous checkpoint writer: a separate process that writes snapshots taken by the
training process (ckptd.worker.checkpoint.snapshot) and commits them with the same protocol as synchronous
saves (fsync files and directory, verify, durable manifest, retention after commit).

For large states the writer is a thread of the training process instead (ThreadWriter).
At most one snapshot is in flight. If the worker dies, the writer sees EOF and exits; a write
interrupted by a crash leaves only uncommitted files, which garbage collection removes.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from functools import partial
from multiprocessing import resource_tracker, shared_memory
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NotRequired, TypedDict

from ckptd.state import ckptfiles as cf
from ckptd.worker.errors import Fenced

WRITER_NICENESS = 10


class WriterReply(TypedDict):
    """The writer process's answer to one save (and AsyncSaver.poll's, which adds the save's
    step, epoch and reason): the committed manifest and what retention retired, or the error."""

    ok: bool
    seconds: float
    number: int
    manifest: NotRequired[dict[str, Any]]  # ok
    retired: NotRequired[list[dict[str, Any]]]  # ok
    error: NotRequired[str]  # not ok
    fenced: NotRequired[bool]  # not ok because a newer attempt has committed (errors.Fenced)
    nonfinite: NotRequired[bool]  # not ok because a trainable weight is NaN or infinite
    step: NotRequired[int]
    epoch: NotRequired[int]
    reason: NotRequired[str]


def _view(array: Any) -> Any | None:
    """A tensor viewing `array`'s memory (DLPack, zero-copy: tf.constant would copy a large
    model's every byte once more), or None for a dtype DLPack cannot carry."""
    import tensorflow as tf

    try:
        return tf.experimental.dlpack.from_dlpack(array.__dlpack__())
    except (TypeError, ValueError, RuntimeError, BufferError, tf.errors.OpError):
        return None


def _slot_tensors(
    layout: dict[str, Any],
    shm: shared_memory.SharedMemory,
) -> list[tuple[str, Any, Any | None]]:
    """(key, array in shared memory, zero-copy tensor or None) per slot, made once per layout:
    a view stays valid across saves, so remaking it at every commit is wasted work."""
    import numpy as np

    if "views" not in layout:
        arrays = [
            (key, np.ndarray(shape, dtype=dtype, buffer=shm.buf, offset=offset))
            for key, dtype, shape, offset in layout["slots"]
        ]
        layout["views"] = [(key, array, _view(array)) for key, array in arrays]
    views: list[tuple[str, Any, Any | None]] = layout["views"]
    return views


class NonFiniteSnapshot(ValueError):
    """A trainable weight of the snapshot is NaN or infinite: it is never committed."""


def _check_finite(named: list[tuple[str, Any]], keys: dict[str, str]) -> None:
    """check_numerics scans a tensor without allocating (is_finite would make a bool tensor of
    each weight's size)."""
    import tensorflow as tf

    for key, tensor in named:
        if key in keys:
            try:
                tf.debugging.check_numerics(tensor, key)
            except tf.errors.InvalidArgumentError:
                raise NonFiniteSnapshot(f"weight {keys[key]} is NaN or infinite") from None


def _commit(
    msg: dict[str, Any],
    layout: dict[str, Any],
    named: list[tuple[str, Any]],
    directory: Path,
    expected: set[str] | None,
) -> tuple[WriterReply, set[str]]:
    """Check, write and commit one snapshot given as (checkpoint key, tensor) pairs."""
    import tensorflow as tf

    from ckptd.worker.checkpoint.keeper import CommitPoint, commit_written
    from ckptd.worker.checkpoint.snapshot import OBJECT_GRAPH_KEY
    from ckptd.worker.faults import Faults

    _check_finite(named, layout.get("finite", {}))
    if "graph" not in layout:
        layout["graph"] = tf.constant(layout["object_graph"], dtype=tf.string)
    names = [key for key, _ in named] + [OBJECT_GRAPH_KEY]
    tensors = [tensor for _, tensor in named] + [layout["graph"]]
    prefix = directory / f"{cf.PREFIX}-{msg['number']}"
    tf.raw_ops.SaveV2(
        prefix=str(prefix), tensor_names=names, shape_and_slices=[""] * len(names), tensors=tensors
    )
    point = CommitPoint(
        msg["number"], msg["step"], msg["epoch"], msg["step_in_epoch"], msg["metrics"], tuple(msg["who"])
    )
    manifest, retired, keys = commit_written(
        directory,
        point,
        expected,
        msg["max_to_keep"],
        msg["keep_every_n_hours"],
        lambda step: Faults.from_env().in_writer(step, msg["who"][0]),  # test-only: slow disk, kill
    )
    return {
        "ok": True,
        "seconds": 0.0,
        "number": msg["number"],
        "manifest": manifest.to_dict(),
        "retired": [r.to_dict() for r in retired],
    }, keys


def _from_shared_memory(
    msg: dict[str, Any], layout: dict[str, Any], shm: shared_memory.SharedMemory
) -> list[tuple[str, Any]]:
    import tensorflow as tf

    named = [
        (key, view if view is not None else tf.constant(array))  # copied at every save
        for key, array, view in _slot_tensors(layout, shm)
    ]
    return named + [(key, tf.constant(v, dtype=tf.string)) for key, v in msg["strings"].items()]


def _from_captured(msg: dict[str, Any]) -> list[tuple[str, Any]]:
    """The thread writer's tensors: the captured values themselves (no copy)."""
    import numpy as np
    import tensorflow as tf

    named = []
    for key, value in msg["captured"]:
        if isinstance(value, tf.Tensor):
            named.append((key, value))
        elif isinstance(value, bytes) or (isinstance(value, np.ndarray) and value.dtype == object):
            named.append((key, tf.constant(value, dtype=tf.string)))
        else:
            named.append((key, tf.convert_to_tensor(value)))
    return named


def _handle(
    msg: dict[str, Any],
    layout: dict[str, Any],
    directory: Path,
    expected: set[str] | None,
    tensors: Callable[[], list[tuple[str, Any]]],
) -> tuple[WriterReply, set[str] | None]:
    """One save, as a reply: committed, or failed with the error (never raises)."""
    t0 = time.monotonic()
    reply: WriterReply
    try:
        reply, expected = _commit(msg, layout, tensors(), directory, expected)
    except Exception as e:  # reported to the training loop as a failed save
        with contextlib.suppress(OSError):
            committed = {m.number for m in cf.read_manifests(directory)[0]}
            cf.collect_garbage(directory, committed)
        errno = getattr(e, "errno", None)
        reply = {
            "ok": False,
            "seconds": 0.0,
            "number": msg["number"],
            "error": f"{type(e).__name__}: {e}" + (f" (errno {errno})" if errno else ""),
            "fenced": isinstance(e, Fenced),
            "nonfinite": isinstance(e, NonFiniteSnapshot),
        }
    reply["seconds"] = time.monotonic() - t0
    reply["number"] = msg["number"]
    return reply, expected


def _new_layout(msg: dict[str, Any]) -> dict[str, Any]:
    return {
        "slots": msg.get("slots", []),
        "object_graph": msg["object_graph"],
        "finite": msg.get("finite", {}),
    }


def writer_main(conn: Connection, directory: str) -> None:
    directory = str(cf.real_dir(Path(directory)))  # from now on, no symlink is followed
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # SIGINT/SIGTERM reach the whole process group: the training process decides when to stop
    # (it waits for the save in flight); SIGUSR1 asks the worker for stacks, not the writer.
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)
    # Imported already (the process was forked after the import; spawned, it imports it now):
    # until the writer is ready every save is synchronous (Checkpointing._save_async).
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    # Start the runtime (devices, the eager context: ~1 s) before saying ready, so that "ready"
    # means a save can start now; else the first async save pays it while saves pile up.
    tf.debugging.check_numerics(tf.zeros(()), "warm-up")
    # Then background work yields the CPU to training when both want it (2 cores are common):
    # a commit lands a little later instead of every step running slower.
    os.nice(WRITER_NICENESS)
    shm: shared_memory.SharedMemory | None = None
    expected: set[str] | None = None
    layout: dict[str, Any] = {}
    conn.send({"ready": True})
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the training process is gone
        if msg.get("op") == "stop":
            return
        if shm is None or shm.name != msg["shm"]:
            # The writer shares its parent's resource tracker (start_writer): attaching
            # registers nothing new, and the training process, which created it, unlinks it.
            shm = shared_memory.SharedMemory(name=msg["shm"])
            layout.pop("views", None)  # they view the previous segment
        if "object_graph" in msg:  # the first save of the attempt carries the layout
            layout = _new_layout(msg)
        reply, expected = _handle(
            msg, layout, Path(directory), expected, partial(_from_shared_memory, msg, layout, shm)
        )
        conn.send(reply)


class ThreadWriter:
    """The writer as a thread of the training process, for large states (see
    AsyncSaver.prepare). It writes the captured tensors themselves, frozen copy-on-write: no
    shared-memory copy exists, so a save in flight holds at most one extra copy of the state
    (of the variables training updates before the write ends), and no second process imports
    TensorFlow. SaveV2, fsync and the checksums release the GIL. Speaks like the writer
    process's end of the pipe (send / poll / recv / fileno), so AsyncSaver drives both alike."""

    def __init__(self, directory: Path) -> None:
        self.directory = cf.real_dir(directory)
        self._replies, self._out = multiprocessing.Pipe(duplex=False)
        self._inbox: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name="ckptd-writer", daemon=True)
        self._thread.start()

    def send(self, msg: dict[str, Any]) -> None:
        self._inbox.put(msg)

    def poll(self, timeout: float | None = 0.0) -> bool:
        return self._replies.poll(timeout)

    def recv(self) -> Any:
        return self._replies.recv()

    def fileno(self) -> int:
        return self._replies.fileno()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def close(self) -> None:
        self._replies.close()
        self._out.close()

    def _main(self) -> None:
        try:
            self._serve()
        finally:
            # Like a writer process's exit: the reader sees EOF, so a thread that died of a bug
            # is "the writer died" (saves go synchronous), never a save waited for forever.
            self._out.close()

    def _serve(self) -> None:
        # Linux nices threads one by one: the writer yields the CPU to the step loop.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICENESS)
        self._out.send({"ready": True})
        layout: dict[str, Any] = {}
        expected: set[str] | None = None
        while True:
            msg = self._inbox.get()
            if msg.get("op") == "stop":
                return
            if "object_graph" in msg:
                layout = _new_layout(msg)
            reply, expected = _handle(msg, layout, self.directory, expected, partial(_from_captured, msg))
            # Drop the captured tensors now: while held, each variable training updates is
            # copied before the update (copy-on-write).
            del msg
            self._out.send(reply)


Writer = tuple[multiprocessing.process.BaseProcess, Connection]


def start_writer(directory: Path) -> Writer:
    """Fork the writer process. Only before TensorFlow's runtime is initialised (the worker
    forks it right after the import, before any op): a process that has run TensorFlow, and
    above all one that has touched a GPU, must never be forked."""
    # The writer attaches to the segment the training process creates: with one resource
    # tracker between them, attaching registers nothing the writer's exit would unlink.
    resource_tracker.ensure_running()
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=writer_main, args=(child, str(directory)), daemon=True, name="ckptd-writer")
    proc.start()
    child.close()
    # Every way out of the worker stops the writer. A config error before the checkpointing
    # existed left it waiting for a message while multiprocessing's exit handler (registered
    # earlier, so run later) waited for it: the job hung instead of failing as config_error.
    atexit.register(_kill_at_exit, proc, parent)
    return proc, parent


def _kill_at_exit(proc: multiprocessing.process.BaseProcess, conn: Connection) -> None:
    """At the worker's exit (by then the saver has stopped the writer, or nothing of value is
    in flight: an interrupted write is uncommitted debris)."""
    if proc.is_alive():
        proc.kill()
    conn.close()

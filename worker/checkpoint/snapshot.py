"""In-memory snapshots of a tf.train.Checkpoint, for writing it from another process.

TF's own async checkpointing breaks with Keras 3 models on the second save, and a writer *thread*
competes with training for the GIL. Here the training loop stalls only to copy every checkpointed
value into shared memory; a writer process (ckptd.worker.checkpoint.writer) writes the very same tensor bundle
with SaveV2 under the same keys and object graph, so `Checkpoint.restore` reads it like any other.

Keys and values come from the checkpoint's object graph (the `_CHECKPOINTABLE_OBJECT_GRAPH` proto of
a checkpoint written by TF): node i of the proto is the i-th object of the breadth-first traversal
`tf.train.TrackableView(ckpt).descendants()`, and each attribute names one serialised tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


class PlanMismatch(Exception):
    """The live object graph does not match the checkpoint's: async saving is not possible."""


def object_graph_of(prefix: str) -> bytes:
    value = tf.train.load_checkpoint(prefix).get_tensor(OBJECT_GRAPH_KEY)
    return value if isinstance(value, bytes) else bytes(value)


def object_graph_now(ckpt: tf.train.Checkpoint) -> bytes | None:
    """The object graph a save of `ckpt` would write, without writing it (a fresh start of a
    GB-scale model otherwise pays one throw-away write of the whole state). TF's own save path
    builds it this way; None if that internal API is not there."""
    try:
        proto = ckpt._saver._gather_serialized_tensors(None)[3]
    except (AttributeError, TypeError, IndexError):
        return None
    graph: bytes = proto.SerializeToString()
    return graph


@dataclass(frozen=True)
class Slot:
    key: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def _value(t: Any) -> Any:
    """A numeric value as an ndarray; a string tensor's value as bytes (or an object array)."""
    tensor = t if hasattr(t, "numpy") else t.tensor  # tensor_callable.Callable for variables
    value = tensor.numpy()
    return value if tensor.dtype == tf.string else np.asarray(value)


class SnapshotPlan:
    def __init__(self, ckpt: tf.train.Checkpoint, object_graph: bytes, finite: Sequence[Any] = ()) -> None:
        proto = trackable_object_graph_pb2.TrackableObjectGraph()
        proto.ParseFromString(object_graph)
        nodes = tf.train.TrackableView(ckpt).descendants()
        if len(nodes) != len(proto.nodes):
            raise PlanMismatch(f"{len(nodes)} live objects, {len(proto.nodes)} in the checkpoint")
        self.object_graph = object_graph
        self.plain_keys: list[str] = []
        plain_vars: list[Any] = []
        self.others: list[tuple[Any, list[tuple[str, str]]]] = []
        # The writer refuses to commit a snapshot in which one of these (the trainable weights)
        # is NaN or infinite: the check is a pass over every weight, too long for the step loop.
        self.finite_keys: dict[str, str] = {}  # checkpoint key -> the weight's name
        finite_ids = {id(v) for v in finite}  # one lookup per node, not a scan of the weights
        for obj, node in zip(nodes, proto.nodes, strict=True):
            attrs = [(a.name, a.checkpoint_key) for a in node.attributes]
            if len(attrs) == 1 and attrs[0][0] == "VARIABLE_VALUE" and hasattr(obj, "numpy"):
                self.plain_keys.append(attrs[0][1])
                plain_vars.append(obj)
                if id(obj) in finite_ids:
                    self.finite_keys[attrs[0][1]] = str(getattr(obj, "path", attrs[0][1]))
            elif attrs:
                self.others.append((obj, attrs))
        # One call reads every plain variable. The outputs share the variables' buffers, and TF
        # copies a buffer before updating a variable whose buffer is shared (copy-on-write in
        # PrepareToUpdateVariable), so holding them freezes the values at O(1) cost; copying
        # them into shared memory can then overlap the next training steps. Calling the concrete
        # function skips tf.function's argument binding: ~100 instead of ~150 µs per capture.
        self._read = tf.function(
            lambda: [tf.convert_to_tensor(v) for v in plain_vars]
        ).get_concrete_function()
        self.slots: list[Slot] = []
        offset = 0
        for key, value in self._values(self.capture()):
            if not isinstance(value, np.ndarray) or value.dtype == object:
                continue  # strings travel in the message, not in shared memory
            self.slots.append(Slot(key, value.dtype.str, value.shape, offset, value.nbytes))
            offset += -(-value.nbytes // 64) * 64  # 64-byte aligned
        self.nbytes = max(offset, 1)

    def capture(self) -> list[tuple[str, Any]]:
        """Freeze the values of this instant (the only part the step loop waits for)."""
        out: list[tuple[str, Any]] = list(zip(self.plain_keys, self._read(), strict=True))
        for obj, attrs in self.others:
            tensors = obj._serialize_to_tensors()
            for name, key in attrs:
                if name not in tensors:
                    raise PlanMismatch(f"{key}: not produced by the live object")
                out.append((key, _value(tensors[name])))
        return out

    @staticmethod
    def _value_of(t: Any) -> Any:
        if isinstance(t, tf.Tensor):
            # np.asarray views the tensor's buffer; .numpy() would copy it.
            return t.numpy() if t.dtype == tf.string else np.asarray(t)
        return t

    @classmethod
    def _values(cls, captured: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        return [(key, cls._value_of(t)) for key, t in captured]

    def fill(
        self,
        shm: shared_memory.SharedMemory,
        captured: list[tuple[str, Any]],
        chunk_done: Callable[[Slot, int, np.ndarray], None] | None = None,
    ) -> dict[str, Any]:
        """Copy the captured numeric values into `shm` (numpy releases the GIL for large
        copies); return the string values (small) by key. Consumes `captured`: each value is
        dropped from the list once copied, so that the next training step updates it in place
        instead of copying it first (TF's copy-on-write copies only a buffer still shared).

        With `chunk_done`, each value is copied in chunks of FILL_CHUNK bytes, in the order of
        the slots' offsets, and `chunk_done(slot, byte offset in the slot, copied chunk)` is
        called after each: a digest or a check of the chunk then reads it from the CPU's cache,
        not from memory again."""
        strings: dict[str, Any] = {}
        slots = {s.key: s for s in self.slots}
        for i, (key, t) in enumerate(captured):
            captured[i] = (key, None)
            value = self._value_of(t)
            del t
            slot = slots.get(key)
            if slot is None:
                strings[key] = value
                continue
            if value.dtype.str != slot.dtype or value.shape != slot.shape:
                raise PlanMismatch(f"{key}: shape or dtype changed since the plan was made")
            dst = np.ndarray(slot.shape, dtype=slot.dtype, buffer=shm.buf, offset=slot.offset)
            if chunk_done is None:
                np.copyto(dst, value)
            else:
                _copy_in_chunks(slot, dst, value, chunk_done)
            del value
        return strings


FILL_CHUNK = 512 << 10  # well inside a core's L2 cache


def _copy_in_chunks(
    slot: Slot, dst: np.ndarray, value: np.ndarray, chunk_done: Callable[[Slot, int, np.ndarray], None]
) -> None:
    flat_dst, flat_src = dst.reshape(-1), np.ascontiguousarray(value).reshape(-1)
    step = max(1, FILL_CHUNK // max(1, dst.itemsize))
    for start in range(0, flat_dst.size, step):
        chunk = flat_dst[start : start + step]
        np.copyto(chunk, flat_src[start : start + step])
        chunk_done(slot, start * dst.itemsize, chunk)

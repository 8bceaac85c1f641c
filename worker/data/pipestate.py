"""State that a user's tf.data pipeline keeps in variables, carried in the checkpoint.

A Keras random layer inside `ds.map` (keras-io's "apply the augmentation to the dataset"), a
SeedGenerator or a `tf.random.Generator` there, or a counter: the dataset function captures an
integer variable and advances it per element. Re-creating iterators does not replay that, so
ckptd snapshots those variables at the start of every pass over the data (when the previous pass
is used up, or when a pass begins) and keeps the snapshot in the checkpoint. On resume it sets
them back to the snapshot of the pass being resumed before creating that pass's iterator, whose
skip over the batches already trained then advances them exactly as the first time (under op
determinism tf.data runs stateful map functions in order).
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf
from tensorflow.python.data.ops.structured_function import StructuredFunctionWrapper

Handle = tuple[Any, Any]  # (resource handle, dtype)


def _captured(ds: tf.data.Dataset) -> list[Any]:
    """Every resource the dataset's functions capture, in pipeline order, once."""
    out: list[Any] = []
    seen: set[int] = set()
    stack = [ds]
    while stack:
        d = stack.pop()
        for value in vars(d).values():
            if isinstance(value, StructuredFunctionWrapper):
                for t in value.function.captured_inputs:
                    if t.dtype == tf.resource and id(t) not in seen:
                        seen.add(id(t))
                        out.append(t)
        stack.extend(reversed(d._inputs()))
    return out


def _dtype(handle: Any) -> Any:
    data = getattr(handle, "_handle_data", None)
    if data is None or not data.shape_and_type:
        return None  # a lookup table or another resource that is not a variable
    return tf.dtypes.as_dtype(data.shape_and_type[0].dtype)


class PipelineState:
    def __init__(self, ds: tf.data.Dataset) -> None:
        variables = [(h, _dtype(h)) for h in _captured(ds)]
        variables = [(h, d) for h, d in variables if d is not None]
        self.handles: list[Handle] = [(h, d) for h, d in variables if d.is_integer]
        # Float variables a map function reads (or writes) are left alone: they may be the
        # model's own weights, which the checkpoint restores anyway.
        self.all_integer = len(self.handles) == len(variables)
        self.shadows = [tf.Variable(self._read(h, d), trainable=False) for h, d in self.handles]
        self.for_pass = tf.Variable(-1, dtype=tf.int64, trainable=False)

    @staticmethod
    def _read(handle: Any, dtype: Any) -> Any:
        return tf.raw_ops.ReadVariableOp(resource=handle, dtype=dtype)

    def variables(self) -> list[tf.Variable]:
        return [self.for_pass, *self.shadows] if self.handles else []

    def snapshot(self, pass_index: int) -> None:
        """The variables' values now are those at the start of `pass_index`."""
        for (h, d), shadow in zip(self.handles, self.shadows, strict=True):
            shadow.assign(self._read(h, d))
        if self.handles:
            self.for_pass.assign(pass_index)

    def enter(self, pass_index: int) -> None:
        """Before creating the iterator of `pass_index`: restore its start, or record it."""
        if not self.handles:
            return
        if int(self.for_pass.numpy()) != pass_index:
            self.snapshot(pass_index)
            return
        for (h, _), shadow in zip(self.handles, self.shadows, strict=True):
            tf.raw_ops.AssignVariableOp(resource=h, value=shadow)

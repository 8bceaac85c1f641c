"""Memory-tier snapshots of a tf.train.Checkpoint (docs/memory-tier.md): written from a
SnapshotPlan's capture into the tier's tmpfs (ckptd.state.memtier), restored exactly by assigning
the values back to the live objects.

Writing: the plan's capture (O(1), in the step loop) is copied by `SnapshotPlan.fill` straight
into `values.bin`, a file of the tier mapped into memory, so the snapshot is the plan's shared-
memory layout byte for byte: one copy of the state, no TF bundle, no fsync (a tmpfs has no disk).
Restoring assigns every value to its variable (from a tensor filled by one memcpy, not through
TF's slow numpy conversion), and each string to its object through the same
`_restore_from_tensors` TF's restore calls. No bundle is written back: that would hold one more
full copy in RAM beside the tier's own. Keras 3 builds optimizer slots lazily, but the worker
builds them before any restore, so every key of the plan has its live variable; the plan digest
(object graph and value layout) proves the snapshot's bytes mean the same variables.

Integration into the saver and the restorer is phase 2; this module only needs the plan.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any, cast

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from ckptd.state import memtier as mt
from ckptd.state.memdigest import sealed, value_digest, value_hasher
from ckptd.worker.checkpoint.snapshot import Slot, SnapshotPlan
from ckptd.worker.checkpoint.writer import NonFiniteSnapshot


class SnapshotMismatch(Exception):
    """The snapshot was taken with another object graph or value layout than the live plan's."""


@dataclass(frozen=True)
class Position:
    """Where in training a snapshot is, and whose history it continues."""

    lineage: str
    generation: int
    step: int
    epoch: int
    step_in_epoch: int
    metrics: dict[str, float] = field(default_factory=dict)


class _Mapped:
    """What SnapshotPlan.fill uses of a SharedMemory (its `buf`), over a file of the tier."""

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf


def digest_of_plan(plan: SnapshotPlan) -> str:
    """The graph's structure and keys, and the value layout. Variables' names (`full_name`) are
    left out, as TF's own restore ignores them: a model built twice in one process names its
    layers dense, then dense_1, with the same checkpoint keys."""
    proto = trackable_object_graph_pb2.TrackableObjectGraph()
    proto.ParseFromString(plan.object_graph)
    for node in proto.nodes:
        for attr in node.attributes:
            attr.ClearField("full_name")
    layout = [(s.key, s.dtype, s.shape, s.offset, s.nbytes) for s in plan.slots]
    return mt.plan_digest(proto.SerializeToString(deterministic=True), layout)


def _strings_of(strings: dict[str, Any]) -> mt.Strings:
    out: mt.Strings = {}
    for key, value in strings.items():
        if isinstance(value, bytes):
            out[key] = ((), [value])
        else:  # an object array of bytes (a string tensor with a shape)
            array = np.asarray(value)
            out[key] = (tuple(array.shape), [bytes(x) for x in array.ravel()])
    return out


def write(tier: Path, plan: SnapshotPlan, captured: list[tuple[str, Any]], at: Position) -> mt.Snap:
    """Copy a capture into a new snapshot of the tier, in a fresh file, and commit it. For
    repeated snapshots use TierWriter, which reuses files and their mappings."""
    building = mt.begin(tier, at.step, at.generation)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(building / mt.VALUES, flags, 0o600)
    try:
        _allocate(fd, plan.nbytes)
        with mmap.mmap(fd, plan.nbytes) as m:
            return _fill_and_commit(tier, building, m, plan, captured, at)
    finally:
        os.close(fd)


def _allocate(fd: int, nbytes: int) -> None:
    """Size the values file and reserve its pages now: a full tmpfs then fails here with ENOSPC
    (a failed snapshot), not later with SIGBUS on the first store into a page of the mapping
    that the tmpfs cannot give (the worker killed)."""
    os.ftruncate(fd, nbytes)
    if nbytes:
        os.posix_fallocate(fd, 0, nbytes)


def _fill_and_commit(
    tier: Path,
    building: Path,
    m: mmap.mmap,
    plan: SnapshotPlan,
    captured: list[tuple[str, Any]],
    at: Position,
    before_commit: Callable[[], None] = lambda: None,
) -> mt.Snap:
    """Copy the capture into `m` (building's values.bin, mapped), digest it, commit."""
    view = memoryview(m)
    try:
        sealer = _Sealer(view, plan)
        strings = plan.fill(cast(shared_memory.SharedMemory, _Mapped(view)), captured, sealer.chunk)
        blob = mt.pack_strings(_strings_of(strings))
        digest = sealer.digest(blob)
        del sealer
    finally:
        view.release()
    mt.write_private(building / mt.STRINGS, blob)
    man = mt.MemManifest(
        at.lineage,
        at.generation,
        at.step,
        at.epoch,
        at.step_in_epoch,
        time.time(),
        digest_of_plan(plan),
        digest,
        plan.nbytes,
        len(blob),
        metrics=dict(at.metrics),
    )
    before_commit()  # test-only faults: a kill with the snapshot complete but not committed
    return mt.commit(tier, building, man)


class _Sealer:
    """The value digest and the finite check of a snapshot, done chunk by chunk as `fill` copies
    it, while each chunk is still in the CPU's cache: the copy, not three passes over memory,
    is then a snapshot's cost (the digest equals `memdigest.value_digest` over the file's bytes,
    padding included, which is what `memtier.verify` recomputes)."""

    def __init__(self, view: memoryview, plan: SnapshotPlan) -> None:
        self.view, self.plan = view, plan
        self.hasher = value_hasher()
        self.at = 0  # bytes of the file digested so far
        self.in_order = True

    def chunk(self, slot: Slot, start: int, copied: np.ndarray) -> None:
        # The trainable weights must be finite, as for a durable commit (the writer's
        # check_numerics): restart.on_nan restores the newest state, never the broken one.
        if slot.key in self.plan.finite_keys and not np.isfinite(copied).all():
            raise NonFiniteSnapshot(f"weight {self.plan.finite_keys[slot.key]} is NaN or infinite")
        offset = slot.offset + start
        if not self.in_order or offset < self.at:
            self.in_order = False  # digested again from the file at the end
            return
        # From the alignment padding before the chunk to its end: the chunk's bytes are still
        # in the cache, read through the mapping it was just copied into.
        self.hasher.update(self.view[self.at : offset + copied.nbytes])
        self.at = offset + copied.nbytes

    def digest(self, strings: bytes) -> str:
        if not self.in_order:
            return value_digest([self.view, strings])
        self.hasher.update(self.view[self.at :])
        self.hasher.update(strings)
        return sealed(self.hasher)


class TierWriter:
    """Writes a worker's snapshots, keeping `keep`, over the files of pruned ones: a fresh tmpfs
    file costs a page fault and a zeroed page per 4 KiB (0.1-0.3 GB/s measured), a reused file
    whose mapping this writer still holds is written at memory speed (3.4-7.3 GB/s). Mappings
    are keyed by inode and dropped as soon as their file leaves the tier, before any new file
    could get the same inode number."""

    def __init__(
        self,
        tier: Path,
        plan: SnapshotPlan,
        keep: int,
        fault: Callable[[int, bool], None] = lambda s, c: None,
    ) -> None:
        self.tier, self.plan, self.keep = tier, plan, keep
        self.fault = fault  # test-only (ckptd.worker.faults): (step, committed yet)
        self.maps: dict[int, mmap.mmap] = {}

    def write(self, captured: list[tuple[str, Any]], at: Position) -> mt.Snap:
        self._forget_gone()
        building = mt.begin(self.tier, at.step, at.generation)
        reused = mt.take_spare(self.tier, building, self.plan.nbytes)
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (0 if reused else os.O_CREAT | os.O_EXCL)
        fd = os.open(building / mt.VALUES, flags, 0o600)
        try:
            ino = os.fstat(fd).st_ino
            if ino not in self.maps:
                _allocate(fd, self.plan.nbytes)
                # MAP_POPULATE: the pages are mapped in one call, not faulted in one by one.
                self.maps[ino] = mmap.mmap(fd, self.plan.nbytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        finally:
            os.close(fd)
        snap = _fill_and_commit(
            self.tier, building, self.maps[ino], self.plan, captured, at, lambda: self.fault(at.step, False)
        )
        self.fault(at.step, True)
        mt.prune(self.tier, self.keep, spare=True)
        self._forget_gone()
        return snap

    def _forget_gone(self) -> None:
        present = set()
        for path in [self.tier / mt.SPARE] + [s.path / mt.VALUES for s in mt.snapshots(self.tier)[0]]:
            with contextlib.suppress(FileNotFoundError):
                present.add(os.lstat(path).st_ino)
        for ino in set(self.maps) - present:
            self.maps.pop(ino).close()

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        self.maps.clear()


def verifier(plan: SnapshotPlan) -> Callable[[mt.Snap], str | None]:
    """The `verify` of ckptd.state.mempolicy.choose for this worker: the same plan, and values
    that match their digest."""
    digest = digest_of_plan(plan)

    def verify(snap: mt.Snap) -> str | None:
        if snap.manifest.plan_digest != digest:
            return "taken with another object graph or value layout than this worker's model"
        return mt.verify(snap)

    return verify


def _variables(ckpt: tf.train.Checkpoint, plan: SnapshotPlan) -> dict[str, Any]:
    """The live variable under each of the plan's plain keys (the plan keeps only their keys)."""
    proto = trackable_object_graph_pb2.TrackableObjectGraph()
    proto.ParseFromString(plan.object_graph)
    out: dict[str, Any] = {}
    for obj, node in zip(tf.train.TrackableView(ckpt).descendants(), proto.nodes, strict=True):
        for attr in node.attributes:
            if attr.checkpoint_key in plan.plain_keys:
                out[attr.checkpoint_key] = obj
    return out


def restore(snap: mt.Snap, ckpt: tf.train.Checkpoint, plan: SnapshotPlan) -> None:
    """Put the snapshot's values into the live objects, exactly. Check it first with
    `verifier(plan)`: a damaged snapshot must be refused before any variable changes."""
    if snap.manifest.plan_digest != digest_of_plan(plan):
        raise SnapshotMismatch(f"{snap.path.name}: taken with another object graph or value layout")
    strings = mt.unpack_strings((snap.path / mt.STRINGS).read_bytes())
    variables = _variables(ckpt, plan)
    numeric: dict[str, Any] = {}  # values of objects that serialise themselves
    fd = os.open(snap.path / mt.VALUES, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        # MAP_POPULATE: the pages are mapped in one call, not faulted in one 4 KiB page at a time.
        with mmap.mmap(fd, plan.nbytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ) as m:
            for s in plan.slots:
                # A copy, one variable at a time: a tensor made from a view of the mapping may
                # alias it (TF's assign would adopt the tier's pages), and the mapping goes
                # when this returns.
                view = np.ndarray(s.shape, dtype=s.dtype, buffer=m, offset=s.offset)
                if s.key not in variables:
                    numeric[s.key] = view.copy()
                    continue
                tensor = _tensor_of(view)
                variables[s.key].assign(view.copy() if tensor is None else tensor)
                del tensor  # the variable holds it now (or a copy of it)
    finally:
        os.close(fd)
    for key, (shape, elems) in strings.items():
        if key in variables:  # a string variable (host state, generator states)
            variables[key].assign(_string_value(shape, elems))
    _restore_others(plan, numeric, strings)


def _tensor_of(view: np.ndarray) -> Any | None:
    """A new CPU tensor holding a copy of `view`, made without TF's numpy conversion (1 GB in a
    fresh worker: 0.7 s this way, 2.1 s through numpy and `assign`): an uninitialised tensor
    (`Empty`) filled by one memcpy. (Advised into huge pages it was slower, 2.0 s: the kernel
    compacts memory for them.) Only that new tensor is written, which nothing else can hold
    yet; a variable's own buffer never is, as TF lets variables share one with tensors and
    with each other (`tf.Variable(t)` adopts t's; small constants are cached) and copies it at
    the first update. None where the tensor's memory is not the numpy view's."""
    try:
        dtype = tf.as_dtype(view.dtype)
    except TypeError:
        return None
    with tf.device("/cpu:0"):
        tensor = tf.raw_ops.Empty(shape=view.shape, dtype=dtype, init=False)
    first, second = np.asarray(tensor), np.asarray(tensor)
    if first.ctypes.data != second.ctypes.data or not first.flags.c_contiguous or first.nbytes != view.nbytes:
        return None  # a copy on each read: not the tensor's memory
    if view.nbytes:
        # TF marks the view read-only; this one writes the memory `tensor` keeps alive.
        raw = (ctypes.c_char * first.nbytes).from_address(first.ctypes.data)
        np.copyto(np.frombuffer(memoryview(raw), dtype=first.dtype).reshape(first.shape), view)
    return tensor


def _string_value(shape: tuple[int, ...], elems: list[bytes]) -> Any:
    return elems[0] if shape == () else np.array(elems, dtype=object).reshape(shape)


def _restore_others(plan: SnapshotPlan, numeric: dict[str, Any], strings: mt.Strings) -> None:
    """Objects that serialise themselves get their values back as TF's restore gives them: a
    PythonState its string through `deserialize` (TF special-cases it), any other object its
    tensors through `_restore_from_tensors`."""
    for obj, attrs in plan.others:
        values: dict[str, Any] = {}
        for name, key in attrs:
            if key in numeric:
                values[name] = numeric[key]
            else:
                values[name] = _string_value(*strings[key])
        if isinstance(obj, tf.train.experimental.PythonState):
            obj.deserialize(next(iter(values.values())))
        else:
            obj._restore_from_tensors({name: tf.constant(v) for name, v in values.items()})

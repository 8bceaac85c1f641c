"""The training process's side of asynchronous checkpointing: snapshot, hand over, collect.

The step loop stalls only for `SnapshotPlan.take` (a copy into shared memory). The writer process
does the rest. At most one save is in flight; a save that falls due meanwhile waits for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import tensorflow as tf
from ckptd.state import ckptfiles as cf
from ckptd.worker.snapshot import SnapshotPlan, object_graph_of
from ckptd.worker.writer import Writer, start_writer

WRITER_START_TIMEOUT = 120.0


class AsyncSaver:
    def __init__(self, ckpt: tf.train.Checkpoint, directory: Path, max_to_keep: int,
                 keep_every_n_hours: float | None, writer: Writer | None = None) -> None:
        self.ckpt, self.dir = ckpt, directory
        self.retention = {"max_to_keep": max_to_keep, "keep_every_n_hours": keep_every_n_hours}
        # The writer is best started before the worker imports TensorFlow, so both imports
        # overlap (see ckptd.worker.__main__); otherwise start it now.
        self.proc, self.conn = writer or start_writer(directory)
        self.ready = False
        self.plan: SnapshotPlan | None = None
        self.shm: shared_memory.SharedMemory | None = None
        self.in_flight: dict[str, Any] | None = None
        self.next_number = 1

    def prepare(self, restored: cf.Manifest | None) -> None:
        """Learn the checkpoint's object graph (from the restored checkpoint, or from one
        throw-away synchronous write on a fresh start) and size the shared memory."""
        committed = cf.read_manifests(self.dir)[0]
        # The save counter is created lazily by save()/restore(); create it now so that the
        # object graph (and every async checkpoint) has it, like a synchronous save would.
        _ = self.ckpt.save_counter
        self.next_number = max((m.number for m in committed), default=0) + 1
        if restored is not None:
            graph = object_graph_of(str(self.dir / restored.prefix))
        else:
            probe = self.dir / ".graph-probe"
            shutil.rmtree(probe, ignore_errors=True)
            graph = object_graph_of(self.ckpt.write(str(probe / "probe")))
            shutil.rmtree(probe, ignore_errors=True)
        self.plan = SnapshotPlan(self.ckpt, graph)
        # One segment name per checkpoint directory: a worker killed with SIGKILL cannot unlink
        # its segment, so the next one (holding the directory lock) removes the stale one.
        name = "ckptd-" + hashlib.sha256(str(self.dir.resolve()).encode()).hexdigest()[:20]
        with contextlib.suppress(FileNotFoundError):
            stale = shared_memory.SharedMemory(name=name)
            stale.close()
            stale.unlink()
        self.shm = shared_memory.SharedMemory(name=name, create=True, size=self.plan.nbytes)

    def _check_ready(self, block: bool) -> bool:
        if not self.ready and self.conn.poll(WRITER_START_TIMEOUT if block else 0):
            self.conn.recv()
            self.ready = True
        return self.ready

    def take_number(self) -> int:
        number = self.next_number
        self.next_number += 1
        return number

    def is_ready(self) -> bool:
        return self._check_ready(block=False)

    def busy(self) -> bool:
        return self.in_flight is not None or not self._check_ready(block=False)

    def submit(self, step: int, epoch: int, step_in_epoch: int, metrics: dict[str, float],
               reason: str) -> None:
        assert self.plan is not None and self.shm is not None and self.in_flight is None
        self._check_ready(block=True)
        strings = self.plan.take(self.shm)
        number = self.take_number()
        self.in_flight = {"number": number, "step": step, "epoch": epoch, "reason": reason}
        self.conn.send({
            "number": number, "step": step, "epoch": epoch, "step_in_epoch": step_in_epoch,
            "metrics": metrics, "shm": self.shm.name, "strings": strings,
            "slots": [(s.key, s.dtype, s.shape, s.offset) for s in self.plan.slots],
            "object_graph": self.plan.object_graph, **self.retention,
        })

    def poll(self, block: bool) -> dict[str, Any] | None:
        """The writer's reply for the save in flight, if it has arrived (or wait for it)."""
        if self.in_flight is None:
            return None
        if not self.conn.poll(None if block else 0):
            return None
        try:
            reply: dict[str, Any] = self.conn.recv()
        except EOFError:
            reply = {"ok": False, "error": "the checkpoint writer process died", "seconds": 0.0}
        reply.update(self.in_flight)
        self.in_flight = None
        return reply

    def close(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self.conn.send({"op": "stop"})
        self.proc.join(timeout=30)
        if self.shm is not None:
            self.shm.close()
            with contextlib.suppress(FileNotFoundError):
                self.shm.unlink()

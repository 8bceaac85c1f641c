"""The training process's side of asynchronous checkpointing: snapshot, hand over, collect.

The step loop stalls only for `SnapshotPlan.capture` (one call that freezes every variable's value,
copy-on-write); the copy into shared memory runs in a thread for large models, and the writer process
does the rest. At most one save is in flight; a save that falls due meanwhile waits for it. While the
writer is still importing TensorFlow (seconds, at worker start) the snapshot waits in shared memory
and its message is sent once the writer says it is ready.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import select
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypedDict

import tensorflow as tf

from ckptd.state import ckptfiles as cf
from ckptd.state.pacing import budget_start_time, next_look, paced_start_time, writer_start_time
from ckptd.state.paths import async_segment_name
from ckptd.worker.checkpoint.costmeter import CostMeter
from ckptd.worker.checkpoint.snapshot import SnapshotPlan, object_graph_now, object_graph_of
from ckptd.worker.checkpoint.writer import ThreadWriter, Writer, WriterReply, start_writer

WRITER_START_TIMEOUT = 120.0
# From this size of state on, the writer is a thread of the training process (ThreadWriter): the
# process writer's shared-memory copy would hold one more full copy of the state for the whole
# attempt, on top of the copy-on-write copies a save in flight makes. Below it, the process keeps
# the save's Python work from competing with a fast step loop for the GIL. An environment variable
# sets it for tests.
THREAD_WRITER_BYTES = int(os.environ.get("CKPTD_THREAD_WRITER_BYTES", 64 * 2**20))
# Below this the copy takes well under a millisecond: a thread would cost more than it saves.
FILL_IN_THREAD_BYTES = 4 * 2**20


class Filler:
    """Copies a captured snapshot into shared memory: inline when small, else in a thread, so a
    large model's copy overlaps the next training steps instead of stalling them."""

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.strings: dict[str, Any] = {}
        self.error: Exception | None = None

    def start(
        self, plan: SnapshotPlan, shm: shared_memory.SharedMemory, captured: list[tuple[str, Any]]
    ) -> None:
        self.error = None
        if plan.nbytes < FILL_IN_THREAD_BYTES:
            self._run(plan, shm, captured)
            return
        self.thread = threading.Thread(
            target=self._run, args=(plan, shm, captured), name="ckptd-snapshot", daemon=True
        )
        self.thread.start()

    def _run(
        self, plan: SnapshotPlan, shm: shared_memory.SharedMemory, captured: list[tuple[str, Any]]
    ) -> None:
        try:
            self.strings = plan.fill(shm, captured)
        except Exception as e:  # reported by AsyncSaver.poll as a failed save
            self.error = e

    def done(self, block: bool) -> bool:
        if self.thread is not None:
            if block:
                self.thread.join()
            if self.thread.is_alive():
                return False
            self.thread = None
        return True


class InFlight(TypedDict):
    number: int
    step: int
    epoch: int
    reason: str


@dataclass
class PacingClocks:
    """When the next interval save may begin: with every_steps: auto, the later of the writer's
    wall-time share and the training-time budget, capped by every_seconds (ckptd.state.pacing);
    else at once (the job file's interval, exactly)."""

    writer_share: float
    budget: float
    longest: float | None
    paced: bool = False  # every_steps: auto (set when the restorer opens the directory)
    meter: CostMeter = field(default_factory=CostMeter)
    last_start: float | None = None  # the last save's capture
    last_done: float | None = None  # its reply
    last_seconds: float = 0.0  # the writer's time for it

    def start_time(self) -> float:
        if not self.paced:
            return -math.inf
        return paced_start_time(
            writer_start_time(self.last_done, self.last_seconds, self.writer_share),
            budget_start_time(self.last_start, self.meter.cost, self.budget),
            self.last_start,
            self.longest,
        )

    def shift(self, seconds: float) -> None:
        if self.last_start is not None:
            self.last_start += seconds
        if self.last_done is not None:
            self.last_done += seconds


@dataclass
class Layout:
    """The snapshot's layout: learnt once per attempt, sent to the writer with the first save."""

    plan: SnapshotPlan | None = None
    shm: shared_memory.SharedMemory | None = None  # the process writer's copy of the state
    graph_sent: bool = False


class WriterLink:
    """The pipe to the writer (a process, or a ThreadWriter of this process for large states) and
    what is known of its end: ready once it has imported TensorFlow, dead once it is gone."""

    def __init__(self, proc: Any, conn: Connection[Any, Any] | ThreadWriter) -> None:
        self.proc, self.conn = proc, conn
        self.thread: ThreadWriter | None = None  # replaces the process for large states
        self.ready = False
        self.dead = False
        # Connection.poll(0) builds a selector per call (~10 µs); the step loop asks often.
        self.poller = select.poll()
        self.poller.register(self.conn.fileno(), select.POLLIN)

    def readable(self, timeout: float | None) -> bool:
        if timeout == 0:
            return bool(self.poller.poll(0))
        return self.conn.poll(timeout)

    def use_thread(self, directory: Path) -> None:
        """Stop the writer process (it may still be importing TensorFlow) and write from a thread."""
        proc = self.proc
        if isinstance(proc, multiprocessing.process.BaseProcess):
            proc.kill()
            proc.join(timeout=30)
        self.poller.unregister(self.conn.fileno())
        self.conn.close()
        self.thread = ThreadWriter(directory)
        self.conn, self.ready, self.dead = self.thread, False, False
        self.poller.register(self.conn.fileno(), select.POLLIN)

    def hear_ready(self, block: bool) -> None:
        if not self.ready and not self.dead and self.readable(WRITER_START_TIMEOUT if block else 0):
            try:
                self.conn.recv()
                self.ready = True
            except (EOFError, OSError):
                self.dead = True  # died while starting: the loop falls back to synchronous saves

    def close(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self.conn.send({"op": "stop"})
        self.proc.join(timeout=30)
        if self.thread is not None:
            self.thread.join(timeout=30)
            self.thread.close()


def _claim_segment(name: str, nbytes: int) -> shared_memory.SharedMemory:
    """A new segment under `name`. A worker killed with SIGKILL cannot unlink its segment, so the
    next one (holding the directory lock) removes the stale one; at the job's end the supervisor
    does (ckptd.state.paths.remove_segment)."""
    with contextlib.suppress(FileNotFoundError):
        stale = shared_memory.SharedMemory(name=name)
        stale.close()
        stale.unlink()
    return shared_memory.SharedMemory(name=name, create=True, size=nbytes)


class AsyncSaver:
    def __init__(
        self,
        ckpt: tf.train.Checkpoint,
        directory: Path,
        max_to_keep: int,
        keep_every_n_hours: float | None,
        writer: Writer | None = None,
        writer_share: float = 1.0,
        budget: float = 1.0,
        longest: float | None = None,
        finite: Sequence[Any] = (),
    ) -> None:
        self.ckpt, self.dir = ckpt, directory
        self.retention = {"max_to_keep": max_to_keep, "keep_every_n_hours": keep_every_n_hours}
        self.who = (0, 1, 1)  # generation, world size, replicas (keeper.CommitPoint): set at open
        # The writer is best started before the worker imports TensorFlow, so both imports
        # overlap (see ckptd.worker.__main__); otherwise start it now.
        self.link = WriterLink(*(writer or start_writer(directory)))
        self.finite = finite  # the weights the writer checks before committing
        self.pacing = PacingClocks(writer_share, budget, longest)
        self.layout = Layout()
        self.in_flight: InFlight | None = None
        self.unsent: dict[str, Any] | None = None  # the in-flight message, until the writer is ready
        self.filler = Filler()
        self.next_number = 1

    @property
    def meter(self) -> CostMeter:
        return self.pacing.meter

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
            graph = object_graph_now(self.ckpt) or self._probe_graph()
        plan = self.layout.plan = SnapshotPlan(self.ckpt, graph, self.finite)
        if plan.nbytes >= THREAD_WRITER_BYTES:
            self.link.use_thread(self.dir)
            return
        try:
            self.layout.shm = _claim_segment(async_segment_name(self.dir), plan.nbytes)
        except PermissionError:
            # The name is another user's: it can be guessed from a checkpoint directory's path,
            # and another user's file in /dev/shm (sticky) can be neither opened nor removed.
            # The thread writer needs no segment, so the job runs on, as fast for its saves.
            self.link.use_thread(self.dir)

    def _probe_graph(self) -> bytes:
        """The object graph from one throw-away synchronous write (if TF's internals moved)."""
        probe = self.dir / ".graph-probe"
        shutil.rmtree(probe, ignore_errors=True)
        graph = object_graph_of(self.ckpt.write(str(probe / "probe")))
        shutil.rmtree(probe, ignore_errors=True)
        return graph

    def _check_ready(self, block: bool) -> bool:
        link = self.link
        link.hear_ready(block)
        if link.ready and self.unsent is not None and self.filler.done(block):
            # Sent only now: the snapshot is complete, and a large message would block on a
            # full pipe nobody reads yet.
            self.unsent["strings"] = self.filler.strings
            if self.filler.error is None:
                try:
                    link.conn.send(self.unsent)
                    self.unsent = None
                except OSError:  # BrokenPipeError: the writer died while idle
                    link.dead = True
        return link.ready

    def take_number(self) -> int:
        number = self.next_number
        self.next_number += 1
        return number

    def saving(self) -> bool:
        """A save is in flight (captured, not yet answered)."""
        return self.in_flight is not None

    def died(self) -> bool:
        """The writer process is gone (the save in flight failed with it)."""
        return self.link.dead

    def is_ready(self) -> bool:
        return self._check_ready(block=False)

    def wait_ready(self) -> bool:
        return self._check_ready(block=True)

    def busy(self) -> bool:
        self._check_ready(block=False)
        if self.in_flight is not None:
            return True
        return time.monotonic() < self.pacing.start_time()

    def shift_clocks(self, seconds: float) -> None:
        """Pacing as if the last `seconds` had not been (benchmarks that pause saving)."""
        self.pacing.shift(seconds)

    def next_look(self, now: float, pending: bool, poll: float) -> float:
        """When the step loop should look at the writer again (see ckptd.state.pacing)."""
        return next_look(now, self.in_flight is not None, pending, self.pacing.start_time(), poll)

    def submit(
        self, step: int, epoch: int, step_in_epoch: int, metrics: dict[str, float], reason: str
    ) -> None:
        """Capture now; copy and hand over in the background (see Filler), or hand the captured
        tensors themselves to the thread writer."""
        plan = self.layout.plan
        assert plan is not None and self.in_flight is None
        self.pacing.last_start = time.monotonic()
        captured = plan.capture()
        number = self.take_number()
        self.in_flight = {"number": number, "step": step, "epoch": epoch, "reason": reason}
        assert self.link.ready  # until then saves are synchronous (saver.Saver._save_async)
        msg: dict[str, Any] = {
            "number": number,
            "step": step,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "metrics": metrics,
            "who": self.who,
            **self.retention,
        }
        if not self.layout.graph_sent:
            # The layout never changes during an attempt: the writer keeps it after the first save.
            msg["slots"] = [(s.key, s.dtype, s.shape, s.offset) for s in plan.slots]
            msg["object_graph"] = plan.object_graph
            msg["finite"] = plan.finite_keys
            self.layout.graph_sent = True
        self.unsent = msg
        if self.link.thread is not None:
            msg["captured"] = captured
        else:
            assert self.layout.shm is not None
            msg["shm"] = self.layout.shm.name
            self.filler.start(plan, self.layout.shm, captured)
        self._check_ready(block=False)

    def poll(self, block: bool) -> WriterReply | None:
        """The writer's reply for the save in flight, if it has arrived (or wait for it)."""
        if self.in_flight is None:
            return None
        self._check_ready(block)
        reply = self._reply(block, {"ok": False, "seconds": 0.0, "number": self.in_flight["number"]})
        if reply is None:
            return None
        self.pacing.last_done, self.pacing.last_seconds = time.monotonic(), reply["seconds"]
        # Final and preemption saves are waited for at once: their cost is not an interval's.
        self.pacing.meter.save_done(counted=reply["ok"] and self.in_flight["reason"] == "interval")
        flight = self.in_flight
        reply["step"], reply["epoch"], reply["reason"] = (flight["step"], flight["epoch"], flight["reason"])
        self.in_flight = self.unsent = None
        self.filler.error = None
        return reply

    def _reply(self, block: bool, failed: WriterReply) -> WriterReply | None:
        link = self.link
        if self.filler.error is not None:
            return failed | {"error": f"snapshot failed: {self.filler.error}"}
        if self.unsent is not None and not (block or link.dead):
            return None
        if self.unsent is not None:
            return failed | {
                "error": "the checkpoint writer process died"
                if link.ready
                else "the checkpoint writer process did not start"
            }
        if not link.readable(None if block else 0):
            return None
        try:
            reply: WriterReply = link.conn.recv()
            return reply
        except (EOFError, OSError):
            link.dead = True
            return failed | {"error": "the checkpoint writer process died"}

    def close(self) -> None:
        self.filler.done(block=True)  # the thread reads the segment unlinked below
        self.link.close()
        shm = self.layout.shm
        if shm is not None:
            shm.close()
            with contextlib.suppress(FileNotFoundError):
                shm.unlink()

"""Several devices in one worker: the job's `tf.distribute` strategy and how a step's global
batch reaches its replicas.

`distribute: {strategy: mirrored}` makes one `tf.distribute.MirroredStrategy` per worker over the
job's GPUs (the supervisor's CUDA_VISIBLE_DEVICES), or over `replicas` logical CPU devices on a
box without GPUs. The data position stays a function of the global step alone: ckptd still
reads one global batch (train.batch_size) per step and splits it across the replicas as
`experimental_distribute_dataset` would (the first replicas take ceil(B/N) rows each), so a
resume with the same replica count replays the same per-replica batches.

Models are built inside the strategy's scope: ckptd enters it around a `model:` job's build()
function; an entrypoint script writes `with ckptd.strategy().scope():` (ckptd.worker.api).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from ckptd.state.durable import atomic_write_text
from ckptd.state.jobspec import JobSpec
from ckptd.state.protocol import MEMBER_ENV, SLURM_PORT_BASE_ENV
from ckptd.worker.errors import ConfigError
from ckptd.worker.faults import Faults
from ckptd.worker.runtime import ThreadPlan, members_here, thread_plan

_strategy: tf.distribute.Strategy | None = None


def member_index() -> int:
    """This worker's place in a multi_worker gang (0, the chief, for every other job)."""
    return int(os.environ.get(MEMBER_ENV, "0"))


def is_chief() -> bool:
    """The chief commits checkpoints and writes the job's outputs; the other members train in
    step with it and keep their own files in members/<index>/ (ckptd.state.paths)."""
    return member_index() == 0


def configure_threads(spec: JobSpec) -> ThreadPlan:
    """Before the first op: TensorFlow's pools sized to this worker's share of the CPUs
    (resources.threads). The gRPC variables are read when a gang member's server starts (the
    strategy's creation); one the operator set in the worker's environment wins."""
    plan = thread_plan(spec.resources.threads, len(os.sched_getaffinity(0)), members_here(spec))
    tf.config.threading.set_intra_op_parallelism_threads(plan.intra_op)
    tf.config.threading.set_inter_op_parallelism_threads(plan.inter_op)
    os.environ.setdefault("TF_GRPC_WORKER_CACHE_QUEUES", str(plan.grpc_queues))
    os.environ.setdefault("TF_GRPC_WORKER_CACHE_THREADS", str(plan.grpc_threads))
    return plan


def configure_devices(spec: JobSpec) -> None:
    """Before TensorFlow initialises its devices (the first op): its thread pools, the logical
    CPU devices a mirrored job without GPUs asks for, and the job's strategy."""
    global _strategy
    configure_threads(spec)
    if spec.distribute.is_gang:
        # The cluster comes from TF_CONFIG (set by the engine that placed the members). No
        # timeout unless the job sets one: TensorFlow gives each collective with a timeout a
        # thread that sleeps that long (base_collective_executor.cc), so a 600 s timeout held
        # ~10 threads per step for 10 minutes and members aborted (EAGAIN, issue 25).
        timeout = tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=spec.distribute.collective_timeout_seconds
        )
        _strategy = tf.distribute.MultiWorkerMirroredStrategy(
            cluster_resolver=_slurm_resolver(spec), communication_options=timeout
        )
        return
    if not spec.distribute.is_mirrored:
        _strategy = None
        return
    if spec.resources.gpus == 0:
        cpu = tf.config.list_physical_devices("CPU")[0]
        replicas = spec.distribute.replicas or 1
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
        devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    else:
        devices = [d.name for d in tf.config.list_logical_devices("GPU")]
    _strategy = tf.distribute.MirroredStrategy(devices)


class _CpuSlurmResolver(tf.distribute.cluster_resolver.SlurmClusterResolver):  # type: ignore[misc]
    """Members without GPUs. The resolver divides a node's GPUs among its tasks even when told
    to set none (a zero count divides by zero), and then reports them as accelerators, which
    would place each replica on a GPU that does not exist: count none."""

    def num_accelerators(
        self, task_type: Any = None, task_id: Any = None, config_proto: Any = None
    ) -> dict[str, int]:
        return {}


def _slurm_resolver(spec: JobSpec) -> Any:
    """Under srun (engine slurm): TensorFlow's SlurmClusterResolver builds the cluster from
    Slurm's variables (hosts, tasks per node, this task's rank); else None, and TF_CONFIG says."""
    base = os.environ.get(SLURM_PORT_BASE_ENV)
    if base is None or "SLURM_PROCID" not in os.environ:
        return None
    gpus = spec.resources.gpus
    if not gpus:
        return _CpuSlurmResolver(port_base=int(base), gpus_per_node=1024, gpus_per_task=1, auto_set_gpu=False)
    # CUDA_VISIBLE_DEVICES per task from the node's GPUs (what srun's --gpus-per-task gave).
    return tf.distribute.cluster_resolver.SlurmClusterResolver(port_base=int(base), gpus_per_task=gpus)


def job_strategy() -> tf.distribute.Strategy:
    """The job's strategy: the mirrored one, or TensorFlow's default (one device)."""
    return _strategy if _strategy is not None else tf.distribute.get_strategy()


def replicas(strategy: tf.distribute.Strategy | None = None) -> int:
    return int((strategy or job_strategy()).num_replicas_in_sync)


def multi_worker(strategy: tf.distribute.Strategy) -> bool:
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def reduce_logs(strategy: tf.distribute.Strategy, outputs: Any) -> Any:
    """A step's logs, averaged over every replica of the gang. Keras 3's own reduction fails on
    scalar logs under MultiWorkerMirroredStrategy (tensorflow#72388: "Invalid reduction
    dimension 0 for input with 0 dimensions"), so ckptd reduces them itself."""
    return keras.tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), outputs)


def gather(strategy: tf.distribute.Strategy, values: list[int]) -> list[list[int]]:
    """Every member's `values` (one row per replica), through one all-gather."""
    per = strategy.experimental_distribute_values_from_function(lambda _ctx: tf.constant([values], tf.int64))
    return [[int(x) for x in row] for row in strategy.gather(per, axis=0).numpy()]


def check_gang(strategy: tf.distribute.Strategy, ckdir: Path, attempt: int, step: int) -> None:
    """After a restore, before the first step: every member sees the chief's files (the run
    and checkpoint directories are on storage the gang shares) and holds the same commit (a
    member that restored another one would train on silently different weights)."""
    probe = ckdir / f".gang-probe-{attempt}"
    if is_chief():
        atomic_write_text(probe, f"{secrets.randbits(62)}\n")  # durable: fsynced, renamed
    gather(strategy, [0])  # a barrier: the probe exists before anyone looks
    if Faults.from_env().unshared_storage_for(attempt):  # test-only: as if on a local disk
        probe = probe.with_name(probe.name + ".on-another-disk")
    try:
        seen = int(probe.read_text())
    except (OSError, ValueError):
        seen = -1
    rows = gather(strategy, [seen, step])
    gather(strategy, [0])  # every member has looked: the chief removes the probe
    if is_chief():
        probe.unlink(missing_ok=True)
    if len({r[0] for r in rows}) > 1 or rows[0][0] < 0:
        raise ConfigError(
            f"checkpoint.dir {ckdir} is not shared by the gang: a member cannot read the chief's "
            "files there. With members on several machines, the run directory and "
            "checkpoint.dir must be on one shared file system (NFS, Lustre, ...) that honours "
            "fsync and rename; see docs/distribution.md, Several machines"
        )
    steps = sorted({r[1] for r in rows})
    if len(steps) > 1:
        raise RuntimeError(
            f"gang members restored different steps ({steps}; this member {step}): "
            "the gang restarts from the chief's newest valid commit"
        )


def check_strategy(model: Any, where: str) -> str | None:
    """Why `model` cannot train under the job's strategy (built outside its scope), if so."""
    if _strategy is None or model.distribute_strategy is _strategy:
        return None
    return (
        f"{where}: the model was built outside the job's distribution strategy; build it inside "
        "`with ckptd.strategy().scope():` (distribute.strategy is mirrored)"
    )


class ReplicaFeed:
    """Splits a global batch into one slice per replica; remembers the per-replica row counts
    each traced step saw (the start-up event reports them)."""

    def __init__(self, strategy: tf.distribute.Strategy) -> None:
        self.strategy = strategy
        self.n = replicas(strategy)
        self.traced_rows: list[int | None] = []

    def split(self, batch: Any) -> Any:
        n = self.n

        def part(ctx: tf.distribute.InputContext) -> Any:
            i = ctx.replica_id_in_sync_group

            def cut(t: Any) -> Any:
                rows = tf.shape(t)[0]
                per = (rows + n - 1) // n
                return t[tf.minimum(i * per, rows) : tf.minimum((i + 1) * per, rows)]

            return keras.tree.map_structure(cut, batch)

        return self.strategy.experimental_distribute_values_from_function(part)

    def seen(self, data: Any) -> None:
        """Called inside a replica's step while it is traced: the rows it was handed."""
        first = keras.tree.flatten(data)[0]
        self.traced_rows.append(first.shape[0])

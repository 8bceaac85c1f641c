"""The job file's `distribute` section: one worker over several devices (`mirrored`), or a gang
of workers (`multi_worker`, placed locally or by Slurm). A module of its own so that
ckptd.state.jobspec stays within the size limit; the strategy strings are compared here only
(Distribute's properties), as tests/test_vocabulary.py checks."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class Distribute(BaseModel):
    """Several devices in one job (tf.distribute). `mirrored`: one worker process, one replica
    per device, each step's global batch (train.batch_size) split across the replicas."""

    # The same strictness as every other section of the job file (ckptd.state.jobspec._Strict).
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    strategy: Literal["none", "mirrored", "multi_worker"] = "none"
    # Replicas: the job's GPUs (resources.gpus, the default); on a box without GPUs, this many
    # logical CPU devices (to try a configuration, and for ckptd's tests).
    replicas: int | None = Field(None, ge=1, le=64)
    # After a gpu_fault, relaunch on the healthy GPUs left if there are at least this many
    # (default: the full count, i.e. wait for enough healthy GPUs). Fewer replicas resume with
    # the same global batch and data order, but not bit-identically (reported at start).
    min_replicas: int | None = Field(None, ge=1, le=64)
    # multi_worker: a gang of `nodes` members, one worker process each (one replica per GPU of
    # resources.gpus, or one CPU device), trained in step by TensorFlow's collectives.
    nodes: int | None = Field(None, ge=2, le=1024)
    # Who places the members: `local` runs them all on this box (127.0.0.1), `slurm` on the
    # nodes of a Slurm allocation.
    engine: Literal["local", "slurm"] = "local"
    # A member stuck in a collective gives up after this long. Only a backstop: ckptd's own
    # heartbeats find a stuck member first. Keep it longer than the slowest save or validation.
    # Off by default: TensorFlow gives every collective with a timeout its own thread sleeping
    # that long, so a member holds (collectives per second x timeout) threads (issue 25).
    collective_timeout_seconds: float | None = Field(None, ge=10, le=86400)
    # engine slurm: extra `srun` arguments, e.g. ["--partition=gpu", "--nodes=4",
    # "--ntasks-per-node=1", "--gpus-per-task=2"] (ckptd adds --ntasks, --kill-on-bad-exit and
    # a job name).
    slurm_args: list[Annotated[str, Field(min_length=1, max_length=4096)]] = Field(
        default_factory=list, max_length=64
    )

    # The job's shape, asked in one place rather than by comparing strategy strings everywhere.
    @property
    def is_gang(self) -> bool:
        """Several member workers trained in step (multi_worker, engine local or slurm)."""
        return self.strategy == "multi_worker"

    @property
    def is_mirrored(self) -> bool:
        """One worker process with several replicas (MirroredStrategy)."""
        return self.strategy == "mirrored"

    @property
    def members(self) -> int:
        """Worker processes per attempt: a gang's nodes, else the one worker."""
        return (self.nodes or 2) if self.is_gang else 1

    @property
    def on_slurm(self) -> bool:
        return self.is_gang and self.engine == "slurm"


def check_distribute(d: Distribute, gpus: int) -> None:
    """The section beside resources.gpus (called by jobspec.JobSpec)."""
    if d.slurm_args and (d.strategy != "multi_worker" or d.engine != "slurm"):
        raise ValueError("distribute.slurm_args: only with strategy: multi_worker and engine: slurm")
    if d.strategy == "multi_worker":
        if d.nodes is None:
            raise ValueError("distribute.nodes: multi_worker needs the number of members (nodes: 2 or more)")
        if d.replicas is not None or d.min_replicas is not None:
            raise ValueError(
                "distribute.replicas: a multi_worker member uses its resources.gpus (or one CPU); "
                "leave replicas and min_replicas out"
            )
        return
    if d.nodes is not None:
        raise ValueError("distribute.nodes: only for distribute.strategy: multi_worker")
    if d.strategy == "none":
        if d.replicas not in (None, 1) or d.min_replicas is not None:
            raise ValueError("distribute.replicas: set distribute.strategy: mirrored to use several devices")
        return
    if gpus and d.replicas not in (None, gpus):
        raise ValueError(
            f"distribute.replicas: {d.replicas} replicas on resources.gpus: {gpus}: with GPUs, "
            "one replica per GPU (leave replicas out)"
        )
    replicas = d.replicas or gpus
    if replicas < 2:
        raise ValueError(
            "distribute.replicas: mirrored needs at least 2 devices: set resources.gpus, or "
            "replicas: N for N logical CPU devices"
        )
    if d.min_replicas is not None and d.min_replicas > replicas:
        raise ValueError(f"distribute.min_replicas: {d.min_replicas} is more than the {replicas} replicas")

"""Job states and attempt classes: string enums stored verbatim, one transition table.

The table is the only place that says which state changes are legal; the store checks it inside
its write transaction, so an illegal transition writes nothing.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    BACKOFF = "backoff"  # a worker failed; the next attempt starts after a delay
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # stopped politely (Ctrl-C, SIGTERM): resumable
    CANCELLED = "cancelled"


class AttemptClass(StrEnum):
    """How a worker attempt ended (see ckptd.supervisor.policy.classify_exit)."""

    SUCCEEDED = "succeeded"
    PREEMPTED = "preempted"
    CRASH = "crash"
    CONFIG_ERROR = "config_error"
    HOST_OOM = "host_oom"
    GPU_OOM = "gpu_oom"
    GPU_FAULT = "gpu_fault"
    HANG = "hang"
    KILLED = "killed"
    LOST = "lost"
    NAN_LOSS = "nan_loss"  # the loss or weights became non-finite (never committed)
    DISK_FULL = "disk_full"  # a save that had to succeed found no space: waits, then resumes
    PEER_LOST = "peer_lost"  # a gang member that died because another one did (never an attempt's)
    RESOURCE_LIMIT = "resource_limit"  # no thread could be created (RLIMIT_NPROC, TasksMax): retried


TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED}),
    JobState.RUNNING: frozenset(
        {
            JobState.BACKOFF,
            JobState.SUCCEEDED,
            JobState.FAILED,
            JobState.INTERRUPTED,
            JobState.CANCELLED,
        }
    ),
    JobState.BACKOFF: frozenset(
        {
            JobState.RUNNING,
            JobState.FAILED,
            JobState.INTERRUPTED,
            JobState.CANCELLED,
        }
    ),
    JobState.INTERRUPTED: frozenset({JobState.QUEUED, JobState.RUNNING, JobState.CANCELLED}),
    # A failed job may be resumed by an explicit `ckptd run --resume`, from its checkpoints.
    JobState.FAILED: frozenset({JobState.QUEUED, JobState.RUNNING, JobState.CANCELLED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.CANCELLED: frozenset(),
}

TERMINAL: frozenset[JobState] = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)
RESUMABLE: frozenset[JobState] = frozenset({JobState.INTERRUPTED, JobState.FAILED})
# What the store says of a job whose supervisor may be gone (found at a restart: lost or adopted).
STALE: frozenset[JobState] = frozenset({JobState.RUNNING, JobState.BACKOFF})


class IllegalTransition(Exception):
    def __init__(self, job_id: str, old: JobState, new: JobState) -> None:
        super().__init__(f"job {job_id}: illegal state transition {old} -> {new}")
        self.job_id, self.old, self.new = job_id, old, new


def is_legal(old: JobState, new: JobState) -> bool:
    return new in TRANSITIONS[old]

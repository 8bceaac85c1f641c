"""What a worker and its supervisor agree on: exit codes, the heartbeat file, the event stream.

Kept free of TensorFlow so both sides import it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

from ckptd.state.safeopen import read_under

# Exit codes (sysexits-style where one fits). Anything else, or death by a signal, is classified
# by ckptd.supervisor.policy from the evidence.
EXIT_OK = 0
EXIT_CRASH = 1
# A multi_worker gang member's index (0: the chief) and the gang's size; TF_CONFIG carries the
# cluster for TensorFlow itself.
MEMBER_ENV = "CKPTD_MEMBER"
# Under Slurm (engine slurm) the member index is SLURM_PROCID, and TensorFlow's
# SlurmClusterResolver builds the cluster from Slurm's variables, its ports from this base.
SLURM_PORT_BASE_ENV = "CKPTD_SLURM_PORT_BASE"
NAN_RESTARTS_ENV = "CKPTD_NAN_RESTARTS"  # attempts that ended non-finite so far (restart.on_nan)
EXIT_NONFINITE = 74  # the loss or the weights became NaN/inf: nothing non-finite was committed
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved a checkpoint on SIGTERM/SIGINT and stopped as asked
EXIT_NO_VALID_CHECKPOINT = 76  # committed checkpoints exist but none is restorable
EXIT_LOCKED = 77  # another worker holds the checkpoint directory
EXIT_CONFIG = 78  # EX_CONFIG: entrypoint missing, import error, bad params or data
# Exits a restart cannot help: the job as configured, a directory another worker holds, a
# history with no restorable commit. The one table of it: the worker's errors
# (ckptd.worker.errors) and the restart policy (ckptd.supervisor.policy.NEVER_RETRY) read it.
NOT_RETRIED = frozenset({EXIT_CONFIG, EXIT_LOCKED, EXIT_NO_VALID_CHECKPOINT})

# `ckptd validate --build` runs a worker with CHECK_ENV set: it sets the job up (imports, builds,
# primes), prints one CHECK_PREFIX line of JSON ({"inexact": [causes]}) and trains nothing.
CHECK_ENV = "CKPTD_CHECK_ONLY"
CHECK_PREFIX = "CKPTD_CHECK "

ERROR_FILE = "error.json"  # per attempt, torchelastic-style: type, message, traceback
EXIT_FILE = "exit_code"  # per attempt: lets a supervisor that adopted (not spawned) a worker learn its code
EVENTS_FILE = "events.jsonl"  # per job, appended by workers: epoch ends, commits, best files


class Phase(StrEnum):
    """Where a worker is; the supervisor's silence limits are per phase
    (ckptd.supervisor.policy.silence_limit, whose table test covers every member)."""

    STARTING = "starting"  # importing, building, priming
    RESTORING = "restoring"
    TRAINING = "training"
    VALIDATING = "validating"
    SAVING = "saving"
    DONE = "done"  # the final commit is durable: nothing of the job can be lost any more


class Event(StrEnum):
    """Every kind of event ckptd records: lines of the worker's events.jsonl (commits, restores,
    epochs, outputs) and of the supervisor's (its workers' lives), and the rows of the store's
    events table. Writers and readers use these members, never string literals (the values are
    in users' files and databases: never change one), so a kind cannot be misspelt on one side
    only; tests/test_vocabulary.py refuses a raw string. `ckptd logs` shows them all."""

    # worker: checkpoints and restores
    CHECKPOINT_COMMITTED = "checkpoint.committed"
    CHECKPOINT_RETIRED = "checkpoint.retired"
    CHECKPOINT_FAILED = "checkpoint.failed"
    CHECKPOINT_GC = "checkpoint.gc"
    CHECKPOINT_INVENTORY = "checkpoint.inventory"
    CHECKPOINT_QUARANTINED = "checkpoint.quarantined"
    CHECKPOINT_COALESCED = "checkpoint.coalesced"
    RESTORE_BEGIN = "restore.begin"
    RESTORE_DONE = "restore.done"
    RESTORE_FRESH = "restore.fresh"
    RESTORE_SKIPPED = "restore.skipped"
    # worker: the memory tier (docs/memory-tier.md)
    MEMORY_SNAPSHOTS = "memory.snapshots"  # taken since the last report (throttled)
    MEMORY_FAILED = "memory.failed"
    MEMORY_QUARANTINED = "memory.quarantined"
    MEMORY_IGNORED = "memory.ignored"  # snapshots a restore passed over, with why
    MEMORY_UNAVAILABLE = "memory.unavailable"  # the tier could not be opened: durable only
    # worker: training, epochs, outputs
    NAN_LEARNING_RATE_LOWERED = "nan.learning_rate_lowered"
    NAN_LEARNING_RATE_NOT_FOUND = "nan.learning_rate_not_found"
    EXACTNESS_WARNING = "exactness.warning"
    CALLBACK_MAPPED = "callback.mapped"
    TRAINING_DISTRIBUTED = "training.distributed"
    TRAINING_DONE = "training.done"
    TRAINING_FIRST_STEP = "training.first_step"
    TRAINING_STOPPED_BY_CALLBACK = "training.stopped_by_callback"
    BEST_MONITOR_MISSING = "best.monitor_missing"
    BEST_SAVED = "best.saved"
    BEST_SKIPPED_NONFINITE = "best.skipped_nonfinite"
    BEST_UNREADABLE = "best.unreadable"
    EARLY_STOPPING_MONITOR_MISSING = "early_stopping.monitor_missing"
    EARLY_STOPPING_STOPPED = "early_stopping.stopped"
    EPOCH_END = "epoch.end"
    OUTPUT_FAILED = "output.failed"
    WORKER_PREEMPTED = "worker.preempted"
    WORKER_SPARE_ASSIGNED = "worker.spare_assigned"
    # supervisor
    WORKER_SPAWNED = "worker.spawned"
    WORKER_WARM_ASSIGNED = "worker.warm_assigned"
    WORKER_FORKED = "worker.forked"  # by the job's fork server: no import (ckptd.supervisor.zygote)
    WORKER_ADOPTED = "worker.adopted"
    WORKER_EXITED = "worker.exited"
    HEARTBEAT_MISSED = "heartbeat.missed"  # the hang verdict: shown, then the stop escalates
    GANG_MEMBER_ENDED = "gang.member_ended"
    WORKER_RESTARTING = "worker.restarting"
    GPU_EXCLUDED = "gpu.excluded"
    # The job ended and its memory tier (docs/memory-tier.md) could not be removed: its RAM stays
    # used until a reboot or a manual removal; the job's end is unchanged.
    MEMORY_TIER_REMOVE_FAILED = "memory.tier_remove_failed"
    # The store's own rows (its events table; `ckptd status` and goodput read them)
    JOB_CREATED = "job.created"
    JOB_STATE = "job.state"  # a transition: from, to, reason
    ATTEMPT_STARTED = "attempt.started"
    ATTEMPT_ENDED = "attempt.ended"
    # The store: a run directory it did not know, put back by `ckptd recover --adopt`.
    JOB_ADOPTED = "job.adopted"
    STORE_ORPHANS = "store.orphan_runs"
    RETENTION_REMOVED = "retention.removed"  # a finished job's checkpoints or run directory went


def parse_phase(value: object) -> Phase:
    """The one place a heartbeat's phase is read. A phase this version does not know (from a
    newer or older worker across an upgrade, or a damaged file) reads as STARTING: the longest
    silence limit and never DONE, so a live worker is neither declared hung nor finished for
    speaking another version's words."""
    if isinstance(value, Phase):
        return value  # the worker's own beats: no lookup on the step loop's path
    try:
        return Phase(value)  # type: ignore[arg-type]  # a JSON value: anything; refused below
    except (ValueError, TypeError):
        return Phase.STARTING


class _PhaseField:
    """Heartbeat.phase: whatever is assigned (the worker's str, a file's JSON value) is parsed
    into a Phase on the way in, so every reader compares members, and the worker (which sets
    it from a str) still type-checks. A descriptor rather than __post_init__ because the worker
    assigns it on every phase change, not only at construction."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: object | None, owner: type | None = None) -> Phase:
        if obj is None:  # dataclasses ask the class for a default: there is none, a phase is required
            raise AttributeError(self.name)
        value: Phase = obj.__dict__[self.name]
        return value

    def __set__(self, obj: object, value: str) -> None:
        obj.__dict__[self.name] = parse_phase(value)


@dataclass(kw_only=True)
class Heartbeat:
    """Sent from the training step loop (never from a side thread): it proves progress."""

    pid: int
    attempt: int
    seq: int
    phase: _PhaseField = _PhaseField()  # reads as a Phase (parse_phase); required
    time: float
    step: int = 0
    epoch: int = 0
    epochs: int = 0
    steps_per_epoch: int | None = None
    loss: float | None = None
    logs: dict[str, float] = field(default_factory=dict)
    examples_per_sec: float | None = None
    rss_bytes: int | None = None
    committed_step: int | None = None
    restored_step: int | None = None
    host: str = ""  # where it runs (a gang's members may be on other machines)
    # The signal of a stop request a gang member received (0: none): the chief saves for the gang,
    # so the supervisor relays a member's preemption notice to it.
    stop_requested: int = 0
    # The worker's own bound on the gap to its next beat in this phase (10x its recent gaps, at
    # least EXPECT_FLOOR): what `ckptd status` calls normal. None: no basis yet (a phase's first).
    expect_seconds: float | None = None
    # RAM held by the job's memory tier (docs/memory-tier.md): the tmpfs bytes of its snapshots,
    # quarantine included, as the worker last measured them; 0 without a tier. `ckptd status`
    # shows it; the supervisor's accounting measures the tier itself.
    memory_tier_bytes: int = 0
    # The step of this attempt's newest memory snapshot (None: none yet): progress that no
    # durable commit shows yet, which the restart policy counts (supervisor/policy.py).
    memory_step: int | None = None

    def __post_init__(self) -> None:
        # Read tolerantly, as every field a newer or older worker may send or not: anything but
        # a non-negative int (a damaged file, another version's shape) reads as 0 (or None).
        v = self.memory_tier_bytes
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            self.memory_tier_bytes = 0
        s = self.memory_step
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            self.memory_step = None

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, separators=(",", ":")).encode()

    @classmethod
    def read(cls, path: Path, root: Path | None = None) -> Heartbeat | None:
        """`root`: a directory the reader does not own (see ckptd.state.safeopen)."""
        try:
            data = json.loads(read_under(root, path, limit=MAX_RECORD) if root else path.read_bytes())
            # A newer worker (an upgrade with jobs running) may send fields this reader does not
            # know: they are ignored, never a reason to read a live worker as silent.
            known = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in known})
        except (OSError, ValueError, TypeError, AttributeError):
            return None


# Events `ckptd logs` must still show after a power cut: the log never lags the last commit.
DURABLE_EVENTS = frozenset(
    {
        Event.CHECKPOINT_COMMITTED,
        Event.CHECKPOINT_RETIRED,
        Event.CHECKPOINT_QUARANTINED,
        Event.BEST_SAVED,
        Event.TRAINING_DONE,
    }
)


def append_event(path: Path, kind: Event, /, **data: Any) -> None:
    """Append one JSON line. O_APPEND with one write() keeps lines whole between processes.
    DURABLE_EVENTS are fdatasync-ed (and a new file's directory entry fsync-ed); the rest ride
    along with the next durable one."""
    line = json.dumps({"event": kind, "ts": time.time(), **data}, separators=(",", ":"), default=str) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, line.encode())
        if kind in DURABLE_EVENTS:
            os.fdatasync(fd)
            if os.fstat(fd).st_size == len(line.encode()):  # it was created just now
                dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
    finally:
        os.close(fd)


CONTAINED_ENV = "CKPTD_CONTAINED"  # "1": the supervisor is moving this worker into its attempt's cgroup
CGROUP_PREFIX = "ckptd-attempt-"


def wait_contained(timeout: float = 5.0) -> bool:
    """Before a worker runs anything of the job (which may fork): wait until the supervisor has
    moved it into its attempt's cgroup, so every child is born inside it (ckptd.supervisor.contain
    moves it right after the fork, which a fast child could outrun). False if it never came."""
    if os.environ.get(CONTAINED_ENV) != "1":
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            lines = Path("/proc/self/cgroup").read_text().splitlines()
        except OSError:
            return False
        if any(line.rsplit("/", 1)[-1].startswith(CGROUP_PREFIX) for line in lines):
            return True
        time.sleep(0.002)
    return False


# A job's files are its owner's to fill: the daemon reads bounded pieces of them.
MAX_RECORD = 1 << 20  # a heartbeat, an exit code, an error record
MAX_EVENTS_READ = 4 << 20  # events per poll; the rest waits for the next one


class EventTail:
    """Reads complete new lines from an events file, remembering the offset."""

    def __init__(self, path: Path, offset: int = 0, root: Path | None = None) -> None:
        self.path, self.offset, self.root = path, offset, root

    def read(self) -> list[dict[str, Any]]:
        try:
            if self.root is not None:
                chunk = read_under(self.root, self.path, self.offset, MAX_EVENTS_READ)
            else:
                with open(self.path, "rb") as f:
                    f.seek(self.offset)
                    chunk = f.read(MAX_EVENTS_READ)
        except OSError:  # absent yet, or a name its owner swapped for something else
            return []
        end = chunk.rfind(b"\n") + 1
        if end == 0 and len(chunk) == MAX_EVENTS_READ:  # one line longer than any event: skip it
            self.offset += len(chunk)
            return []
        self.offset += end
        out = []
        for line in chunk[:end].splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


def read_exit_code(attempt_dir: Path, root: Path | None = None) -> int | None:
    path = attempt_dir / EXIT_FILE
    try:
        return int((read_under(root, path, limit=MAX_RECORD) if root else path.read_bytes()).strip())
    except (OSError, ValueError):
        return None

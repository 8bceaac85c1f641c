"""Decisions, as pure functions: how did an attempt end, and what happens next.

The supervisor loop observes (exit status, error file, heartbeats, memory), calls these, and acts.
Nothing here touches the OS or the clock, so every rule is a row in a table-driven test.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from enum import StrEnum

from ckptd.state import protocol as p
from ckptd.state.jobspec import Restart
from ckptd.state.states import AttemptClass as C
from ckptd.supervisor.limits import THREAD_ABORT

CRASH_LOOP_REPEATS = 3
_GPU_FAULT = re.compile(
    r"CUDA_ERROR_(?!OUT_OF_MEMORY)\w+|illegal memory access|fallen off the bus|ECC|Xid|"
    r"CUBLAS_STATUS_EXECUTION_FAILED|cudaErrorLaunchFailure|GPU is lost|NVML_ERROR",
    re.I,
)


@dataclass(frozen=True)
class ExitObservation:
    exit_code: int | None  # None when killed by a signal
    signal: int | None
    error_type: str | None = None  # from the worker's error file
    error_message: str | None = None
    hang: str | None = None  # why the supervisor declared a hang, if it did
    oom_evidence: str | None = None  # memory limit reached, cgroup oom_kill, kernel log
    gpu_problems: str | None = None  # NVML's word on the attempt's devices after it ended
    finished: bool = False  # its heartbeat said Phase.DONE: the final commit is durable


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


_DISK_FULL = re.compile(
    r"No space left on device|errno 28\b|\[Errno 28\]|Disk quota exceeded|"
    r"errno 122\b|\[Errno 122\]"
)


def _classify_error(o: ExitObservation) -> tuple[C, str]:
    etype, msg = o.error_type or "", o.error_message or ""
    where = f"{etype.rsplit('.', 1)[-1]}: {msg}"[:500]
    if _DISK_FULL.search(msg):
        return C.DISK_FULL, where
    if etype.endswith("ResourceExhaustedError"):
        return C.GPU_OOM, where
    if _GPU_FAULT.search(msg) or _GPU_FAULT.search(etype):
        return C.GPU_FAULT, where
    if etype.endswith("MemoryError"):
        return C.HOST_OOM, where
    if etype:
        return C.CRASH, where
    return C.CRASH, f"exit code {o.exit_code} without an error file"


# A sick GPU explains these endings better than they explain themselves: the driver often takes
# the process down with a signal, a hang, or an error that does not name the device.
_GPU_MAY_EXPLAIN = {C.CRASH, C.KILLED, C.HANG, C.HOST_OOM, C.GPU_OOM, C.GPU_FAULT}


def classify_exit(o: ExitObservation) -> tuple[C, str]:
    """One class per attempt, with the evidence that chose it."""
    klass, evidence = _classify(o)
    if o.gpu_problems and klass in _GPU_MAY_EXPLAIN:
        return C.GPU_FAULT, f"{evidence}; {o.gpu_problems}"
    return klass, evidence


def silence_limit(phase: str, r: Restart) -> float:
    """How long a worker in `phase` may go without a heartbeat before it is declared hung.
    Saves, restores and start-up may outlast a step by far (a big model, a slow disk, a loaded
    box); after DONE nothing of the job is at stake, so only a generous exit stall is allowed."""
    limits: dict[str, float] = {
        p.Phase.TRAINING: r.heartbeat_timeout_seconds,
        p.Phase.VALIDATING: r.heartbeat_timeout_seconds,
        p.Phase.STARTING: r.startup_grace_seconds,
        p.Phase.RESTORING: r.startup_grace_seconds,
        p.Phase.SAVING: r.startup_grace_seconds,
        p.Phase.DONE: r.startup_grace_seconds,
    }
    if phase not in set(p.Phase):  # from a newer or older worker: the longest grace
        return r.startup_grace_seconds
    return limits[phase]  # a Phase missing from the table fails its test


SUSPECT_SHARE = 0.25  # of the hang verdict's limit, where the worker gave no expectation


def suspect(phase: str, silent: float, expect: float | None, r: Restart) -> bool:
    """Silent longer than is normal for its phase (the worker's own expectation, else a quarter
    of the verdict's limit): shown in `ckptd status` long before the hang verdict."""
    limit = silence_limit(phase, r)
    return silent > min(limit, expect if expect is not None else limit * SUSPECT_SHARE)


def _classify(o: ExitObservation) -> tuple[C, str]:
    if o.exit_code == p.EXIT_OK:  # a clean exit wins over any verdict reached while waiting
        return C.SUCCEEDED, "training finished"
    if o.finished and o.exit_code not in (p.EXIT_CONFIG, p.EXIT_PREEMPTED):
        why = o.hang or (f"killed by {_signal_name(o.signal)}" if o.signal else f"exit code {o.exit_code}")
        return C.SUCCEEDED, f"training finished and its final commit is durable; then: {why}"
    if o.hang:
        return C.HANG, o.hang
    if o.exit_code is None and o.signal is None:
        return C.LOST, "adopted worker ended without recording its exit status"
    if o.signal is not None:
        name = _signal_name(o.signal)
        if o.signal == signal.SIGKILL:
            if o.oom_evidence:
                return C.HOST_OOM, f"SIGKILL; {o.oom_evidence}"
            return C.KILLED, "SIGKILL without evidence of an out-of-memory kill"
        if o.signal in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            return C.KILLED, f"{name} before the worker could save"
        if o.error_type == THREAD_ABORT:  # its stderr: a thread could not be created
            return C.RESOURCE_LIMIT, f"died of {name}: {o.error_message}"
        return C.CRASH, f"died of {name}"
    if o.exit_code in EXIT_CLASSES:
        klass, default = EXIT_CLASSES[o.exit_code]
        # A preemption is a stop as asked: it writes no error file whose message could say more.
        return klass, (o.error_message if klass != C.PREEMPTED else None) or default
    return _classify_error(o)


# The worker's own exit codes (ckptd.worker.errors), with what is said when its error file says
# nothing. EXIT_OK is decided first, in _classify.
EXIT_CLASSES: dict[int, tuple[C, str]] = {
    p.EXIT_PREEMPTED: (C.PREEMPTED, "saved a checkpoint on request and stopped"),
    p.EXIT_CONFIG: (C.CONFIG_ERROR, "configuration error"),
    p.EXIT_LOCKED: (C.CONFIG_ERROR, "checkpoint directory in use"),
    p.EXIT_NO_VALID_CHECKPOINT: (C.CONFIG_ERROR, "no valid checkpoint"),
    p.EXIT_NONFINITE: (C.NAN_LOSS, "the loss or weights became non-finite"),
}


class Action(StrEnum):
    DONE = "done"
    RESTART = "restart"
    FAIL = "fail"


@dataclass(frozen=True)
class AttemptOutcome:
    klass: C
    restored_step: int | None  # the checkpoint step it started from (None: from scratch)
    committed_step: int | None  # the newest committed step when it ended
    last_step: int | None  # the last step its heartbeat reported
    memory_step: int | None = None  # its newest memory snapshot's step (docs/memory-tier.md)


@dataclass(frozen=True)
class Decision:
    action: Action
    delay: float = 0.0
    reason: str = ""
    counts_against_budget: bool = False


# The classes of the exits ckptd.state.protocol.NOT_RETRIED names (the worker reads that table
# too): one fact, not two lists to keep in step.
NEVER_RETRY = frozenset(EXIT_CLASSES[code][0] for code in p.NOT_RETRIED)
FREE_RESTART = frozenset({C.PREEMPTED, C.LOST, C.PEER_LOST})


def _made_progress(a: AttemptOutcome) -> bool:
    """It saved beyond what it restored: a durable commit, or a memory snapshot (the next
    attempt restores it unless the machine goes down)."""
    saved = max((s for s in (a.committed_step, a.memory_step) if s is not None), default=None)
    if saved is None:
        return False
    return a.restored_step is None or saved > a.restored_step


def failures_without_progress(history: list[AttemptOutcome]) -> int:
    """Trailing failed attempts since the last one that committed beyond what it restored."""
    n = 0
    for a in reversed(history):
        if _made_progress(a):
            break
        if a.klass not in FREE_RESTART and a.klass != C.DISK_FULL:
            n += 1
    return n


def _trailing(history: list[AttemptOutcome], klass: C) -> list[AttemptOutcome]:
    out = []
    for a in reversed(history):
        if a.klass != klass:
            break
        out.append(a)
    return out


def nan_restarts(history: list[AttemptOutcome]) -> int:
    """How many attempts so far ended non-finite: the next one scales its learning rate by
    restart.nan_lr_factor to this power."""
    return sum(1 for a in history if a.klass == C.NAN_LOSS)


def backoff(failures: int, policy: Restart, jitter: float) -> float:
    """Exponential backoff with 'equal jitter' (half fixed, half random), within the bounds."""
    base = min(policy.backoff_max_seconds, policy.backoff_initial_seconds * 2 ** max(0, failures - 1))
    delay = base / 2 + base / 2 * min(max(jitter, 0.0), 1.0)
    return float(max(policy.backoff_initial_seconds, min(policy.backoff_max_seconds, delay)))


# Endings that say nothing about the job's own code: they spend the restart budget, never make
# a crash loop (a loaded box killing slow starters three times is not a deterministic failure).
NOT_DETERMINISTIC = frozenset({C.KILLED, C.LOST, C.PREEMPTED, C.DISK_FULL, C.RESOURCE_LIMIT})


def _crash_loop(history: list[AttemptOutcome]) -> bool:
    """The same failure at the same known step, several times: retrying cannot help."""
    tail = history[-CRASH_LOOP_REPEATS:]
    if len(tail) < CRASH_LOOP_REPEATS or any(_made_progress(a) for a in tail):
        return False
    first = tail[0]
    if first.last_step is None or first.klass in NOT_DETERMINISTIC:
        return False
    return all(a.klass == first.klass and a.last_step == first.last_step for a in tail)


def decide_restart(history: list[AttemptOutcome], policy: Restart, jitter: float) -> Decision:
    """What to do after the last attempt in `history` ended. `jitter` is uniform in [0, 1)."""
    last = history[-1]
    if last.klass == C.SUCCEEDED:
        return Decision(Action.DONE, reason="training finished")
    if last.klass in NEVER_RETRY:
        return Decision(Action.FAIL, reason=f"{last.klass}: not retried")
    if last.klass == C.NAN_LOSS and policy.on_nan == "fail":
        return Decision(
            Action.FAIL,
            reason=f"nan_loss at step {last.last_step}: nothing "
            "non-finite was committed; restart.on_nan: restart retries from the "
            "last finite commit with a lower learning rate",
        )
    if last.klass in FREE_RESTART:
        return Decision(Action.RESTART, 0.0, f"{last.klass}: resuming without spending budget")
    if last.klass == C.DISK_FULL:  # space comes back; the budget is for failures of the job
        waits = len(_trailing(history, C.DISK_FULL))
        return Decision(
            Action.RESTART,
            backoff(waits, policy, jitter),
            f"disk_full: waiting for space, then resuming from the last commit "
            f"(wait {waits}); it does not spend the restart budget",
        )
    if _crash_loop(history):
        return Decision(
            Action.FAIL,
            reason=f"crash loop: {last.klass} at step {last.last_step} {CRASH_LOOP_REPEATS} times in a row",
        )
    failures = failures_without_progress(history)
    if failures > policy.max_restarts:
        return Decision(
            Action.FAIL, reason=f"{failures} failures without progress; max_restarts={policy.max_restarts}"
        )
    return Decision(
        Action.RESTART,
        backoff(failures, policy, jitter),
        f"{last.klass}: restart {failures}/{policy.max_restarts}",
        True,
    )

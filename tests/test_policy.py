"""Pure decisions: exit classification and restart policy, table-driven."""

from __future__ import annotations

import signal

import pytest

from ckptd.state import protocol as p
from ckptd.state.jobspec import Restart
from ckptd.state.states import AttemptClass as C
from ckptd.supervisor.policy import (
    Action,
    AttemptOutcome,
    ExitObservation,
    backoff,
    classify_exit,
    decide_restart,
    failures_without_progress,
    silence_limit,
)

CLASSIFY = [
    (ExitObservation(0, None), C.SUCCEEDED),
    (
        ExitObservation(None, 6, "ThreadCreationFailed", "std::system_error ... Resource temporarily"),
        C.RESOURCE_LIMIT,
    ),
    (ExitObservation(None, 6), C.CRASH),  # an abort with no such evidence stays a crash
    (ExitObservation(p.EXIT_PREEMPTED, None), C.PREEMPTED),
    (ExitObservation(p.EXIT_CONFIG, None, "ConfigError", "model: no build"), C.CONFIG_ERROR),
    (ExitObservation(p.EXIT_LOCKED, None), C.CONFIG_ERROR),
    (ExitObservation(p.EXIT_NO_VALID_CHECKPOINT, None), C.CONFIG_ERROR),
    (ExitObservation(1, None, "builtins.ValueError", "boom"), C.CRASH),
    (ExitObservation(1, None), C.CRASH),
    (ExitObservation(3, None), C.CRASH),
    (
        ExitObservation(
            1,
            None,
            "tensorflow.python.framework.errors_impl.ResourceExhaustedError",
            "OOM when allocating tensor",
        ),
        C.GPU_OOM,
    ),
    (
        ExitObservation(
            1,
            None,
            "tensorflow.python.framework.errors_impl.InternalError",
            "CUDA_ERROR_ECC_UNCORRECTABLE: uncorrectable ECC error",
        ),
        C.GPU_FAULT,
    ),
    (ExitObservation(1, None, "InternalError", "an illegal memory access was encountered"), C.GPU_FAULT),
    (ExitObservation(1, None, "builtins.MemoryError", ""), C.HOST_OOM),
    (ExitObservation(None, signal.SIGKILL), C.KILLED),
    (ExitObservation(None, signal.SIGKILL, oom_evidence="RSS over limit"), C.HOST_OOM),
    (ExitObservation(None, signal.SIGSEGV), C.CRASH),
    (ExitObservation(None, signal.SIGABRT), C.CRASH),
    (ExitObservation(None, signal.SIGTERM), C.KILLED),
    (ExitObservation(None, signal.SIGKILL, hang="no heartbeat for 121s"), C.HANG),
    (ExitObservation(p.EXIT_PREEMPTED, None, hang="no heartbeat"), C.HANG),
    # A clean exit wins over a hang verdict reached while it was slow to exit (a loaded box).
    (ExitObservation(0, None, hang="no heartbeat for 130s in phase training"), C.SUCCEEDED),
    # Stopped after its final commit (Phase.DONE): the job trained; it never ends failed.
    (ExitObservation(None, signal.SIGKILL, hang="no heartbeat in phase done", finished=True), C.SUCCEEDED),
    (ExitObservation(None, signal.SIGTERM, finished=True), C.SUCCEEDED),
    (ExitObservation(1, None, "builtins.RuntimeError", "in atexit", finished=True), C.SUCCEEDED),
    (ExitObservation(p.EXIT_PREEMPTED, None, finished=True), C.PREEMPTED),
    (ExitObservation(p.EXIT_NONFINITE, None, "NonFinite", "loss is nan at step 15"), C.NAN_LOSS),
    (
        ExitObservation(
            1,
            None,
            "ckptd.worker.checkpoint.keeper.SaveFailed",
            "ResourceExhaustedError: ...; No space left on device (errno 28)",
        ),
        C.DISK_FULL,
    ),
    (ExitObservation(1, None, "builtins.OSError", "[Errno 28] No space left on device"), C.DISK_FULL),
    (ExitObservation(p.EXIT_CONFIG, None, "ConfigError", "x", finished=True), C.CONFIG_ERROR),
    # NVML reports a sick device after the attempt: it explains failures, not clean endings.
    (ExitObservation(None, signal.SIGKILL, gpu_problems="NVML: GPU 1: GPU is lost"), C.GPU_FAULT),
    (ExitObservation(None, signal.SIGKILL, hang="no heartbeat", gpu_problems="NVML: x"), C.GPU_FAULT),
    (ExitObservation(1, None, "builtins.ValueError", "boom", gpu_problems="NVML: x"), C.GPU_FAULT),
    (ExitObservation(0, None, gpu_problems="NVML: x"), C.SUCCEEDED),
    (ExitObservation(p.EXIT_PREEMPTED, None, gpu_problems="NVML: x"), C.PREEMPTED),
    (ExitObservation(p.EXIT_CONFIG, None, "ConfigError", "model", gpu_problems="NVML: x"), C.CONFIG_ERROR),
]


@pytest.mark.parametrize(("obs", "expected"), CLASSIFY)
def test_classify_exit(obs: ExitObservation, expected: C) -> None:
    klass, evidence = classify_exit(obs)
    assert klass == expected
    assert evidence


POLICY = Restart(max_restarts=2, backoff_initial_seconds=1, backoff_max_seconds=8)


def A(
    klass: C,
    restored: int | None = None,
    committed: int | None = None,
    last: int | None = None,
    memory: int | None = None,
) -> AttemptOutcome:
    return AttemptOutcome(klass, restored, committed, last, memory)


DECIDE = [
    ([A(C.SUCCEEDED)], Action.DONE),
    ([A(C.CONFIG_ERROR)], Action.FAIL),
    ([A(C.CRASH, last=5)], Action.RESTART),
    ([A(C.CRASH, last=5), A(C.CRASH, last=6)], Action.RESTART),
    ([A(C.CRASH, last=5), A(C.CRASH, last=6), A(C.CRASH, last=7)], Action.FAIL),  # budget 2
    # progress (committed beyond restored) resets the budget
    ([A(C.CRASH, last=5), A(C.CRASH, last=6), A(C.KILLED, 0, 100, 150)], Action.RESTART),
    ([A(C.KILLED, None, 20, 30)] * 5, Action.RESTART),
    # a memory snapshot beyond the restored step is progress too (the next attempt restores it),
    ([A(C.CRASH, last=5), A(C.CRASH, last=6), A(C.KILLED, 100, 100, 150, memory=145)], Action.RESTART),
    ([A(C.KILLED, 100, 100, 150, memory=145)] * 5, Action.RESTART),
    # one at or before it is not
    ([A(C.CRASH, 100, 100, 104, memory=100)] * 3, Action.FAIL),
    # preempted and lost never spend budget
    ([A(C.CRASH, last=1), A(C.CRASH, last=2), A(C.PREEMPTED), A(C.LOST)], Action.RESTART),
    # same class at the same step three times: crash loop, even inside a bigger budget
    ([A(C.CRASH, 100, 100, 120)] * 3, Action.FAIL),
    ([A(C.GPU_FAULT, last=9)], Action.RESTART),
    ([A(C.HANG, last=9)], Action.RESTART),
    ([A(C.HOST_OOM, last=9)], Action.RESTART),
    # no thread could be created (a busy box's limits): retried, not deterministic
    ([A(C.RESOURCE_LIMIT, 100, 100, 120)] * 2, Action.RESTART),
    # Kills before the first step (a slow start on a loaded box) are no crash loop: the budget
    # decides (3 failures > max_restarts 2 here, so FAIL by budget; see the reason test below).
    ([A(C.KILLED)] * 2, Action.RESTART),
    ([A(C.CRASH)] * 2, Action.RESTART),
]


@pytest.mark.parametrize(
    "history", [[A(C.KILLED)] * 3, [A(C.CRASH)] * 3, [A(C.LOST)] * 3, [A(C.KILLED, last=7)] * 3]
)
def test_no_crash_loop_without_a_known_deterministic_step(history: list[AttemptOutcome]) -> None:
    d = decide_restart(history, Restart(max_restarts=10), 0.0)
    assert d.action == Action.RESTART and not d.reason.startswith("crash loop"), d


@pytest.mark.parametrize("phase", list(p.Phase))
def test_every_phase_has_a_silence_limit(phase: p.Phase) -> None:
    r = Restart(heartbeat_timeout_seconds=30, startup_grace_seconds=300)
    expected = 30 if phase in (p.Phase.TRAINING, p.Phase.VALIDATING) else 300
    assert silence_limit(phase, r) == expected
    assert silence_limit("unknown-phase", r) == 300  # an unknown phase gets the longest grace


@pytest.mark.parametrize(("history", "action"), DECIDE)
def test_decide_restart(history: list[AttemptOutcome], action: Action) -> None:
    big = Restart(
        max_restarts=2 if len(history) < 9 else 50, backoff_initial_seconds=1, backoff_max_seconds=8
    )
    assert decide_restart(history, big, jitter=0.5).action == action


def test_crash_loop_needs_same_step() -> None:
    history = [A(C.CRASH, 100, 100, 120), A(C.CRASH, 100, 100, 121), A(C.CRASH, 100, 100, 120)]
    wide = Restart(max_restarts=10)
    assert decide_restart(history, wide, 0.0).action == Action.RESTART
    assert decide_restart([A(C.CRASH, 100, 100, 120)] * 3, wide, 0.0).reason.startswith("crash loop")


def test_failures_without_progress() -> None:
    assert failures_without_progress([A(C.CRASH), A(C.KILLED, 0, 10), A(C.CRASH), A(C.HANG)]) == 2
    assert failures_without_progress([A(C.CRASH), A(C.LOST), A(C.PREEMPTED)]) == 1


@pytest.mark.parametrize(
    ("failures", "jitter", "expected"),
    [
        (1, 0.0, 1.0),
        (1, 1.0, 1.0),
        (2, 0.0, 1.0),
        (2, 1.0, 2.0),
        (3, 0.5, 3.0),
        (4, 1.0, 8.0),
        (10, 1.0, 8.0),
        (10, 0.0, 4.0),
    ],
)
def test_backoff_bounds(failures: int, jitter: float, expected: float) -> None:
    assert backoff(failures, POLICY, jitter) == pytest.approx(expected)


def test_nan_loss_follows_restart_on_nan() -> None:
    nan = [A(C.NAN_LOSS, 10, 10, 15)]
    assert decide_restart(nan, Restart(), 0.0).action == Action.FAIL  # on_nan: fail (default)
    again = decide_restart(nan, Restart(on_nan="restart"), 0.0)
    assert again.action == Action.RESTART and again.counts_against_budget


def test_disk_full_waits_without_spending_the_budget() -> None:
    full = [A(C.DISK_FULL, 20, 20, 52)] * 12  # far beyond max_restarts, same step each time
    d = decide_restart(full, Restart(max_restarts=2, backoff_max_seconds=60), 0.0)
    assert d.action == Action.RESTART and not d.counts_against_budget and "disk_full" in d.reason
    assert d.delay == 30.0  # backed off to the cap's lower half (equal jitter, jitter 0)
    assert failures_without_progress([*full, A(C.CRASH, 20, 20, 60)]) == 1

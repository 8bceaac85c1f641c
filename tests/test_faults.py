"""The test-only fault switches themselves: when a step kill fires."""

from __future__ import annotations

import pytest

from ckptd.worker.faults import Faults


@pytest.mark.parametrize(
    ("commit_first", "step", "committed", "fires"),
    [
        (0, 36, None, False),
        (0, 37, None, True),  # at its step, commit or not
        (0, 38, 30, False),  # once only
        (1, 37, None, False),  # waits for a durable commit ...
        (1, 45, None, False),
        (1, 46, 15, True),  # ... and fires at the first step that sees one
        (1, 36, 30, False),  # never before its step
    ],
)
def test_a_step_kill_fires_at_its_step_or_once_a_commit_exists(
    commit_first: int, step: int, committed: int | None, fires: bool
) -> None:
    faults = Faults(sigkill_at_step=37, commit_first=commit_first)
    assert faults._kill_now(step, lambda: committed) is fires


def test_commit_first_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPTD_FAULTS", "sigkill_at_step=37,commit_first=1,attempt=1")
    assert Faults.from_env() == Faults(sigkill_at_step=37, commit_first=1, attempt=1)


@pytest.mark.parametrize(
    ("faults", "step", "attempt", "waits"),
    [
        (Faults(kill_in_memory=10), 12, 1, False),  # no guard asked
        (Faults(kill_in_memory=10, memory_first=1), 9, 1, False),  # not before step N
        (Faults(kill_in_memory=10, memory_first=1), 10, 1, True),
        (Faults(kill_after_memory=10, memory_first=1), 50, 1, True),  # every step from N on
        (Faults(kill_after_memory=10, memory_first=1, attempt=1), 50, 2, False),  # disarmed
        (Faults(sigkill_at_step=10, memory_first=1), 50, 1, False),  # no memory kill to wait for
    ],
)
def test_the_step_loop_waits_for_the_tier_from_a_memory_kill_step_on(
    faults: Faults, step: int, attempt: int, waits: bool
) -> None:
    assert faults.waits_for_memory(step, attempt) is waits


def test_memory_first_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPTD_FAULTS", "kill_in_memory=7,memory_first=1,attempt=1")
    assert Faults.from_env() == Faults(kill_in_memory=7, memory_first=1, attempt=1)


@pytest.mark.parametrize(
    ("spec", "attempt", "member", "fires"),
    [
        ("2", 2, "0", True),
        ("2", 3, "0", False),
        ("2-3", 3, "1", True),  # any member without `:M`
        ("2-3", 4, "0", False),
        ("2-3:1", 2, "1", True),
        ("2-3:1", 2, "0", False),  # only member 1: the chief restores
        ("2-3:1", 4, "1", False),
    ],
)
def test_a_restore_kill_fires_in_its_attempts_and_member(
    monkeypatch: pytest.MonkeyPatch, spec: str, attempt: int, member: str, fires: bool
) -> None:
    killed: list[int] = []
    monkeypatch.setenv("CKPTD_MEMBER", member)
    monkeypatch.setattr("ckptd.worker.faults.os.kill", lambda pid, sig: killed.append(sig))
    Faults(sigkill_in_restore=spec).in_restore(attempt)
    assert bool(killed) is fires

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

"""ckptd.daemon.schedule: the daemon's queue decisions (which job starts, slots, warm
workers, who may act), table-driven."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptd.daemon.schedule import Queued, may_act, pick_jobs, slot_count, warm_wanted

ROOT = Path(__file__).resolve().parent.parent


# -- pure decisions ------------------------------------------------------------------------------

PICK = [
    # queue (id, gpus), running, slots, free gpus -> started
    ([("a", 0), ("b", 0)], 0, 1, [], [("a", [])]),
    ([("a", 0), ("b", 0)], 0, 2, [], [("a", []), ("b", [])]),
    ([("a", 0)], 1, 1, [], []),
    ([("a", 1), ("b", 1)], 0, 2, [0, 1], [("a", [0]), ("b", [1])]),
    ([("a", 2), ("b", 1)], 0, 2, [1], []),  # the head waits for 2 GPUs; b does not jump it
    ([("a", 2)], 0, 2, [0, 3], [("a", [0, 3])]),
    ([], 0, 4, [0], []),
]


@pytest.mark.parametrize(("queue", "running", "slots", "free", "started"), PICK)
def test_pick_jobs(
    queue: list[tuple[str, int]],
    running: int,
    slots: int,
    free: list[int],
    started: list[tuple[str, list[int]]],
) -> None:
    assert pick_jobs([Queued(j, g) for j, g in queue], running, slots, free) == started


@pytest.mark.parametrize(
    ("configured", "gpus", "slots"), [(None, [], 1), (None, [0, 1, 2], 3), (4, [], 4), (1, [0, 1], 1)]
)
def test_slot_count(configured: int | None, gpus: list[int], slots: int) -> None:
    assert slot_count(configured, gpus) == slots


@pytest.mark.parametrize(
    ("enabled", "slots", "running", "likely", "warm"),
    [
        (True, 1, 0, ["a"], ["a"]),
        (True, 1, 1, ["a"], []),
        (True, 4, 1, ["a", "b"], ["a", "b", "a"]),  # free slots go round the likely owners
        (True, 2, 3, ["a"], []),
        (False, 4, 0, ["a"], []),
        (True, 4, 0, [], []),  # nobody likely: no warm worker, never one as the daemon's user
    ],
)
def test_warm_wanted(enabled: bool, slots: int, running: int, likely: list[str], warm: list[str]) -> None:
    assert warm_wanted(enabled, slots, running, likely) == warm


@pytest.mark.parametrize(
    ("peer", "owner", "admin", "ok"),
    [(1000, 1000, False, True), (1001, 1000, False, False), (1001, 1000, True, True), (0, 1000, False, True)],
)
def test_may_act(peer: int, owner: int, admin: bool, ok: bool) -> None:
    assert may_act(peer, owner, admin) is ok

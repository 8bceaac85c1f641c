"""GPU choice and exclusion after a gpu_fault: pure functions, table-driven."""

from __future__ import annotations

import pytest

from ckptd.supervisor.gpus import choose_devices, detect_gpus, exclude_after_fault


@pytest.mark.parametrize(
    ("available", "excluded", "wanted", "fewest", "expected"),
    [
        ([0, 1, 2, 3], set(), 1, None, [0]),
        ([0, 1, 2, 3], {0}, 1, None, [1]),
        ([0, 1, 2, 3], {0, 2}, 2, None, [1, 3]),
        ([0, 1], {0, 1}, 1, None, None),
        ([], set(), 1, None, None),
        ([0, 1], set(), 0, None, []),
        # a mirrored job with min_replicas: as many healthy GPUs as there are, down to fewest
        ([0, 1, 2, 3], {2}, 4, 2, [0, 1, 3]),
        ([0, 1, 2, 3], {1, 2}, 4, 2, [0, 3]),
        ([0, 1, 2, 3], {0, 1, 2}, 4, 2, None),
        ([0, 1, 2, 3], set(), 4, 2, [0, 1, 2, 3]),  # all healthy: all of them
        ([0, 1, 2, 3], {3}, 4, 4, None),  # the default: wait for all four
    ],
)
def test_choose_devices(
    available: list[int], excluded: set[int], wanted: int, fewest: int | None, expected: list[int] | None
) -> None:
    assert choose_devices(available, excluded, wanted, fewest) == expected


@pytest.mark.parametrize(
    ("available", "excluded", "used", "wanted", "fewest", "expected"),
    [
        ([0, 1], set(), [0], 1, None, {0}),  # another device exists: exclude the faulty one
        ([0], set(), [0], 1, None, set()),  # the only device: keep retrying on it
        ([0, 1, 2], {1}, [0], 1, None, {0, 1}),
        ([0, 1, 2], set(), [0, 1], 2, None, set()),  # two wanted, only one would be left
        ([0, 1, 2, 3], set(), [2], 4, 3, {2}),  # mirrored, min_replicas 3: go on with three
        ([0, 1, 2, 3], {2}, [0, 1], 4, 3, {2}),  # two more sick would leave one: keep them
    ],
)
def test_exclude_after_fault(
    available: list[int],
    excluded: set[int],
    used: list[int],
    wanted: int,
    fewest: int | None,
    expected: set[int],
) -> None:
    assert exclude_after_fault(available, excluded, used, wanted, fewest) == expected


def test_detect_gpus_without_nvidia_smi(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert detect_gpus() == []

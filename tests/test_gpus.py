"""GPU choice and exclusion after a gpu_fault: pure functions, table-driven."""

from __future__ import annotations

import pytest

from ckptd.supervisor.gpus import choose_devices, detect_gpus, exclude_after_fault


@pytest.mark.parametrize(
    ("available", "excluded", "wanted", "expected"),
    [
        ([0, 1, 2, 3], set(), 1, [0]),
        ([0, 1, 2, 3], {0}, 1, [1]),
        ([0, 1, 2, 3], {0, 2}, 2, [1, 3]),
        ([0, 1], {0, 1}, 1, None),
        ([], set(), 1, None),
        ([0, 1], set(), 0, []),
    ],
)
def test_choose_devices(
    available: list[int], excluded: set[int], wanted: int, expected: list[int] | None
) -> None:
    assert choose_devices(available, excluded, wanted) == expected


@pytest.mark.parametrize(
    ("available", "excluded", "used", "wanted", "expected"),
    [
        ([0, 1], set(), [0], 1, {0}),  # another device exists: exclude the faulty one
        ([0], set(), [0], 1, set()),  # the only device: keep retrying on it
        ([0, 1, 2], {1}, [0], 1, {0, 1}),
        ([0, 1, 2], set(), [0, 1], 2, set()),  # two wanted, only one would be left
    ],
)
def test_exclude_after_fault(
    available: list[int], excluded: set[int], used: list[int], wanted: int, expected: set[int]
) -> None:
    assert exclude_after_fault(available, excluded, used, wanted) == expected


def test_detect_gpus_without_nvidia_smi(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert detect_gpus() == []

"""ckptd.state.retention: which commits max_to_keep and keep_every_n_hours delete (table)."""

from __future__ import annotations

import pytest

from ckptd.state.retention import Committed, to_delete

H = 3600.0


@pytest.mark.parametrize(
    ("times", "keep", "hours", "deleted"),
    [
        ([0, 1, 2, 3, 4], 3, None, [1, 2]),
        ([0, 1, 2], 3, None, []),
        ([0, 1, 2, 3], 1, None, [1, 2, 3]),
        ([0, H, 2 * H, 2.5 * H, 3 * H], 1, 1.0, [4]),
        ([0, 0.5 * H, H, 1.2 * H, 1.3 * H], 1, 1.0, [2, 4]),
    ],
)
def test_retention(times: list[float], keep: int, hours: float | None, deleted: list[int]) -> None:
    committed = [Committed(i + 1, t) for i, t in enumerate(times)]
    assert to_delete(committed, keep, hours) == deleted

"""The async writer's pacing decision (ckptd.state.pacing), table-driven."""

from __future__ import annotations

import pytest
from ckptd.state.pacing import writer_may_start


@pytest.mark.parametrize(("now", "last_done", "write_seconds", "share", "expected"), [
    (0.0, None, 0.0, 0.1, True),  # nothing written yet this attempt
    (100.0, 99.0, 5.0, 1.0, True),  # share 1.0: no limit
    (10.0, 9.0, 0.2, 0.1, False),  # 0.2 s write at share 0.1: wait 1.8 s
    (10.79, 9.0, 0.2, 0.1, False),
    (10.8, 9.0, 0.2, 0.1, True),
    (9.61, 9.0, 0.2, 0.25, True),  # share 0.25: wait 0.6 s
    (9.59, 9.0, 0.2, 0.25, False),
    (9.0, 9.0, 0.0, 0.1, True),  # an instant write never holds the next one back
    (9.0, 9.0, 1.0, 0.5, False),  # share 0.5: wait as long as the write took
    (10.0, 9.0, 1.0, 0.5, True),
])
def test_writer_may_start(now: float, last_done: float | None, write_seconds: float, share: float,
                          expected: bool) -> None:
    assert writer_may_start(now, last_done, write_seconds, share) is expected

"""ckptd.worker.setup: the causes the job file and a custom loop imply, one list for
`ckptd validate --build` and for the run's exactness.warning events (issue 26, part 3)."""

from __future__ import annotations

import pytest

from ckptd.state.jobspec import JobSpec
from ckptd.worker.setup import session_causes, spec_causes

NONDET = "train.deterministic is false"
CUSTOM = "custom training loop: the data position is the program's own"


def _spec(deterministic: bool) -> JobSpec:
    return JobSpec.model_validate(
        {"name": "j", "entrypoint": "/x/train.py", "train": {"deterministic": deterministic}}
    )


@pytest.mark.parametrize(
    ("deterministic", "from_spec", "from_session"),
    [
        (True, [], [CUSTOM]),
        (False, [NONDET], [NONDET, CUSTOM]),
    ],
)
def test_causes(deterministic: bool, from_spec: list[str], from_session: list[str]) -> None:
    spec = _spec(deterministic)
    assert [c[: len(w)] for c, w in zip(spec_causes(spec), from_spec, strict=True)] == from_spec
    got = session_causes(spec)
    assert [c[: len(w)] for c, w in zip(got, from_session, strict=True)] == from_session

"""Conformance corpus: ports of public keras-io programs (examples/<name>/, `entrypoint:` jobs).

For every example: an uninterrupted `ckptd run`, then a run whose worker is SIGKILLed mid-interval
once its heartbeat shows a commit (async commits land when the writer has written them, which on
a busy box may be many steps after they fell due, so a kill at a fixed step could come before
any). The second run must
end `succeeded`, resumed from a commit (restored step > 0), with final checkpoint tensors
identical to the uninterrupted run's. Slow (two real trainings per example): not in the default
run; `pytest -m conformance`.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import ROOT
from .procs import final_state_hash, finish, heartbeat_when, run_dir, start_run, status

pytestmark = [pytest.mark.tf, pytest.mark.conformance]

EXAMPLES = ROOT / "examples"
CORPUS = sorted(
    p.parent for p in EXAMPLES.glob("*/job.yaml") if "entrypoint" in yaml.safe_load(p.read_text())
)


def _every_steps(job: Path) -> int:
    return int(yaml.safe_load(job.read_text())["checkpoint"]["every_steps"])


def _run(home: Path, job: Path, faults: str = "") -> tuple[Path, dict[str, Any]]:
    rc, out = finish(start_run(home, str(job), faults=faults), timeout=900)
    assert rc == 0, out[-4000:]
    run = run_dir(home)
    return run, status(home, run.name)


def _diff(a: dict[str, str], b: dict[str, str]) -> list[str]:
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def test_corpus_is_there() -> None:
    assert len(CORPUS) >= 10, CORPUS


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("example", CORPUS, ids=[p.name for p in CORPUS])
def test_sigkill_resume_is_bit_identical(tmp_path: Path, example: Path) -> None:
    job = example / "job.yaml"
    every = _every_steps(job)

    golden_run, st = _run(tmp_path / "clean", job)
    assert st["state"] == "succeeded" and st["attempts"] == 1, st
    golden = final_state_hash(golden_run)
    total = st["last_committed_step"]
    assert total is not None and total > 2 * every, (total, every)

    # 10 ms a step (the results do not depend on it): a commit lands while training goes on.
    home = tmp_path / "killed"
    proc = start_run(home, str(job), faults="step_delay=0.01")
    run = run_dir(home)
    hb = heartbeat_when(
        run,
        lambda h: h.attempt == 1 and (h.committed_step or 0) >= every and h.step > (h.committed_step or 0),
        timeout=600,
    )
    os.kill(hb.pid, signal.SIGKILL)
    rc, out = finish(proc, timeout=900)
    assert rc == 0, out[-4000:]
    st = status(home, run.name)
    assert st["state"] == "succeeded", st
    first, last = st["attempt_list"][0], st["attempt_list"][-1]
    assert first["class"] == "killed", first
    assert last["class"] == "succeeded", last
    assert last["restored_step"] is not None and last["restored_step"] > 0, last
    assert st["last_committed_step"] == total, st
    resumed = final_state_hash(run)
    assert resumed == golden, f"tensors that differ after the resume: {_diff(golden, resumed)}"

"""Exact resume beyond the Pima example: programs that use Keras's random layers, fit's whole
data contract, callbacks and custom loops. Each runs once uninterrupted and once with its
worker SIGKILLed mid-run; the final checkpoints must agree tensor for tensor."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from .conftest import ROOT
from .procs import final_state_hash, finish, run_dir, start_run, status

pytestmark = pytest.mark.tf
PROGRAMS = ROOT / "tests" / "programs"

# program, job-file lines, step after which attempt 1 kills itself (between two commits)
CASES = {
    "random_layers": ("entrypoint: {dir}/random_layers.py\ncheckpoint: {{every_steps: 15}}\n", 37),
    "vae_dataset": ("entrypoint: {dir}/vae_dataset.py\ncheckpoint: {{every_steps: 10}}\n", 33),
    "multi_io": ("model: {dir}/multi_io.py:build\ncheckpoint: {{every_steps: 10}}\n", 27),
    "gan": ("entrypoint: {dir}/gan.py\ncheckpoint: {{every_steps: 8}}\n", 21),
    "custom_loop": ("entrypoint: {dir}/custom_loop.py\ncheckpoint: {{every_steps: 15}}\n", 50),
}


def _job(tmp: Path, name: str) -> Path:
    body, _ = CASES[name]
    job = tmp / f"{name}.yaml"
    job.write_text(f"name: {name.replace('_', '-')}\n" + body.format(dir=PROGRAMS)
                   + "restart: {max_restarts: 3, backoff_initial_seconds: 0.1, "
                     "backoff_max_seconds: 0.5}\n")
    return job


def _run(home: Path, job: Path, faults: str = "") -> Path:
    rc, out = finish(start_run(home, str(job), faults=faults))
    assert rc == 0, out
    return run_dir(home)


@pytest.mark.parametrize("name", sorted(CASES))
def test_sigkill_mid_run_resumes_bit_identical(tmp_path: Path, name: str) -> None:
    job = _job(tmp_path, name)
    clean = _run(tmp_path / "clean", job)
    killed = _run(tmp_path / "killed", job, faults=f"sigkill_at_step={CASES[name][1]},attempt=1")
    attempts = status(tmp_path / "killed", killed.name)["attempt_list"]
    assert [a["class"] for a in attempts] == ["killed", "succeeded"]
    assert attempts[1]["restored_step"] and attempts[1]["restored_step"] > 0
    want, got = final_state_hash(clean), final_state_hash(killed)
    assert got == want, sorted(k for k in want if got.get(k) != want[k])
    assert (killed / "history.csv").read_text() == (clean / "history.csv").read_text()
    if name == "random_layers":  # CSVLogger: one row per epoch across the restart
        with open(killed / "log.csv") as f:
            assert [r["epoch"] for r in csv.DictReader(f)] == ["0", "1", "2", "3"]

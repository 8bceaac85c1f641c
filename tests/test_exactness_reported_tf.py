"""Issue 26: a build() dataset the program shuffles itself resumes bit-identical after a SIGKILL,
and every exactness cause `ckptd validate --build` names is also an exactness.warning event of
the real run (one function, ckptd.worker.setup, makes both lists)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import ROOT
from .procs import events, final_state_hash, finish, run_dir, start_run, status

pytestmark = pytest.mark.tf
PIMA = ROOT / "examples" / "pima" / "pima-indians-diabetes.csv"
PROGRAMS = ROOT / "tests" / "programs"
RESTART = "restart: {max_restarts: 3, backoff_initial_seconds: 0.1, backoff_max_seconds: 0.5}\n"


def _reshuffle_job(tmp: Path, variant: str, extra: str = "") -> Path:
    job = tmp / f"reshuffle-{variant}.yaml"
    job.write_text(
        f"name: reshuffle-{variant.replace('_', '-')}\n"
        f"model: {PROGRAMS}/reshuffle/model.py:build\n"
        f"params: {{csv: {PIMA}, variant: {variant}}}\n"
        f"train: {{epochs: 3, batch_size: 32, seed: 7{extra}}}\n"
        "checkpoint: {every_steps: 10, mode: sync}\n" + RESTART
    )
    return job


def _run(home: Path, job: Path, faults: str = "") -> Path:
    rc, out = finish(start_run(home, str(job), faults=faults))
    assert rc == 0, out
    return run_dir(home)


def test_own_reshuffling_dataset_resumes_bit_identical_after_sigkill_mid_epoch_2(tmp_path: Path) -> None:
    job = _reshuffle_job(tmp_path, "default")
    clean = _run(tmp_path / "clean", job)
    # 768 examples in batches of 32: 24 steps an epoch; step 35 is inside epoch 2 (index 1).
    killed = _run(tmp_path / "killed", job, faults="sigkill_at_step=35,attempt=1")
    attempts = status(tmp_path / "killed", killed.name)["attempt_list"]
    assert [a["class"] for a in attempts] == ["killed", "succeeded"]
    want, got = final_state_hash(clean), final_state_hash(killed)
    assert got == want, sorted(k for k in want if got.get(k) != want[k])
    assert (killed / "history.csv").read_text() == (clean / "history.csv").read_text()


def _custom_loop_job(tmp: Path, extra: str) -> Path:
    job = tmp / "custom-loop.yaml"
    job.write_text(
        f"name: custom-loop\nentrypoint: {PROGRAMS}/custom_loop.py\n"
        f"train: {{deterministic: {extra}}}\ncheckpoint: {{every_steps: 15, mode: sync}}\n" + RESTART
    )
    return job


@pytest.mark.parametrize("case", ["model_py_function_nondeterministic", "custom_loop"])
def test_validate_build_and_the_run_report_the_same_causes(tmp_path: Path, case: str) -> None:
    from ckptd.daemon.check import build_check
    from ckptd.state.jobfile import load_job_file

    if case == "custom_loop":
        job = _custom_loop_job(tmp_path, "false")
    else:
        job = _reshuffle_job(tmp_path, "py", extra=", deterministic: false")
    checked = build_check(load_job_file(job)[0])
    assert checked.ok, checked.error
    assert len(checked.inexact) >= 2  # the job file's cause and the program's
    run = _run(tmp_path / "home", job)
    warned = [e["cause"] for e in events(run) if e["event"] == "exactness.warning"]
    assert warned == checked.inexact

"""A real `ckptd run` (foreground, our own rights) and the memory tier: the supervisor removes the
job's tier when the job succeeds or fails, and keeps it when the job is only stopped (it resumes
from it). The worker is tests/tierworker.py, the protocol-speaking fake worker that opens its
job's tier on the real tmpfs and leaves a snapshot-sized file there: no TensorFlow."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import CSV, EXAMPLE, ROOT, ckptd_cmd, env_with, slow
from .procs import wait_for
from .tierworker import TIER_PATH_FILE


@pytest.fixture
def shm_root() -> Iterator[Path]:
    root = Path("/dev/shm") / f"ckptd-test-{uuid.uuid4().hex[:12]}"
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _job(directory: Path, tier_root: Path) -> Path:
    job = directory / "tiered.yaml"
    job.write_text(
        "name: tiered\n"
        f"model: {EXAMPLE / 'model.py'}:build\n"
        f"params: {{csv: {CSV}}}\n"
        "train: {epochs: 1, batch_size: 10}\n"
        "checkpoint:\n"
        "  every_steps: 20\n"
        "  mode: async\n"
        f"  memory: {{every_steps: 5, dir: {tier_root}}}\n"
        "restart: {max_restarts: 0, backoff_initial_seconds: 0.1, backoff_max_seconds: 0.5}\n"
    )
    return job


def _env(home: Path, **fake: str) -> dict[str, str]:
    env = env_with(home)
    env["CKPTD_WORKER_MODULE"] = "tests.tierworker"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env | {"FAKE_STEP_SECONDS": "0.01"} | fake


def _run(home: Path, job: Path, **fake: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ckptd_cmd("run", str(job), "--progress", "json"),
        env=_env(home, **fake),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _tier_of(home: Path) -> Path:
    written = list((home / "jobs").glob(f"*/{TIER_PATH_FILE}"))
    assert len(written) == 1, written
    return Path(written[0].read_text())


@pytest.mark.parametrize(("fake", "code"), [({"FAKE_STEPS": "30"}, 0), ({"FAKE_CRASH_AT": "3"}, 1)])
def test_the_tier_goes_when_the_job_ends(
    tmp_path: Path, shm_root: Path, fake: dict[str, str], code: int
) -> None:
    home = tmp_path / "home"
    proc = _run(home, _job(tmp_path, shm_root), **fake)
    out, _ = proc.communicate(timeout=slow(120))
    assert proc.returncode == code, out
    tier = _tier_of(home)
    assert tier.parent == shm_root and tier.name == next((home / "jobs").iterdir()).name
    assert not os.path.lexists(tier), out  # the worker wrote it; the supervisor removed it
    assert shm_root.is_dir()  # the root is the user's: only the job's directory goes
    assert "memory.tier_remove_failed" not in out


def test_a_stopped_job_keeps_its_tier(tmp_path: Path, shm_root: Path) -> None:
    home = tmp_path / "home"
    proc = _run(home, _job(tmp_path, shm_root), FAKE_STEPS="5000", FAKE_STEP_SECONDS="0.02")
    try:
        wait_for("the worker's tier", lambda: list((home / "jobs").glob(f"*/{TIER_PATH_FILE}")), 60)
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the worker saves and the job is interrupted
        out, _ = proc.communicate(timeout=slow(120))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out
    tier = _tier_of(home)
    assert (tier / "snap-000000000001-g1" / "values.bin").is_file(), out  # kept for the resume

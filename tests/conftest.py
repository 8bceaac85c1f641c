from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "pima"
CSV = EXAMPLE / "pima-indians-diabetes.csv"


GOLDEN_EPOCHS = 4


@pytest.fixture(scope="session")
def golden(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An uninterrupted run of the test job (write_job, GOLDEN_EPOCHS): the oracle for exact
    resume, shared by every module that interrupts that job."""
    from .procs import final_state_hash, finish, run_dir, start_run

    tmp = tmp_path_factory.mktemp("golden")
    home = tmp / "home"
    rc, out = finish(start_run(home, str(write_job(tmp, epochs=GOLDEN_EPOCHS))))
    assert rc == 0, out
    return final_state_hash(run_dir(home))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "home"
    monkeypatch.setenv("CKPTD_HOME", str(h))
    return h


def write_job(directory: Path, name: str = "pima-test", epochs: int = 3, every_steps: int = 20,
              extra: str = "", model: str | None = None, mode: str = "sync") -> Path:
    """A small Pima job: few epochs, frequent checkpoints."""
    directory.mkdir(parents=True, exist_ok=True)
    job = directory / f"{name}.yaml"
    job.write_text(
        f"name: {name}\n"
        f"model: {model or str(EXAMPLE / 'model.py') + ':build'}\n"
        f"params: {{csv: {CSV}}}\n"
        f"train: {{epochs: {epochs}, batch_size: 10, validation_split: 0.33, seed: 7}}\n"
        f"checkpoint: {{every_steps: {every_steps}, every_seconds: 600, max_to_keep: 3, "
        f"mode: {mode}}}\n"
        "best: {monitor: val_accuracy, mode: max, filepath: weights.best.hdf5}\n"
        "restart: {max_restarts: 3, backoff_initial_seconds: 0.1, backoff_max_seconds: 0.5}\n"
        + extra)
    return job


def ckptd_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ckptd.daemon", *args]


def env_with(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["CKPTD_HOME"] = str(home)
    return env

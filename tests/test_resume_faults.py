"""Verified restore with fallback, crash points inside save and restore, disk full, one writer."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import slow, write_job
from .procs import events, final_state_hash, finish, heartbeat_when, run_dir, start_run, status

pytestmark = pytest.mark.tf
EPOCHS = 3  # 156 steps; commits every 20 steps: 120, 140 and the final 156 are kept


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    tmp = tmp_path_factory.mktemp("finished")
    home = tmp / "home"
    rc, out = finish(start_run(home, str(write_job(tmp, epochs=EPOCHS))))
    assert rc == 0, out
    run = run_dir(home)
    return run, final_state_hash(run)


def _newest(ck: Path, suffix: str) -> Path:
    return max(ck.glob(f"ckpt-*{suffix}"), key=lambda p: int(p.name.split("-")[1].split(".")[0]))


def _truncate(p: Path, size: int | None = None) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2 if size is None else size])


def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


CK_DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "index half": (lambda ck: _truncate(_newest(ck, ".index")), "bytes"),
    "index zero-length": (lambda ck: _truncate(_newest(ck, ".index"), 0), "bytes"),
    "data truncated": (lambda ck: _truncate(_newest(ck, ".data-00000-of-00001")), "bytes"),
    "data bit flip": (lambda ck: _flip(_newest(ck, ".data-00000-of-00001")), "Checksum does not match"),
    "index bit flip": (lambda ck: _flip(_newest(ck, ".index")), "SHA-256"),
    "data missing": (lambda ck: _newest(ck, ".data-00000-of-00001").unlink(), "missing"),
    "index missing": (lambda ck: _newest(ck, ".index").unlink(), "missing"),
    "manifest garbage": (
        lambda ck: _newest(ck, ".manifest.json").write_text("{garbage"),
        "manifest unreadable",
    ),
}
STATE_FILE_DAMAGE: dict[str, Callable[[Path], None]] = {
    "state file empty": lambda ck: (ck / "checkpoint").write_text(""),
    "state file garbage": lambda ck: (ck / "checkpoint").write_bytes(b"\x00\xffgarbage{{"),
    "state file missing": lambda ck: (ck / "checkpoint").unlink(),
    "state file points at a deleted checkpoint": lambda ck: (ck / "checkpoint").write_text(
        'model_checkpoint_path: "ckpt-99"\nall_model_checkpoint_paths: "ckpt-99"\n'
    ),
}


# Damages whose failure path another one already walks in the default run (the same reason: a
# short file, a missing file, an unreadable state file) run with `-m conformance` (CI runs both).
TWINS = {"index half", "index zero-length", "data missing", "state file empty", "state file missing"}


def _kinds(damage: dict[str, object]) -> list[object]:
    return [pytest.param(k, marks=pytest.mark.conformance) if k in TWINS else k for k in sorted(damage)]


def _worker(run: Path, attempt: int = 9) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckptd.worker", str(run), str(attempt)],
        capture_output=True,
        text=True,
        timeout=slow(300),
    )


@pytest.mark.parametrize("kind", _kinds(CK_DAMAGE))
def test_damaged_newest_is_quarantined_and_previous_restored(
    tmp_path: Path, finished: tuple[Path, dict[str, str]], kind: str
) -> None:
    base, golden = finished
    run = tmp_path / "run"
    shutil.copytree(base, run)
    ck = run / "checkpoints"
    damage, reason = CK_DAMAGE[kind]
    damage(ck)
    r = _worker(run)
    assert r.returncode == 0, r.stderr[-3000:]
    evs = [e for e in events(run) if e.get("attempt") == 9]
    (q,) = [e for e in evs if e["event"] == "checkpoint.quarantined"]
    assert reason in q["reason"]
    done = next(e for e in evs if e["event"] == "restore.done")
    assert done["step"] == 140  # the previous commit, not step 0
    assert list((ck / "quarantine").glob("ckpt-*/reason.txt"))
    assert final_state_hash(run) == golden  # 140 → 156 recomputed identically


@pytest.mark.parametrize("kind", _kinds(STATE_FILE_DAMAGE))
def test_state_file_is_never_trusted(
    tmp_path: Path, finished: tuple[Path, dict[str, str]], kind: str
) -> None:
    base, golden = finished
    run = tmp_path / "run"
    shutil.copytree(base, run)
    ck = run / "checkpoints"
    STATE_FILE_DAMAGE[kind](ck)
    r = _worker(run)
    assert r.returncode == 0, r.stderr[-3000:]
    done = next(e for e in events(run) if e.get("attempt") == 9 and e["event"] == "restore.done")
    assert done["step"] == 156
    assert (ck / "checkpoint").read_text().startswith(f'model_checkpoint_path: "ckpt-{done["number"]}"')
    assert final_state_hash(run) == golden


def test_no_valid_checkpoint_fails_never_restarts_from_zero(
    tmp_path: Path, finished: tuple[Path, dict[str, str]]
) -> None:
    base, _ = finished
    run = tmp_path / "run"
    shutil.copytree(base, run)
    for p in (run / "checkpoints").glob("*.data-*"):
        _flip(p)
    r = _worker(run)
    assert r.returncode == 76, r.stderr[-2000:]
    err = json.loads((run / "attempts" / "0009" / "error.json").read_text())
    assert "none valid" in err["message"] and "step 0" in err["message"]
    assert not any(e["event"] == "restore.fresh" for e in events(run) if e.get("attempt") == 9)


def test_sigkill_inside_save_keeps_previous_commit(
    tmp_path: Path, finished: tuple[Path, dict[str, str]]
) -> None:
    _, golden = finished
    home = tmp_path / "home"
    rc, out = finish(
        start_run(home, str(write_job(tmp_path, epochs=EPOCHS)), faults="sigkill_in_save=60,attempt=1")
    )
    assert rc == 0, out
    run = run_dir(home)
    a1, a2 = status(home, run.name)["attempt_list"]
    assert a1["class"] == "killed" and a2["restored_step"] == 40
    gc = [e for e in events(run) if e["event"] == "checkpoint.gc" and e["attempt"] == 2]
    assert gc and any(".index" in name for name in gc[0]["removed"])  # the torn save's debris
    assert final_state_hash(run) == golden


def test_kill_during_restore_and_restore_that_kills_twice_is_quarantined(
    tmp_path: Path, finished: tuple[Path, dict[str, str]]
) -> None:
    _, golden = finished
    home = tmp_path / "home"
    rc, out = finish(
        start_run(
            home,
            str(write_job(tmp_path, epochs=EPOCHS)),
            faults="sigkill_at_step=70,attempt=1,sigkill_in_restore=2-3",
        )
    )
    assert rc == 0, out
    run = run_dir(home)
    attempts = status(home, run.name)["attempt_list"]
    assert [a["class"] for a in attempts] == ["killed", "killed", "killed", "succeeded"]
    (q,) = [e for e in events(run) if e["event"] == "checkpoint.quarantined"]
    assert q["step"] == 60 and "twice" in q["reason"]
    assert attempts[-1]["restored_step"] == 40
    assert final_state_hash(run) == golden


def test_disk_full_during_save_reports_and_training_carries_on(
    tmp_path: Path, finished: tuple[Path, dict[str, str]]
) -> None:
    _, golden = finished
    home = tmp_path / "home"
    rc, out = finish(start_run(home, str(write_job(tmp_path, epochs=EPOCHS)), faults="enospc_in_save=80"))
    assert rc == 0, out
    run = run_dir(home)
    st = status(home, run.name)
    assert st["attempts"] == 1  # no restart: the save failed, training did not
    (failed,) = [e for e in events(run) if e["event"] == "checkpoint.failed"]
    assert failed["step"] == 80 and "errno 28" in failed["error"]
    assert failed["committed_step"] == 60  # the previous checkpoint stays
    assert st["checkpoint_problems"][0]["kind"] == "checkpoint.failed"
    assert not list((run / "checkpoints").glob("*_temp*"))
    assert final_state_hash(run) == golden


@pytest.mark.timing
def test_second_writer_on_a_checkpoint_dir_refuses(tmp_path: Path) -> None:
    shared = tmp_path / "shared-ckpts"
    a = write_job(tmp_path / "a", name="writer-a", epochs=EPOCHS)
    b = write_job(tmp_path / "b", name="writer-b", epochs=EPOCHS)
    for job in (a, b):
        job.write_text(job.read_text().replace("checkpoint: {", f"checkpoint: {{dir: {shared}, "))
    home = tmp_path / "home"
    # Slow enough that it is still training when B (a TensorFlow import later) has been refused.
    first = start_run(home, str(a), faults="step_delay=0.2")
    heartbeat_when(run_dir(home), lambda h: h.phase == "training" and h.step > 0)
    rc, out = finish(start_run(home, str(b)))
    assert rc == 1, out
    jobs = {p.name.split("-2")[0]: p.name for p in (home / "jobs").iterdir()}
    st = status(home, jobs["writer-b"])
    assert st["attempt_list"][0]["class"] == "config_error"
    assert "in use by another ckptd worker" in st["attempt_list"][0]["evidence"]
    first.send_signal(signal.SIGINT)  # stop the first job politely: no orphan worker left
    assert finish(first)[0] == 130

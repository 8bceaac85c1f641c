"""T08 on a real filesystem: the checkpoint directory is a tiny tmpfs (private mount namespace,
needs root); the test fills it mid-run, a save fails with ENOSPC, training carries on from the
previous commit, and once space is back the job finishes with the uninterrupted result."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import env_with, write_job
from .procs import events, finish, heartbeat_when, run_dir, status, wait_for

pytestmark = [
    pytest.mark.tf,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("unshare") is None,
        reason="needs root and unshare for a private tmpfs",
    ),
]


def _run_on_tmpfs(home: Path, ck: Path, job: Path, size: str, faults: str) -> subprocess.Popen[str]:
    """`ckptd run JOB` in a private mount namespace where `ck` is a tmpfs of `size`."""
    env = env_with(home)
    env["CKPTD_FAULTS"] = faults
    script = (
        f"mount -t tmpfs -o size={size} tmpfs {ck} && exec {sys.executable} -m "
        f"ckptd.daemon run --progress json {job}"
    )
    return subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _fill(path: Path) -> None:
    with open(path, "wb", buffering=0) as f:  # fill the tmpfs to the last byte
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


@pytest.mark.parametrize(
    ("mode", "writer"),
    [
        ("async", "process"),  # the default: below 64 MiB the writer is a process
        pytest.param("sync", "", marks=pytest.mark.conformance),
        pytest.param("async", "thread", marks=pytest.mark.conformance),  # large states' writer
    ],
)
def test_enospc_on_a_full_tmpfs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, writer: str
) -> None:
    """Interval saves on a full disk fail, training carries on, later saves commit again."""
    if writer == "thread":
        monkeypatch.setenv("CKPTD_THREAD_WRITER_BYTES", "1")
    ck = tmp_path / "tinyfs"
    ck.mkdir()
    job = write_job(tmp_path, name="diskfull", epochs=3, mode=mode)
    job.write_text(job.read_text().replace("checkpoint: {", f"checkpoint: {{dir: {ck}, "))
    home = tmp_path / "home"
    proc = _run_on_tmpfs(home, ck, job, "1m", "step_delay=0.03")
    run = run_dir(home)
    hb = heartbeat_when(run, lambda h: (h.committed_step or 0) >= 20)
    inside = Path(f"/proc/{hb.pid}/root") / str(ck).lstrip("/")  # the worker's view of tinyfs
    filler = inside / "filler"
    _fill(filler)
    wait_for(
        "a failed save", lambda: any(e["event"] == "checkpoint.failed" for e in events(run)), timeout=120
    )
    filler.unlink()
    rc, out = finish(proc)
    assert rc == 0, out
    failed = [e for e in events(run) if e["event"] == "checkpoint.failed"]
    assert failed and failed[0]["committed_step"] is not None
    assert "No space left" in failed[0]["error"] or "errno 28" in failed[0]["error"]
    assert status(home, run.name)["attempts"] == 1  # no restart: training carried on
    committed = [e for e in events(run) if e["event"] == "checkpoint.committed"]
    assert committed[-1]["step"] == 156  # space came back: later saves committed again
    assert failed[0]["step"] > failed[0]["committed_step"]  # the previous commit stayed


@pytest.mark.parametrize(
    ("mode", "writer"),
    [
        ("sync", ""),
        # The default writer (below 64 MiB a process): ENOSPC in it is also test_enospc_on_a_full_tmpfs's.
        pytest.param("async", "process", marks=pytest.mark.conformance),
        pytest.param("async", "thread", marks=pytest.mark.conformance),  # large states' writer
    ],
)
def test_a_full_disk_at_epoch_ends_and_the_final_save_waits_then_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, writer: str
) -> None:
    """Checkpoints and best files on a tmpfs that fills up: epoch ends carry on (the best file
    is reported not written), the final save that must succeed ends the attempt disk_full, which
    waits without spending the restart budget (max_restarts: 1), and when space is back the job
    resumes from its last commit and finishes. Async final saves ended `crash` (the writer's
    ENOSPC was not passed on) and crash-looped the job (issue 25)."""
    if writer == "thread":
        monkeypatch.setenv("CKPTD_THREAD_WRITER_BYTES", "1")
    ck = tmp_path / "tinyfs"
    ck.mkdir()
    job = write_job(tmp_path, name="diskfull2", epochs=3, mode=mode)
    job.write_text(
        job.read_text()
        .replace("checkpoint: {", f"checkpoint: {{dir: {ck}/ck, ")
        .replace("filepath: weights.best.hdf5", f"filepath: '{ck}/best/w.hdf5'")
        .replace("max_restarts: 3", "max_restarts: 1")
    )
    home = tmp_path / "home"
    proc = _run_on_tmpfs(home, ck, job, "5m", "step_delay=0.02")
    run = run_dir(home)
    heartbeat_when(run, lambda h: (h.committed_step or 0) >= 20)
    filler = Path(f"/proc/{proc.pid}/root") / str(ck).lstrip("/") / "filler"  # the job's view
    _fill(filler)
    wait_for(
        "a disk_full attempt",
        lambda: any(a["class"] == "disk_full" for a in status(home, run.name)["attempt_list"]),
        timeout=180,
    )
    wait_for(
        "a second disk_full wait",
        lambda: sum(a["class"] == "disk_full" for a in status(home, run.name)["attempt_list"]) >= 2,
        180,
    )
    filler.unlink()
    rc, out = finish(proc)
    assert rc == 0, out
    st = status(home, run.name)
    assert st["state"] == "succeeded", st
    assert {a["class"] for a in st["attempt_list"][:-1]} == {"disk_full"}, st["attempt_list"]
    assert any(e["event"] == "output.failed" and e["what"] == "best" for e in events(run))
    committed = [e for e in events(run) if e["event"] == "checkpoint.committed"]
    assert committed[-1]["step"] == 156

"""ckptd.daemon.jobs: run directories and recognising a job's worker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil

from ckptd.daemon import jobs
from ckptd.state.paths import RunDir

from .procs import wait_for

ROOT = Path(__file__).resolve().parent.parent


def test_works_for_recognises_a_warm_worker_by_its_directory(tmp_path: Path) -> None:
    """A warm worker's command line names no run (`python -m ckptd.worker --warm`): after its
    hand-over it lives in the run directory, which is how a restarted daemon knows it."""
    run, other = RunDir(tmp_path / "run"), RunDir(tmp_path / "other")
    run.root.mkdir()
    other.root.mkdir()
    code = "import sys, time; time.sleep(60)"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, "ckptd.worker", *args], cwd=cwd)
        for args, cwd in ((["--warm"], run.root), ([str(run.root), "3"], tmp_path), (["--warm"], tmp_path))
    ]
    try:
        for p in procs:  # exec'd (the fork still shows pytest's command line for a moment)
            wait_for("the exec", lambda p=p: "ckptd.worker" in psutil.Process(p.pid).cmdline(), 10)
        found = [jobs.works_for(psutil.Process(p.pid), run) for p in procs]
        assert found == [True, True, False]
        assert not jobs.works_for(psutil.Process(procs[0].pid), other)
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_a_run_directory_retention_removed_is_not_reclaimed(tmp_path: Path) -> None:
    """A failed job whose run directory finished_retention removed: nothing to hand over, and
    no error at every daemon start."""
    from ckptd.daemon.jobs import reclaim_run
    from ckptd.state.paths import RunDir
    from ckptd.state.submissions import account_owner

    assert reclaim_run(RunDir(tmp_path / "jobs" / "gone"), account_owner(os.getuid())) is False

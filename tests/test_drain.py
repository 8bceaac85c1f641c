"""`ckptd drain` / `undrain` through a real daemon (fake workers): nothing starts while drained,
running jobs save and go back to the queue (or finish, as asked), the state survives a restart
of the daemon, and only root and the admin group may drain."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import ckptd_cmd
from .daemonproc import DaemonProc, daemon_env, fake_job, start_daemon
from .procs import as_uid, wait_for

SLOW = {"FAKE_STEPS": "200", "FAKE_STEP_SECONDS": "0.05"}  # 10 s a job


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ckptd_cmd(*args), env=daemon_env(home), capture_output=True, text=True, timeout=120)


def _stays(d: DaemonProc, job_id: str, state: str, seconds: float = 3.0) -> None:
    """A negative: for `seconds` (several daemon loops), the job does not leave `state`."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert d.job(job_id)["state"] == state
        time.sleep(0.1)


def test_drain_stops_and_requeues_and_undrain_resumes(tmp_path: Path) -> None:
    home = tmp_path / "home"
    d = start_daemon(home, **SLOW)
    try:
        a = d.submit(fake_job(tmp_path, "a"))
        d.wait_state(a, "running")
        wait_for("a commit", lambda: d.job(a)["last_committed_step"])
        r = _cli(home, "drain")
        assert r.returncode == 0 and "1 running job(s) save" in r.stdout, r.stderr
        assert d.api("GET", "/v1/health")["drain"]["running"] == "stop"
        assert json.loads((home / "drain.json").read_text())["running"] == "stop"
        queued = d.wait_state(a, "queued")  # saved, stopped, back in the queue
        assert "undrain" in queued["reason"]
        b = d.submit(fake_job(tmp_path, "b"))
        _stays(d, a, "queued")
        assert d.job(b)["state"] == "queued"
        d.stop()
        d = start_daemon(home, **SLOW)  # an upgrade: the service restarts, still drained
        assert d.api("GET", "/v1/health")["drain"] is not None
        _stays(d, a, "queued")
        r = _cli(home, "undrain")
        assert r.returncode == 0 and "start again" in r.stdout, r.stderr
        done = d.wait_state(a, "succeeded", timeout=120)
        assert done["attempts"] == 2
        attempts = d.job(a)["attempt_list"]
        assert attempts[0]["class"] == "preempted" and attempts[1]["restored_step"], attempts
        d.wait_state(b, "succeeded", timeout=120)
    finally:
        d.stop()


def test_drain_finish_lets_running_jobs_end(tmp_path: Path) -> None:
    home = tmp_path / "home"
    d = start_daemon(home, config="max_concurrent_jobs: 1\n", **SLOW)
    try:
        a = d.submit(fake_job(tmp_path, "a"))
        b = d.submit(fake_job(tmp_path, "b"))
        d.wait_state(a, "running")
        r = _cli(home, "drain", "--finish", "--wait", "--timeout", "120")
        assert r.returncode == 0 and "run to their end" in r.stdout and "no job runs" in r.stdout, r.stderr
        assert d.job(a)["state"] == "succeeded" and d.job(a)["attempts"] == 1
        _stays(d, b, "queued")
        assert _cli(home, "undrain").returncode == 0
        d.wait_state(b, "succeeded", timeout=120)
        assert "was not drained" in _cli(home, "undrain").stdout
    finally:
        d.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")
def test_only_admins_may_drain(tmp_path: Path) -> None:
    from ckptd.daemon.client import Client

    sockdir = Path(tempfile.mkdtemp(prefix="ckptd-sock-"))  # reachable by uid 65534
    sockdir.chmod(0o755)
    sock = sockdir / "ckptd.sock"
    d = start_daemon(tmp_path / "home", sock=sock)
    try:
        os.chmod(sock, 0o666)
        for url in ("/v1/drain", "/v1/undrain"):
            got = as_uid(65534, 65534, lambda url=url: Client(sock).call("POST", url, {}))
            assert got.get("status") == 403 and "may not" in got["error"], json.dumps(got)
        assert d.api("GET", "/v1/health")["drain"] is None
    finally:
        d.stop()
        shutil.rmtree(sockdir, ignore_errors=True)

"""The daemon as a real process: API, submit idempotency, queue, cancel, CLI messages (its stops,
deaths and restarts: test_daemon_restart.py).

Workers are the protocol-speaking fake (tests/fakeworker.py) so that these tests exercise the
daemon's own logic in seconds; test_daemon_tf.py runs the real TensorFlow worker under it.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from ckptd.daemon.client import ApiRefused

from .conftest import ckptd_cmd
from .daemonproc import DaemonProc, daemon_env, fake_job, start_daemon
from .procs import as_uid, wait_for

SLOW = {"FAKE_STEPS": "400", "FAKE_STEP_SECONDS": "0.02"}  # ~8 s, commits every 10 steps


@pytest.fixture
def daemon(tmp_path: Path) -> DaemonProc:
    d = start_daemon(tmp_path / "home")
    yield d
    if d.proc.poll() is None:
        d.stop()


def _cli(home: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ckptd_cmd(*args), env=daemon_env(home, **extra), capture_output=True, text=True, timeout=120
    )


def test_submit_status_logs_over_the_cli(tmp_path: Path, daemon: DaemonProc) -> None:
    job = fake_job(tmp_path)
    r = _cli(daemon.home, "submit", str(job), "--wait")
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    st = _cli(daemon.home, "status", job_id, "--json")
    assert '"state": "succeeded"' in st.stdout and f'"owner_uid": {os.getuid()}' in st.stdout
    import pwd

    listing = _cli(daemon.home, "status").stdout  # the operator's view names the owner
    assert f"owner={pwd.getpwuid(os.getuid()).pw_name}" in listing, listing
    logs = _cli(daemon.home, "logs", job_id, "--json").stdout
    assert '"worker.spawned"' in logs and '"checkpoint.committed"' in logs
    assert '"worker.exited"' in logs
    # The journal (the daemon's stdout): one line per attempt event, not one per reader.
    journal = [json.loads(line) for line in daemon.output().splitlines() if line.startswith("{")]
    spawned = [e for e in journal if e.get("event") == "worker.spawned"]
    assert len(spawned) == 1, spawned


def test_api_answers_json_and_clear_errors(daemon: DaemonProc) -> None:
    assert daemon.api("GET", "/v1/health")["pid"] == daemon.proc.pid
    assert daemon.api("GET", "/v1/jobs") == []
    for url, status in [("/v1/jobs/nope", 404), ("/v2/x", 404), ("/v1/jobs/nope/events?offset=x", 400)]:
        with pytest.raises(ApiRefused) as e:
            daemon.api("GET", url)
        assert e.value.status == status
    with pytest.raises(ApiRefused) as e:
        daemon.api("POST", "/v1/jobs", {"spec_json": '{"name": "x"}'})
    assert e.value.status == 400 and "raw" in str(e.value)
    with pytest.raises(ApiRefused) as e:
        daemon.api("POST", "/v1/jobs", {"raw": "name: x\n", "job_file": "/j.yaml"})
    assert e.value.status == 400 and any("model" in p for p in e.value.payload["problems"])
    st = os.stat(daemon.home / "ckptd.sock")
    assert st.st_mode & 0o777 == 0o660


@pytest.mark.parametrize(
    ("output", "why"),
    [("/nonexistent/dir/x.h5", "does not exist"), ("/etc/hostname/x.h5", "is not a directory")],
)
def test_export_to_a_place_it_cannot_write_is_one_line(tmp_path: Path, output: str, why: str) -> None:
    r = _cli(tmp_path / "home", "export", "some-job", "--latest", "-o", output)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and why in r.stderr, r.stderr


def test_daemon_not_running_is_a_clear_message(tmp_path: Path) -> None:
    r = _cli(tmp_path / "home", "cancel", "some-job")
    assert r.returncode == 1 and "daemon is not running" in r.stderr


def test_submit_with_the_same_key_creates_one_job(tmp_path: Path, daemon: DaemonProc) -> None:
    job = fake_job(tmp_path)
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(daemon.submit(job, key="k" * 12))) for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 6
    assert len(daemon.api("GET", "/v1/jobs")) == 1
    assert daemon.submit(job, key="another-key") != results[0]


def test_queue_runs_by_priority_then_fifo(tmp_path: Path) -> None:
    d = start_daemon(tmp_path / "home", FAKE_STEPS="30", FAKE_STEP_SECONDS="0.02")
    try:
        first = d.submit(fake_job(tmp_path, "first"))
        d.wait_state(first, "running")
        low = d.submit(fake_job(tmp_path, "low"))
        low2 = d.submit(fake_job(tmp_path, "low2"))
        high = d.submit(fake_job(tmp_path, "high"), priority=5)
        for j in (first, low, low2, high):
            d.wait_state(j, "succeeded")
        started = {j: d.job(j)["attempt_list"][0]["started_at"] for j in (first, low, low2, high)}
        assert sorted(started, key=lambda j: started[j]) == [first, high, low, low2]
        spans = [
            (d.job(j)["attempt_list"][0]["started_at"], d.job(j)["attempt_list"][0]["ended_at"])
            for j in (first, high, low, low2)
        ]
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))  # one slot
    finally:
        d.stop()


def test_slots_run_jobs_side_by_side(tmp_path: Path) -> None:
    d = start_daemon(tmp_path / "home", config="max_concurrent_jobs: 2\n", **SLOW)
    try:
        a, b, c = (d.submit(fake_job(tmp_path, n)) for n in ("a", "b", "c"))
        wait_for("two running", lambda: len(d.api("GET", "/v1/health")["running"]) == 2, 30)
        assert d.job(c)["state"] == "queued"
        for j in (a, b, c):
            d.api("POST", f"/v1/jobs/{j}/cancel")
        for j in (a, b, c):
            d.wait_state(j, "cancelled")
    finally:
        d.stop()


def test_cancel_in_every_state(tmp_path: Path) -> None:
    d = start_daemon(tmp_path / "home", **SLOW)
    try:
        running = d.submit(fake_job(tmp_path, "r"))
        queued = d.submit(fake_job(tmp_path, "q"))
        wait_for("a commit", lambda: (d.job(running)["last_committed_step"] or 0) >= 10, 30)
        assert d.api("POST", f"/v1/jobs/{queued}/cancel")["state"] == "cancelled"
        assert d.api("POST", f"/v1/jobs/{running}/cancel")["state"] == "cancelling"
        job = d.wait_state(running, "cancelled")
        assert job["attempt_list"][-1]["class"] == "preempted"  # it saved on the way out
        assert "through the API" in job["reason"] and "SIGTERM" not in job["reason"], job
        with pytest.raises(ApiRefused) as e:
            d.api("POST", f"/v1/jobs/{running}/cancel")
        assert e.value.status == 409
    finally:
        d.stop()


def _as_nobody(sock: Path, method: str, url: str) -> tuple[int, str]:
    """Call the API from a child process running as uid/gid 65534."""
    from ckptd.daemon.client import Client

    got = as_uid(65534, 65534, lambda: Client(sock).call(method, url))
    if "ok" in got:
        return 200, json.dumps(got["ok"])
    if "status" in got:
        return int(got["status"]), str(got["error"])
    return 0, str(got["exc"])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")
def test_another_uid_may_not_cancel(tmp_path: Path) -> None:
    sockdir = Path(tempfile.mkdtemp(prefix="ckptd-sock-"))  # reachable by uid 65534
    sockdir.chmod(0o755)
    sock = sockdir / "ckptd.sock"
    d = start_daemon(tmp_path / "home", sock=sock, **SLOW)
    try:
        job = d.submit(fake_job(tmp_path))
        code, msg = _as_nobody(sock, "POST", f"/v1/jobs/{job}/cancel")
        assert code == 0 and "permission denied" in msg  # 0660: not in the socket's group
        os.chmod(sock, 0o666)  # as if uid 65534 were in the group
        code, msg = _as_nobody(sock, "POST", f"/v1/jobs/{job}/cancel")
        assert code == 403 and "may not cancel" in msg, msg
        for url in (f"/v1/jobs/{job}", f"/v1/jobs/{job}/events", f"/v1/jobs/{job}/checkpoints"):
            code, msg = _as_nobody(sock, "GET", url)  # another user's job: not even its details
            assert code == 403 and "may not see" in msg, msg
        code, msg = _as_nobody(sock, "GET", "/v1/jobs")
        assert code == 200 and json.loads(msg) == []  # only the caller's own jobs are listed
        assert d.api("POST", f"/v1/jobs/{job}/cancel")["state"] in ("cancelled", "cancelling")
    finally:
        d.stop()
        shutil.rmtree(sockdir, ignore_errors=True)


def test_second_daemon_on_the_same_state_refuses(daemon: DaemonProc) -> None:
    r = _cli(daemon.home, "daemon")
    assert r.returncode == 1 and "already serves" in r.stderr


def test_logs_follow_across_a_worker_restart(tmp_path: Path) -> None:
    d = start_daemon(tmp_path / "home", FAKE_STEPS="40", FAKE_STEP_SECONDS="0.02", FAKE_CRASH_AT="15")
    try:
        job = d.submit(fake_job(tmp_path))
        r = _cli(d.home, "logs", job, "-f", "--json")  # returns when the job has ended
        assert r.returncode == 0, r.stderr
        kinds = [json.loads(line)["event"] for line in r.stdout.splitlines()]
        assert kinds.count("worker.spawned") == 2 and "worker.restarting" in kinds
        exits = [json.loads(line) for line in r.stdout.splitlines() if '"worker.exited"' in line]
        assert [e["exit_class"] for e in exits] == ["crash", "succeeded"]
    finally:
        d.stop()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_over_the_socket(daemon: DaemonProc) -> None:
    r = subprocess.run(
        ["curl", "-sf", "--unix-socket", str(daemon.sock), "http://ckptd/v1/jobs"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0 and json.loads(r.stdout) == []


def test_status_without_a_daemon_creates_no_store_and_says_so(tmp_path: Path) -> None:
    """With the daemon stopped, an empty local store must not pass for "you have no jobs"."""
    home = tmp_path / "home"
    r = _cli(home, "status")
    assert r.returncode == 0 and r.stdout.strip() == "no jobs"
    assert "no daemon answers" in r.stderr and not (home / "ckptd.db").exists()
    r = _cli(home, "checkpoints", "some-job")
    assert r.returncode == 2 and "no daemon answers" in r.stderr


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


@pytest.mark.timing
def test_hostile_requests_get_a_4xx_and_idle_clients_are_bounded(daemon: DaemonProc) -> None:
    """A body nested a million deep, a 30-digit offset, hundreds of silent connections: the
    daemon answers 4xx, holds a bounded number of threads, and keeps serving."""
    import socket

    deep = ("[" * 1_000_000 + "]" * 1_000_000).encode()
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(daemon.sock))
        s.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(deep) + deep)
        assert s.recv(100).startswith(b"HTTP/1.1 400"), "nested JSON"
    with pytest.raises(ApiRefused) as e:
        daemon.api("GET", "/v1/jobs/x/events?offset=" + "9" * 30)
    assert e.value.status == 400
    idle = []
    for _ in range(300):
        c = socket.socket(socket.AF_UNIX)
        c.connect(str(daemon.sock))
        idle.append(c)
    try:
        assert _threads(daemon.proc.pid) < 120
        t0 = time.monotonic()
        assert daemon.api("GET", "/v1/health")["pid"] == daemon.proc.pid
        assert time.monotonic() - t0 < 60
    finally:
        for c in idle:
            c.close()


def test_deleting_a_running_jobs_run_directory_is_named(tmp_path: Path) -> None:
    d = start_daemon(tmp_path / "home", **SLOW)
    try:
        job_id = d.submit(fake_job(tmp_path))
        run = Path(
            wait_for("a commit", lambda: (j := d.job(job_id))["last_committed_step"] and j["run_dir"], 30)
        )
        # Gone from its path at once (the worker may still create files in it meanwhile).
        gone = run.with_name(run.name + ".deleted")
        run.rename(gone)
        shutil.rmtree(gone, ignore_errors=True)
        end = d.wait_state(job_id, "failed", "succeeded", timeout=60)
        assert end["state"] == "failed" and "was deleted" in end["reason"], end
    finally:
        d.stop()


def test_status_with_the_service_stopped_finds_its_store(tmp_path: Path) -> None:
    """With the system service stopped, `ckptd status` shows the service's jobs to whoever may
    read its store, and tells the others that permission is the reason (not "no jobs")."""
    from ckptd.state.store import Store

    service = Path(tempfile.mkdtemp(prefix="ckptd-service-"))
    try:
        service.chmod(0o711)
        store = Store.open(service)
        store.create_job("svc-job", "svc", "{}", "d", "job.yaml", str(service / "jobs" / "svc-job"))
        store.close()
        user_home = tmp_path / "user"
        r = _cli(
            user_home, "status", CKPTD_SERVICE_HOME=str(service), CKPTD_SOCKET=str(tmp_path / "none.sock")
        )
        assert r.returncode == 0 and "svc-job" in r.stdout, r
        assert "service is not running" in r.stderr and not (user_home / "ckptd.db").exists()
        if os.geteuid() != 0:
            return
        from click.testing import CliRunner

        from ckptd.daemon.cli import cli

        def as_nobody() -> list[str]:
            os.environ.update(CKPTD_SERVICE_HOME=str(service), CKPTD_SOCKET=str(service / "none.sock"))
            got = CliRunner().invoke(cli, ["--home", "/nonexistent/ckptd", "status"])
            return [got.stdout, got.stderr, got.exit_code]

        out, err, code = as_uid(65534, 65534, as_nobody)["ok"]
        assert "svc-job" not in out and "no jobs" not in out and code == 1, (out, err)
        assert "permission denied" in err and "sudo ckptd --home" in err, err
    finally:
        shutil.rmtree(service)

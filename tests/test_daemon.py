"""The daemon as a real process: API, submit idempotency, queue, cancel, recovery, graceful stop.

Workers are the protocol-speaking fake (tests/fakeworker.py) so that these tests exercise the
daemon's own logic in seconds; test_daemon_tf.py runs the real TensorFlow worker under it.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from ckptd.daemon.client import ApiRefused, DaemonUnavailable

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


@pytest.mark.timing
def test_graceful_stop_interrupts_then_resumes_at_next_start(tmp_path: Path) -> None:
    home = tmp_path / "home"
    d = start_daemon(home, **SLOW)
    job = d.submit(fake_job(tmp_path))
    wait_for("a commit", lambda: (d.job(job)["last_committed_step"] or 0) >= 20, 30)
    assert d.stop() == 0
    assert '"daemon.stopped"' in d.output()
    assert not (home / "ckptd.sock").exists()
    d2 = start_daemon(home, FAKE_STEPS="60", FAKE_STEP_SECONDS="0.01")
    try:
        done = d2.wait_state(job, "succeeded")
        first, second = done["attempt_list"]
        assert first["class"] == "preempted"
        # 0 steps lost: the next attempt starts from the checkpoint saved on the way out
        assert second["restored_step"] >= first["last_step"]
    finally:
        d2.stop()


def _worker_pid(d: DaemonProc, job: str) -> int:
    return int(
        wait_for(
            "a worker",
            lambda: d.job(job)["attempt_list"][-1]["pid"] if d.job(job).get("attempt_list") else None,
            30,
        )
    )


def _sigkill_daemon_mid_job(tmp_path: Path) -> tuple[Path, str, int]:
    """A daemon running a job that has committed step 10, killed with SIGKILL: (home, job, worker pid)."""
    home = tmp_path / "home"
    d = start_daemon(home, **SLOW)
    job = d.submit(fake_job(tmp_path))
    wait_for("a commit", lambda: (d.job(job)["last_committed_step"] or 0) >= 10, 30)
    pid = _worker_pid(d, job)
    d.stop(signal.SIGKILL)
    return home, job, pid


@pytest.mark.timing
def test_sigkilled_daemon_adopts_the_live_worker(tmp_path: Path) -> None:
    home, job, pid = _sigkill_daemon_mid_job(tmp_path)
    assert psutil.pid_exists(pid)  # the worker survives its supervisor (own session)
    d2 = start_daemon(home, **SLOW)
    try:
        done = d2.wait_state(job, "succeeded", timeout=60)
        assert [a["class"] for a in done["attempt_list"]] == ["succeeded"]
        assert done["attempt_list"][0]["pid"] == pid
        assert '"worker.adopted"' in d2.output()
    finally:
        d2.stop()


def test_a_restarted_daemon_adopts_a_worker_that_started_warm(tmp_path: Path) -> None:
    """A warm worker's command line names no run; its directory does (jobs.works_for)."""
    home = tmp_path / "home"
    d = start_daemon(home, config="warm_workers: true\n", **SLOW)
    ready = wait_for("a warm worker", lambda: sorted((home / "warm").glob("*.ready")), 30)
    job = d.submit(fake_job(tmp_path))
    wait_for("a commit", lambda: (d.job(job)["last_committed_step"] or 0) >= 10, 30)
    pid = _worker_pid(d, job)
    assert pid == int(ready[0].name.split(".")[0])
    d.stop(signal.SIGKILL)
    d2 = start_daemon(home, **SLOW)
    try:
        done = d2.wait_state(job, "succeeded", timeout=60)
        assert [(a["pid"], a["class"]) for a in done["attempt_list"]] == [(pid, "succeeded")]
        assert '"worker.adopted"' in d2.output()
    finally:
        d2.stop()


@pytest.mark.timing
def test_sigkilled_daemon_and_worker_relaunch_from_the_last_commit(tmp_path: Path) -> None:
    home, job, pid = _sigkill_daemon_mid_job(tmp_path)
    with sqlite3.connect(home / "ckptd.db") as db:
        (known,) = db.execute("SELECT last_committed_step FROM jobs WHERE id = ?", (job,)).fetchone()
    events_file = home / "jobs" / job / "events.jsonl"

    def committed() -> int:
        lines = events_file.read_text().splitlines()
        return max(json.loads(e)["step"] for e in lines if '"checkpoint.committed"' in e)

    # The orphan commits while no daemon reads its events; then it dies too.
    wait_for("a commit nobody read", lambda: committed() > known, 30)
    os.killpg(pid, signal.SIGKILL)
    wait_for(
        "the worker to die",
        lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
        10,
    )
    last = committed()
    d2 = start_daemon(home, FAKE_STEPS="60", FAKE_STEP_SECONDS="0.01")
    try:
        started = wait_for(
            "job.started",
            lambda: [json.loads(line) for line in d2.output().splitlines() if '"job.started"' in line],
            30,
        )
        assert started[0]["last_committed_step"] == last, started  # not the stale `known`
        done = d2.wait_state(job, "succeeded", timeout=60)
        first, second = done["attempt_list"]
        assert first["class"] == "lost" and "daemon restarted" in first["evidence"]
        assert second["restored_step"] == last >= 10
        exits = [
            ev for ev in d2.api("GET", f"/v1/jobs/{job}/events")["events"] if ev["event"] == "worker.exited"
        ]
        assert [ev["exit_class"] for ev in exits] == ["lost", "succeeded"], exits
    finally:
        d2.stop()


def test_submit_storm_survives_sigkill(tmp_path: Path) -> None:
    home = tmp_path / "home"
    d = start_daemon(home, FAKE_STEPS="5", FAKE_STEP_SECONDS="0.01")
    job = fake_job(tmp_path)
    acked: list[tuple[str, str]] = []
    stop = threading.Event()

    def storm(n: int) -> None:
        i = 0
        while not stop.is_set():
            key = f"storm-{n}-{i:05d}"
            try:
                acked.append((key, d.submit(job, key=key)))
            except (DaemonUnavailable, ApiRefused):
                return
            i += 1

    threads = [threading.Thread(target=storm, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    wait_for("some submits", lambda: len(acked) >= 40, 60)
    d.stop(signal.SIGKILL)
    stop.set()
    for t in threads:
        t.join()
    db = sqlite3.connect(home / "ckptd.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = dict(db.execute("SELECT submit_key, job_id FROM submissions").fetchall())
    db.close()
    for key, job_id in acked:
        assert rows.get(key) == job_id
    d2 = start_daemon(home, FAKE_STEPS="5", FAKE_STEP_SECONDS="0.01")
    try:
        for key, job_id in acked[:3]:  # a retry after the restart finds the same job
            assert d2.submit(job, key=key) == job_id
        assert len(d2.api("GET", "/v1/jobs")) == len(rows)
    finally:
        d2.stop()


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


@pytest.mark.timing
def test_second_sigterm_stops_fast(tmp_path: Path) -> None:
    d = start_daemon(tmp_path / "home", FAKE_SAVE_SECONDS="60", **SLOW)
    job = d.submit(fake_job(tmp_path))
    wait_for("a commit", lambda: (d.job(job)["last_committed_step"] or 0) >= 10, 30)
    pid = _worker_pid(d, job)
    d.proc.send_signal(signal.SIGTERM)
    wait_for("the worker to be asked", lambda: '"daemon.stopping"' in d.output(), 10)
    with pytest.raises(subprocess.TimeoutExpired):
        d.proc.wait(1.0)  # still waiting for the (slow) save
    assert d.stop(timeout=20) == 0  # the second SIGTERM kills the worker instead of waiting 60 s
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


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


@pytest.mark.timing
def test_a_worker_slow_to_exit_after_its_final_commit_still_succeeds(tmp_path: Path) -> None:
    """On a loaded box a finished worker (Phase.DONE) may take longer to exit than the silence
    limit: the hang verdict must not turn a trained job into a crash loop."""
    # The exit stall outlasts every silence limit; the start-up grace still leaves a loaded
    # box time to start the worker (a hang there is another test's subject).
    d = start_daemon(tmp_path / "home", FAKE_STEPS="20", FAKE_STEP_SECONDS="0.01", FAKE_DONE_STALL="8")
    try:
        job = tmp_path / "slow-exit.yaml"
        job.write_text(
            "name: slow-exit\nmodel: m.py:build\ncheckpoint: {every_steps: 10}\n"
            "restart: {heartbeat_timeout_seconds: 3, startup_grace_seconds: 6}\n"
        )
        (tmp_path / "m.py").write_text("")  # the fake worker imports nothing
        job_id = d.submit(job)
        end = d.wait_state(job_id, "succeeded", "failed", timeout=60)
        assert end["state"] == "succeeded", end
        assert [a["class"] for a in end["attempt_list"]] == ["succeeded"], end["attempt_list"]
    finally:
        d.stop()


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


@pytest.mark.timing
def test_a_daemon_stop_just_after_the_final_commit_leaves_the_job_succeeded(tmp_path: Path) -> None:
    """SIGTERM to the daemon while a worker, its training done and committed, is exiting: the
    job succeeded; it must not be left interrupted (and re-run) for a stop it did not need."""
    d = start_daemon(tmp_path / "home", FAKE_STEPS="20", FAKE_STEP_SECONDS="0.01", FAKE_DONE_STALL="2")
    job_id = d.submit(fake_job(tmp_path))
    run = Path(wait_for("the run", lambda: d.job(job_id)["run_dir"], 30))
    wait_for("phase done", lambda: '"phase":"done"' in _text(run / "heartbeat.json"), 30)
    assert d.stop() == 0
    from ckptd.state.store import Store

    store = Store.open(tmp_path / "home")
    assert store.job(job_id).state == "succeeded", store.job(job_id)


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


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

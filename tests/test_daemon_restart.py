"""The daemon as a real process across its own stops and deaths: graceful stop and resume,
SIGKILL and adoption of live workers (also warm ones), a second SIGTERM, submit storms, and the
edges around a job's final commit.

Workers are the protocol-speaking fake (tests/fakeworker.py), as in test_daemon.py.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import threading
from pathlib import Path

import psutil
import pytest

from ckptd.daemon.client import ApiRefused, DaemonUnavailable

from .daemonproc import DaemonProc, fake_job, start_daemon
from .procs import wait_for

SLOW = {"FAKE_STEPS": "400", "FAKE_STEP_SECONDS": "0.02"}  # ~8 s, commits every 10 steps


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
    d = start_daemon(home, config="warm_workers: true\n", FAKE_STEPS="20", FAKE_STEP_SECONDS="0.01")
    # Warm workers wait as the user of a likely job (issue 25): a first job makes its user likely.
    d.wait_state(d.submit(fake_job(tmp_path, name="first")), "succeeded")
    wait_for("a warm worker", lambda: sorted((home / "warm").glob("*/*.ready")), 30)
    assert d.stop() == 0  # a clean stop takes its warm workers with it
    assert not list((home / "warm").glob("*/*.ready"))
    d = start_daemon(home, config="warm_workers: true\n", **SLOW)
    ready = wait_for("a warm worker", lambda: sorted((home / "warm").glob("*/*.ready")), 30)
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


@pytest.mark.timing
def test_a_job_that_finished_while_the_daemon_was_frozen_is_succeeded_not_rerun(tmp_path: Path) -> None:
    """Issue 25: a daemon frozen (SIGSTOP, then the watchdog's kill) while its job finished gave
    the job a `lost` attempt and a new worker. The worker's exit_code file says it finished."""
    home = tmp_path / "home"
    d = start_daemon(home, FAKE_STEPS="150", FAKE_STEP_SECONDS="0.02")
    job = d.submit(fake_job(tmp_path))
    pid = _worker_pid(d, job)
    d.proc.send_signal(signal.SIGSTOP)

    def ended() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # its parent cannot reap it
        except psutil.NoSuchProcess:
            return True

    wait_for("the worker to finish unwatched", ended, 60)
    d.stop(signal.SIGKILL)
    d2 = start_daemon(home)
    try:
        done = d2.wait_state(job, "succeeded", timeout=60)
        assert [a["class"] for a in done["attempt_list"]] == ["succeeded"]
        assert done["attempt_list"][0]["exit_code"] == 0
    finally:
        d2.stop()


@pytest.mark.parametrize(
    ("exit_code", "done_beat", "klass"),
    [
        (0, False, "succeeded"),
        (0, True, "succeeded"),
        (None, True, "succeeded"),  # killed after its final commit: nothing was at stake
        (None, False, "lost"),
        (1, True, "lost"),  # it said it failed: not ours to call a success
        (75, False, "lost"),
    ],
)
def test_what_an_unsupervised_attempt_left_says_how_it_ended(
    exit_code: int | None, done_beat: bool, klass: str
) -> None:
    from ckptd.daemon.jobs import unsupervised_end

    assert unsupervised_end(exit_code, done_beat) == klass

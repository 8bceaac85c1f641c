"""multi_worker gangs on this box (engine local: two members on 127.0.0.1, one CPU each): a
member SIGKILLed or SIGSTOPped ends the whole gang, which restarts from the chief's newest
commit and ends tensor for tensor where an uninterrupted two-member run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ckptd.state.protocol import Heartbeat

from .conftest import ROOT, ckptd_cmd
from .daemonproc import daemon_env, start_daemon
from .procs import events, final_state_hash, finish, run_dir, start_run, status, wait_for

pytestmark = pytest.mark.tf
PROGRAM = ROOT / "tests" / "programs" / "mirrored.py"


def _job(tmp: Path, extra: str = "") -> Path:
    job = tmp / "gang.yaml"
    job.write_text(
        f"name: gang\nentrypoint: {PROGRAM}\n"
        "distribute: {strategy: multi_worker, nodes: 2}\n"
        # Synchronous saves: the subject is the gang, and an async writer would be one more
        # process importing TensorFlow per attempt (tests/test_run_tf.py covers async saves).
        "checkpoint: {every_steps: 10, mode: sync}\n"
        "restart: {max_restarts: 3, backoff_initial_seconds: 0.1, backoff_max_seconds: 0.5" + extra + "}\n"
    )
    return job


_clean: dict[str, Path] = {}


def _clean_run(tmp: Path) -> Path:
    """The uninterrupted two-member run, once per session."""
    if "run" not in _clean:
        home = tmp / "clean"
        rc, out = finish(start_run(home, str(_job(tmp))))
        assert rc == 0, out
        _clean["run"] = run_dir(home)
    return _clean["run"]


def _record(home: Path, job_id: str) -> list[dict[str, Any]]:
    """The supervisor's own events for the job (worker.spawned, gang.member_ended, ...)."""
    path = home / "supervision" / job_id / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_gang_resume(home: Path, clean: Path, root_class: str) -> None:
    killed = run_dir(home)
    attempts = status(home, killed.name)["attempt_list"]
    assert [a["class"] for a in attempts] == [root_class, "succeeded"], attempts
    assert "gang member 1" in attempts[0]["evidence"]
    assert attempts[1]["restored_step"] and attempts[1]["restored_step"] > 0
    want, got = final_state_hash(clean), final_state_hash(killed)
    assert got == want, sorted(k for k in want if got.get(k) != want[k])
    ended = [e for e in _record(home, killed.name) if e["event"] == "gang.member_ended"]
    first = {e["member"]: (e["exit_class"], e["root_cause"]) for e in ended if e["attempt"] == 1}
    assert first == {0: ("peer_lost", False), 1: (root_class, True)}
    spawned = [e for e in _record(home, killed.name) if e["event"] == "worker.spawned"]
    assert sorted((e["attempt"], e["member"]) for e in spawned) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    # Only the chief commits: member 1 kept its own files and never a checkpoint.
    member = killed / "members" / "1"
    assert (member / "heartbeat.json").exists() and not list(member.rglob("*.manifest.json"))
    assert all(m.parent == killed / "checkpoints" for m in killed.rglob("*.manifest.json"))


def test_a_member_sigkill_restarts_the_gang_bit_identical(tmp_path: Path) -> None:
    clean = _clean_run(tmp_path)
    home = tmp_path / "killed"
    rc, out = finish(start_run(home, str(_job(tmp_path)), faults="sigkill_at_step=27,attempt=1,member=1"))
    assert rc == 0, out
    _check_gang_resume(home, clean, "killed")


@pytest.mark.timing
def test_a_stopped_member_is_found_and_the_gang_restarts(tmp_path: Path) -> None:
    """SIGSTOP member 1: every member goes silent inside a collective; the stopped one is the
    root cause (hang), the chief is peer_lost; the gang restarts from the last commit."""
    clean = _clean_run(tmp_path)
    home = tmp_path / "stopped"
    job = _job(tmp_path, ", heartbeat_timeout_seconds: 4")
    proc = start_run(home, str(job), faults="step_delay=0.05")
    member = run_dir(home) / "members" / "1" / "heartbeat.json"

    def at_step_25() -> Heartbeat | None:
        hb = Heartbeat.read(member)
        return hb if hb is not None and hb.attempt == 1 and (hb.step or 0) >= 25 else None

    os.kill(wait_for("member 1 past step 25", at_step_25, 180).pid, signal.SIGSTOP)
    rc, out = finish(proc)
    assert rc == 0, out
    _check_gang_resume(home, clean, "hang")


def test_ctrl_c_the_chief_saves_for_the_gang_and_it_resumes(tmp_path: Path) -> None:
    """A stop goes to the chief, which saves (no member takes part) and leaves; the members are
    ended after it. 0 steps lost; the same job file resumes the gang to the clean result."""
    clean = _clean_run(tmp_path)
    home = tmp_path / "stop"
    job = _job(tmp_path)
    job.write_text(job.read_text().replace("every_steps: 10", "every_steps: 1000"))  # only the stop's save
    proc = start_run(home, str(job), faults="step_delay=0.05")
    chief = run_dir(home) / "heartbeat.json"
    wait_for(
        "the chief past step 20", lambda: (hb := Heartbeat.read(chief)) is not None and hb.step >= 20, 180
    )
    proc.send_signal(signal.SIGINT)
    rc, out = finish(proc)
    assert rc == 130, out
    run = run_dir(home)
    st = status(home, run.name)
    assert st["state"] == "interrupted" and st["attempt_list"][-1]["class"] == "preempted", st
    preempted = next(e for e in events(run) if e["event"] == "worker.preempted")
    assert st["last_committed_step"] == preempted["step"] >= 20  # 0 steps lost
    rc, out = finish(start_run(home, str(job)))
    assert rc == 0, out
    assert status(home, run.name)["attempt_list"][-1]["restored_step"] == preempted["step"]
    assert final_state_hash(run) == final_state_hash(clean)


def test_a_lost_supervisors_gang_is_stopped_and_resumed(tmp_path: Path) -> None:
    """`ckptd run` SIGKILLed: its gang trains on (own sessions). The next `ckptd run` asks the
    chief to save, kills the other members, records the attempt lost and restarts the gang."""
    import psutil

    clean = _clean_run(tmp_path)
    home = tmp_path / "lost"
    job = _job(tmp_path)
    proc = start_run(home, str(job), faults="step_delay=0.05")
    run = run_dir(home)
    member = run / "members" / "1" / "heartbeat.json"
    chief = wait_for(
        "a commit",
        lambda: (hb := Heartbeat.read(run / "heartbeat.json")) and (hb.committed_step or 0) >= 10 and hb,
    )
    pids = [chief.pid, wait_for("member 1", lambda: Heartbeat.read(member)).pid]
    proc.kill()
    proc.communicate(timeout=30)
    assert all(psutil.pid_exists(p) for p in pids)  # the gang is still training
    rc, out = finish(start_run(home, str(job)))
    assert rc == 0, out
    attempts = status(home, run.name)["attempt_list"]
    assert attempts[0]["class"] == "lost" and "gang:" in attempts[0]["evidence"], attempts[0]
    assert attempts[-1]["class"] == "succeeded"
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)
    assert final_state_hash(run) == final_state_hash(clean)


def test_a_member_that_cannot_see_the_checkpoints_is_a_config_error(tmp_path: Path) -> None:
    """Members on machines without shared storage: found before the first step, named, not
    retried (it would fail the same way)."""
    home = tmp_path / "unshared"
    rc, out = finish(start_run(home, str(_job(tmp_path)), faults="unshared_storage=1,member=1"))
    assert rc != 0, out
    (attempt,) = status(home, run_dir(home).name)["attempt_list"]
    assert attempt["class"] == "config_error", attempt
    assert "is not shared by the gang" in attempt["evidence"], attempt["evidence"]


def test_a_gang_submitted_to_the_daemon_survives_a_member_sigkill(tmp_path: Path) -> None:
    """End to end through the service: submit, member 1 SIGKILLed, the daemon restarts the
    gang; `ckptd status` shows each member's host and class."""
    clean = _clean_run(tmp_path)
    home = tmp_path / "home"
    d = start_daemon(home, fake=False, CKPTD_FAULTS="sigkill_at_step=27,attempt=1,member=1")
    try:
        job = d.submit(_job(tmp_path))
        done = d.wait_state(job, "succeeded", "failed", timeout=300)
        assert done["state"] == "succeeded", done
        first, second = done["attempt_list"]
        assert (first["class"], second["class"]) == ("killed", "succeeded")
        assert [(m["member"], m["exit_class"], m["root_cause"]) for m in first["members"]] == [
            (0, "peer_lost", False),
            (1, "killed", True),
        ]
        assert all(m["host"].startswith("127.0.0.1:") for m in first["members"] + second["members"])
        assert final_state_hash(Path(done["run_dir"])) == final_state_hash(clean)
        shown = subprocess.run(
            ckptd_cmd("status", job),
            env=daemon_env(home, fake=False),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "member 1 on 127.0.0.1:" in shown.stdout and "killed  (root cause)" in shown.stdout, (
            shown.stdout
        )
    finally:
        d.stop()


def _threads(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return next(int(line.split()[1]) for line in text.splitlines() if line.startswith("Threads:"))


def test_a_members_threads_stay_within_its_share(tmp_path: Path) -> None:
    """Issue 25: members aborted when no thread could be created. A per-collective timeout gave
    each collective a thread sleeping that long (~500 threads per member by step 44 here) and
    the gRPC client kept 64 polling threads; with the pools sized to the member's CPU share a
    member's count stays flat (measured 43-48 on 2 CPUs), read from /proc through the run."""
    home = tmp_path / "threads"
    proc = start_run(home, str(_job(tmp_path)), faults="step_delay=0.05")
    run = run_dir(home)
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    bound = 80 + 4 * share  # the plan's pools (intra, inter, gRPC queues and callbacks) and a margin
    seen: dict[int, list[tuple[int, int]]] = {0: [], 1: []}  # member: (step, threads)

    def sample() -> bool:
        """Every member's thread count at its step now; True once the gang's run has ended."""
        for i, hb_file in ((0, run / "heartbeat.json"), (1, run / "members" / "1" / "heartbeat.json")):
            hb = Heartbeat.read(hb_file)
            n = _threads(hb.pid) if hb is not None and hb.step else None
            if hb is not None and n is not None:
                seen[i].append((hb.step, n))
        return proc.poll() is not None

    wait_for("the gang's run to end", sample, 300, interval=0.05)
    rc, out = finish(proc)
    assert rc == 0, out
    for i, samples in seen.items():
        assert any(step >= 30 for step, _ in samples), (i, samples[-5:])  # late in the run
        assert max(n for _, n in samples) <= bound, (i, bound, sorted(samples, key=lambda s: -s[1])[:5])

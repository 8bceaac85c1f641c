"""Every failure class from a real worker, injected with the test-only CKPTD_FAULTS hooks."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from ckptd.supervisor import cgroups, kmsg

from .conftest import ckptd_cmd, env_with, write_job
from .procs import finish, heartbeat_when, run_dir, start_run, status

pytestmark = pytest.mark.tf
FAST_HANG = (
    "restart: {max_restarts: 3, backoff_initial_seconds: 0.1, backoff_max_seconds: 0.5, "
    "heartbeat_timeout_seconds: 3, startup_grace_seconds: 120}\n"
)


def _job(tmp_path: Path, extra: str = "") -> Path:
    job = write_job(tmp_path, epochs=2, extra=extra)
    if "restart:" in extra:  # replace the default restart section (the first one) by ours
        lines = job.read_text().splitlines()
        first = next(i for i, ln in enumerate(lines) if ln.startswith("restart:"))
        job.write_text("\n".join(lines[:first] + lines[first + 1 :]) + "\n")
        assert "heartbeat_timeout" not in extra or "heartbeat_timeout" in job.read_text()
    return job


def _classes(home: Path) -> tuple[list[str], dict[str, object]]:
    st = status(home, run_dir(home).name)
    return [a["class"] for a in st["attempt_list"]], st


@pytest.mark.parametrize(
    ("faults", "klass", "evidence"),
    [
        ("raise_at_step=30,attempt=1", "crash", "RuntimeError: injected fault at step 30"),
        ("gpu_fault_at_step=30,attempt=1", "gpu_fault", "CUDA_ERROR_ECC_UNCORRECTABLE"),
        ("gpu_oom_at_step=30,attempt=1", "gpu_oom", "ResourceExhaustedError"),
    ],
)
def test_error_classes_then_recovery(tmp_path: Path, faults: str, klass: str, evidence: str) -> None:
    home = tmp_path / "home"
    rc, out = finish(start_run(home, str(_job(tmp_path)), faults=faults))
    assert rc == 0, out
    classes, st = _classes(home)
    assert classes == [klass, "succeeded"]
    first = st["attempt_list"][0]  # type: ignore[index]
    assert evidence in first["evidence"] and evidence in (first["error"] or "")
    assert first["last_step"] >= 20 and st["attempt_list"][1]["restored_step"] == 20  # type: ignore[index]


@pytest.mark.timing
def test_deadlocked_step_loop_is_a_hang_with_stacks(tmp_path: Path) -> None:
    home = tmp_path / "home"
    rc, out = finish(start_run(home, str(_job(tmp_path, FAST_HANG)), faults="hang_at_step=30,attempt=1"))
    assert rc == 0, out
    assert _classes(home)[0] == ["hang", "succeeded"]
    stderr = (run_dir(home) / "attempts" / "0001" / "stderr.log").read_text()
    assert "faults.py" in stderr and "after_step" in stderr  # the stack of the stuck loop


@pytest.mark.timing
def test_sigstop_is_a_hang(tmp_path: Path) -> None:
    home = tmp_path / "home"
    proc = start_run(home, str(_job(tmp_path, FAST_HANG)), faults="step_delay=0.02")
    hb = heartbeat_when(run_dir(home), lambda h: h.attempt == 1 and (h.committed_step or 0) >= 20)
    os.kill(hb.pid, signal.SIGSTOP)
    rc, out = finish(proc)
    assert rc == 0, out
    assert _classes(home)[0] == ["hang", "succeeded"]


@pytest.mark.timing
@pytest.mark.parametrize("enforcement", ["cgroup", "rss"])
def test_memory_limit_is_host_oom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, enforcement: str) -> None:
    """The kernel enforces the limit in the attempt's memory cgroup (its oom_kill count is the
    evidence); where no cgroup can be made, ckptd watches RSS and kills at the limit itself."""
    if enforcement == "cgroup" and cgroups.parent_cgroup() is None:
        pytest.skip("no writable memory cgroup here")
    if enforcement == "rss":
        monkeypatch.setenv("CKPTD_MEMORY_CGROUPS", "0")
    home = tmp_path / "home"
    extra = "resources: {memory_limit: 1500MiB}\n"
    rc, out = finish(start_run(home, str(_job(tmp_path, extra)), faults="hog_at_step=30,attempt=1"))
    assert rc == 0, out
    classes, st = _classes(home)
    assert classes == ["host_oom", "succeeded"]
    evidence = st["attempt_list"][0]["evidence"]  # type: ignore[index]
    assert "memory_limit" in evidence
    assert ("kernel OOM kill in cgroup" in evidence) == (enforcement == "cgroup"), evidence
    said = [line for line in out.splitlines() if '"memory.enforcement"' in line]
    assert len(said) == 1 and ('"how": "rss"' in said[0]) == (enforcement == "rss"), said


def test_the_rss_watch_counts_what_the_job_allocates_not_mapped_libraries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cold worker maps ~0.4 GB of TensorFlow's shared libraries (page cache, which a memory
    cgroup charges to whoever read it first) and allocates ~0.2 GB itself: a 300 MiB limit
    holds under the RSS watch as it does in a cgroup (it killed every cold start before)."""
    monkeypatch.setenv("CKPTD_MEMORY_CGROUPS", "0")
    home = tmp_path / "home"
    rc, out = finish(start_run(home, str(_job(tmp_path, "resources: {memory_limit: 300MiB}\n"))))
    assert rc == 0, out
    assert _classes(home)[0] == ["succeeded"]


def test_oom_kill_outside_ckptd_cgroups_is_host_oom_from_the_kernel_log(tmp_path: Path) -> None:
    """A limit ckptd did not set (a unit's, a container's: here a cgroup the test puts the whole
    `ckptd run` in) is reached: the enclosing cgroup's oom_kill counter and, where it can be
    read, the kernel log's "Killed process PID" are the evidence."""
    outer = cgroups.create(f"ckptd-test-outer-{os.getpid()}", 1500 * 2**20)
    if outer is None:
        pytest.skip("no writable memory cgroup here")
    home = tmp_path / "home"
    env = env_with(home) | {"CKPTD_FAULTS": "hog_at_step=30,attempt=1", "CKPTD_MEMORY_CGROUPS": "0"}
    try:
        proc = subprocess.Popen(
            ckptd_cmd("run", "--progress", "json", str(_job(tmp_path))),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=lambda: outer.add(os.getpid()),
        )
        rc, out = finish(proc)
    finally:
        outer.remove()
    assert rc == 0, out
    classes, st = _classes(home)
    assert classes == ["host_oom", "succeeded"], st
    first = st["attempt_list"][0]  # type: ignore[index]
    evidence = first["evidence"]
    assert f"oom_kill of enclosing cgroup {outer.path} rose 0→1" in evidence, evidence
    if kmsg.read_oom_kills():  # readable here (root or CAP_SYSLOG)
        assert f"kernel log: Memory cgroup out of memory: Killed process {first['pid']} " in evidence, (
            evidence
        )


@pytest.mark.timing
def test_crash_loop_at_the_same_step_fails_the_job(tmp_path: Path) -> None:
    home = tmp_path / "home"
    job = _job(
        tmp_path, "restart: {max_restarts: 10, backoff_initial_seconds: 0.1, backoff_max_seconds: 0.2}\n"
    )
    rc, out = finish(start_run(home, str(job), faults="raise_at_step=30"))
    assert rc == 1, out
    classes, st = _classes(home)
    # the first attempt made progress (committed step 20); three more die at step 30 from 20
    assert classes == ["crash"] * 4
    assert "crash loop" in str(st["reason"])


@pytest.mark.timing
def test_a_save_longer_than_the_heartbeat_timeout_is_not_a_hang(tmp_path: Path) -> None:
    """No false alarm: saving gets the start-up grace, not heartbeat_timeout (3 s here)."""
    home = tmp_path / "home"
    job = write_job(tmp_path, epochs=1, every_steps=40, extra=FAST_HANG)
    lines = job.read_text().splitlines()
    job.write_text(
        "\n".join(
            ln for i, ln in enumerate(lines) if not (ln.startswith("restart:") and "heartbeat" not in ln)
        )
        + "\n"
    )
    rc, out = finish(start_run(home, str(job), faults="save_delay=4.5"))
    assert rc == 0, out
    classes, st = _classes(home)
    assert classes == ["succeeded"], st
    assert st["last_committed_step"] == 52


@pytest.mark.timing
def test_a_validation_longer_than_the_heartbeat_timeout_is_not_a_hang(tmp_path: Path) -> None:
    """Validation beats per batch: 26 batches of 0.2 s (5 s) against a 3 s heartbeat timeout."""
    home = tmp_path / "home"
    rc, out = finish(start_run(home, str(_job(tmp_path, FAST_HANG)), faults="val_delay=0.2"))
    assert rc == 0, out
    assert _classes(home)[0] == ["succeeded"]

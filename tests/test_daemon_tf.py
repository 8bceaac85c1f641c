"""The daemon with the real TensorFlow worker: graceful stop and resume, export, load_weights."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ckptd.state.store import Store

from .conftest import CSV, EXAMPLE, GOLDEN_EPOCHS, ckptd_cmd, write_job
from .daemonproc import DaemonProc, daemon_env, start_daemon
from .procs import events, final_state_hash, wait_for

pytestmark = pytest.mark.tf


@pytest.mark.conformance  # a daemon stop and restart around a full-length job: ~45 CPU-seconds
def test_stop_resume_export(tmp_path: Path, golden: dict[str, str]) -> None:
    home = tmp_path / "home"
    d = start_daemon(home, fake=False, CKPTD_FAULTS="step_delay=0.01")
    job = d.submit(write_job(tmp_path, epochs=GOLDEN_EPOCHS))
    wait_for("step 60 committed", lambda: (d.job(job)["last_committed_step"] or 0) >= 60, 120)
    t0 = time.monotonic()
    assert d.stop() == 0
    stop_seconds = time.monotonic() - t0
    store = Store.open(home)
    assert store.job(job).state == "interrupted"
    saved = store.job(job).last_committed_step
    store.close()
    print(f"daemon stop with one training worker: {stop_seconds:.2f} s")

    d = start_daemon(home, fake=False)
    try:
        done = d.wait_state(job, "succeeded", "failed", timeout=180)
        assert done["state"] == "succeeded", done
        first, second = done["attempt_list"]
        assert first["class"] == "preempted" and second["restored_step"] == saved
        assert final_state_hash(Path(done["run_dir"])) == golden  # as if never stopped
        env = daemon_env(home, fake=False)
        for which, name in (("--best", "best.hdf5"), ("--latest", "latest.hdf5")):
            r = subprocess.run(
                ckptd_cmd("export", job, which, "-o", str(tmp_path / name)),
                env=env,
                capture_output=True,
                text=True,
                timeout=180,
            )
            assert r.returncode == 0, r.stderr
    finally:
        d.stop()
    code = (
        f"import sys; sys.path.insert(0, {str(EXAMPLE)!r})\n"
        "from model import build\n"
        f"m, (x, y) = build({{'csv': {str(CSV)!r}}})\n"
        f"m.load_weights({str(tmp_path / 'latest.hdf5')!r})\n"
        "a = m.evaluate(x, y, verbose=0, return_dict=True)['accuracy']\n"
        f"m.load_weights({str(tmp_path / 'best.hdf5')!r})\n"
        "b = m.evaluate(x, y, verbose=0, return_dict=True)['accuracy']\n"
        "print(a, b)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout.split()
    assert all(0.5 <= float(v) <= 1.0 for v in out[-2:]), out


def _warm_for_a_likely_user(d: DaemonProc, tmp_path: Path) -> list[Path]:
    """Warm workers wait as the user of a likely job (issue 25): a first job of this user makes
    one likely; then a warm worker with TensorFlow imported, as that user, is ready."""
    first = d.submit(write_job(tmp_path / "first", name="first", epochs=1))
    assert d.wait_state(first, "succeeded", "failed", timeout=180)["state"] == "succeeded"
    return list(
        wait_for("a warm worker with TensorFlow imported", lambda: sorted(d.home.glob("warm/*/*.ready")), 120)
    )


def test_a_warm_worker_takes_the_next_job_and_none_outlives_the_daemon(tmp_path: Path) -> None:
    """One warm worker per free slot: the job's first attempt runs in it (no TensorFlow import
    on the critical path), a new one is started once the slot is free again, and stopping the
    daemon leaves no warm worker behind."""
    home = tmp_path / "home"
    d = start_daemon(home, fake=False, config="warm_workers: true\n")
    try:
        first = _warm_for_a_likely_user(d, tmp_path)
        warm_pid = int(first[0].name.split(".")[0])
        t0 = time.monotonic()
        job = d.submit(write_job(tmp_path, epochs=2))
        done = d.wait_state(job, "succeeded", "failed", timeout=180)
        assert done["state"] == "succeeded", done
        assert [a["pid"] for a in done["attempt_list"]] == [warm_pid]
        run = Path(done["run_dir"])
        steps = [e for e in events(run) if e["event"] == "training.first_step"]
        first_step = steps[0]["ts"] - (time.time() - (time.monotonic() - t0))
        print(f"submit → first training step, in a warm worker: {first_step:.2f} s")
        assert "worker.warm_assigned" in d.output()
        again = wait_for(
            "a new warm worker for the free slot",
            lambda: [p for p in home.glob("warm/*/*.ready") if p != first[0]],
            120,
        )
        assert d.api("GET", "/v1/health")["warm_workers"] == 1
        survivor = int(again[0].name.split(".")[0])
    finally:
        assert d.stop() == 0
    assert not psutil.pid_exists(survivor) or psutil.Process(survivor).status() == "zombie"


@pytest.mark.parametrize("enforcement", ["cgroup", "rss"])
def test_a_warm_workers_import_is_not_charged_to_the_job(tmp_path: Path, enforcement: str) -> None:
    """resources.memory_limit below TensorFlow's import (~0.5 GB): a warm worker, whose import
    was made before it had a job, trains the job within the limit, whichever enforcement is in
    force (a cgroup keeps the import's charge where it was made; the RSS watch counts from the
    hand-over). The daemon says once which one that is."""
    from ckptd.supervisor import cgroups

    extra = {}
    if enforcement == "rss":
        extra["CKPTD_MEMORY_CGROUPS"] = "0"
    elif cgroups.parent_cgroup() is None:
        pytest.skip("no writable memory cgroup here")
    home = tmp_path / "home"
    limit = 300 * 2**20
    d = start_daemon(home, fake=False, config="warm_workers: true\n", **extra)
    try:
        ready = _warm_for_a_likely_user(d, tmp_path)
        imported = psutil.Process(int(ready[0].name.split(".")[0])).memory_info().rss
        assert imported > limit, imported  # else this test proves nothing
        job = d.submit(write_job(tmp_path, epochs=1, extra="resources: {memory_limit: 300MiB}\n"))
        done = d.wait_state(job, "succeeded", "failed", timeout=180)
        assert [a["class"] for a in done["attempt_list"]] == ["succeeded"], done
    finally:
        d.stop()
    assert '"worker.warm_assigned"' in d.output()  # the journal: the attempt was the warm one
    lines = [line for line in d.output().splitlines() if '"memory.enforcement"' in line]
    assert len(lines) == 1, lines
    assert ('"how": "rss"' in lines[0]) == (enforcement == "rss"), lines

"""Real-process tests of the memory tier (docs/memory-tier.md): `ckptd run` trains the Pima
example with snapshots in RAM every 5 steps and durable commits every 100; faults are real
signals, and every resume must end bit-identical to an uninterrupted run."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from .conftest import GOLDEN_EPOCHS, write_job
from .procs import events, final_state_hash, finish, heartbeat_when, run_dir, start_run, status, wait_for

pytestmark = pytest.mark.tf
MEMORY_EVERY = 5
DURABLE_EVERY = 100


def tier_job(tmp_path: Path, root: Path) -> Path:
    """The golden job (write_job, GOLDEN_EPOCHS) with durable commits every DURABLE_EVERY steps
    and a memory tier under `root` every MEMORY_EVERY (also tests/test_trust.py's)."""
    job = write_job(tmp_path, epochs=GOLDEN_EPOCHS, every_steps=DURABLE_EVERY, mode="async")
    text = job.read_text().replace(
        "mode: async}", f"mode: async, memory: {{every_steps: {MEMORY_EVERY}, dir: {root}}}}}"
    )
    job.write_text(text)
    return job


def _events(run: Path, kind: str) -> list[dict[str, Any]]:
    return [e for e in events(run) if e["event"] == kind]


def test_sigkill_resumes_from_the_memory_tier_bit_identical(
    tmp_path: Path, tier_root: Path, golden: dict[str, str]
) -> None:
    home = tmp_path / "home"
    proc = start_run(home, str(tier_job(tmp_path, tier_root)), faults="step_delay=0.02")
    run = run_dir(home)
    hb = heartbeat_when(run, lambda h: h.attempt == 1 and h.step >= 130)
    os.kill(hb.pid, signal.SIGKILL)
    rc, out = finish(proc)
    assert rc == 0, out
    a1, a2 = status(home, run.name)["attempt_list"]
    assert a1["class"] == "killed"
    restored = [e for e in _events(run, "restore.done") if e["attempt"] == 2]
    assert restored and restored[0]["source"] == "memory", restored
    # Newer than the durable commit at step 100, and at most one memory interval behind the
    # step the heartbeat showed before the kill.
    assert a2["restored_step"] == restored[0]["step"]
    assert hb.step - MEMORY_EVERY <= int(a2["restored_step"]) and int(a2["restored_step"]) > DURABLE_EVERY
    assert restored[0]["durable_step"] == DURABLE_EVERY
    # Attempt 2 ran to the end, so all its reports are there: every due snapshot was taken, or
    # skipped because the previous one was still being written (a few at most), none failed.
    reports = [e for e in _events(run, "memory.snapshots") if e["attempt"] == 2]
    due = GOLDEN_EPOCHS * 52 // MEMORY_EVERY - int(a2["restored_step"]) // MEMORY_EVERY
    taken, busy = (sum(int(e[k]) for e in reports) for k in ("taken", "busy"))
    assert taken + busy == due and taken >= due // 2 and not any(e["failed"] for e in reports), reports
    assert final_state_hash(run) == golden


def test_a_damaged_snapshot_is_quarantined_and_the_previous_one_restores(
    tmp_path: Path, tier_root: Path, golden: dict[str, str]
) -> None:
    """Supervisor and worker both SIGKILLed, the newest snapshot's values damaged in RAM: the
    same `ckptd run` again quarantines it and resumes from the snapshot before it."""
    home = tmp_path / "home"
    job = tier_job(tmp_path, tier_root)
    proc = start_run(home, str(job), faults="step_delay=0.02")
    run = run_dir(home)
    hb = heartbeat_when(run, lambda h: h.attempt == 1 and h.step >= 130)
    proc.kill()
    proc.communicate(timeout=30)
    os.kill(hb.pid, signal.SIGKILL)
    wait_for("the worker to be gone", lambda: not psutil.pid_exists(hb.pid), 30)
    tier = tier_root / run.name
    snaps = sorted(p for p in tier.iterdir() if p.name.startswith("snap-"))
    assert len(snaps) == 2, snaps  # keep: 2 (the default)
    values = snaps[-1] / "values.bin"
    data = bytearray(values.read_bytes())
    data[len(data) // 2] ^= 0xFF
    values.write_bytes(bytes(data))
    rc, out = finish(start_run(home, str(job)))
    assert rc == 0, out
    quarantined = _events(run, "memory.quarantined")
    assert [e["snapshot"] for e in quarantined] == [snaps[-1].name], quarantined
    assert "digest" in str(quarantined[0]["reason"])
    restored = _events(run, "restore.done")[-1]
    assert restored["source"] == "memory" and restored["snapshot"] == snaps[0].name, restored
    assert final_state_hash(run) == golden


@pytest.fixture
def full_tmpfs(tier_root: Path) -> Iterator[Path]:
    """A tier root that is a tmpfs of its own, 64 KiB and filled up before the job starts: every
    snapshot meets ENOSPC, whatever the model's size. Unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    tier_root.mkdir(mode=0o700)
    cmd = ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(tier_root)]
    mounted = subprocess.run(cmd, capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs at {tier_root}: {mounted.stderr.strip()}")
    try:
        fd = os.open(tier_root / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with contextlib.suppress(OSError):  # ENOSPC: full
                while os.write(fd, bytes(4096)):
                    pass
        finally:
            os.close(fd)
        assert os.statvfs(tier_root).f_bavail == 0
        yield tier_root
    finally:
        subprocess.run(["umount", str(tier_root)], check=True)


def test_a_full_tmpfs_fails_the_snapshots_not_the_job(
    tmp_path: Path, full_tmpfs: Path, golden: dict[str, str]
) -> None:
    home = tmp_path / "home"
    rc, out = finish(start_run(home, str(tier_job(tmp_path, full_tmpfs))))
    assert rc == 0, out
    run = run_dir(home)
    attempts = status(home, run.name)["attempt_list"]
    assert [a["class"] for a in attempts] == ["succeeded"], attempts  # no worker died of it
    failed = _events(run, "memory.failed")
    assert failed and all("No space left" in e["error"] for e in failed), failed
    # Every due snapshot failed, or was skipped while the one before it was failing.
    reports = _events(run, "memory.snapshots")
    taken, busy, lost = (sum(int(e[k]) for e in reports) for k in ("taken", "busy", "failed"))
    assert taken == 0 and lost and busy + lost == GOLDEN_EPOCHS * 52 // MEMORY_EVERY, reports
    steps = [e["step"] for e in _events(run, "checkpoint.committed")]
    # Durable commits go on (one due while the one before is written may be coalesced).
    final = GOLDEN_EPOCHS * 52
    assert steps[0] == DURABLE_EVERY and steps[-1] == final, steps
    assert set(steps) <= {DURABLE_EVERY, 2 * DURABLE_EVERY, final}, steps
    assert final_state_hash(run) == golden
    assert not os.path.lexists(full_tmpfs / run.name), out  # the tier still goes with the job

"""The memory tier from the supervisor's side (ckptd.supervisor.tier): the pure decisions (which
ends remove it, an attempt's memory.max beside it), its measurement and removal with the owner's
rights, the daemon's start-up sweep of ended jobs' tiers, and the heartbeat's
`memory_tier_bytes` as `ckptd status` shows it. The runner's use of them: test_tier_supervisor.py;
a real `ckptd run`: test_tier_run.py."""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from ckptd.daemon import recovery
from ckptd.daemon.api import Peer
from ckptd.daemon.backend import ApiBackend, Registry
from ckptd.daemon.drain import Drainer
from ckptd.daemon.report import describe_live
from ckptd.state import memtier
from ckptd.state.jobspec import JobSpec, spec_digest, spec_json
from ckptd.state.protocol import Event, Heartbeat
from ckptd.state.states import JobState
from ckptd.state.store import Store
from ckptd.state.submissions import Owner, submit
from ckptd.supervisor import identity, tier
from ckptd.supervisor.tier import MIN_ATTEMPT_BYTES, OwnedTier, TierMeter, attempt_limit, ends_tier

GiB, MiB = 1 << 30, 1 << 20


@pytest.fixture
def shm_root() -> Iterator[Path]:
    """A private root on the real tmpfs, as checkpoint.memory.dir would name one."""
    root = Path("/dev/shm") / f"ckptd-test-{uuid.uuid4().hex[:12]}"
    os.mkdir(root, 0o700)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize(
    ("limit", "tier_bytes", "expected", "why"),
    [
        (None, 0, None, "no limit: none for the attempt"),
        (None, 10 * GiB, None, "no limit, whatever the tier holds"),
        (4 * GiB, 0, 4 * GiB, "an empty tier takes nothing"),
        (4 * GiB, 1 * GiB, 3 * GiB, "the tier's bytes come off the limit"),
        (4 * GiB, 4 * GiB - 1, MIN_ATTEMPT_BYTES, "never below the floor"),
        (4 * GiB, 10 * GiB, MIN_ATTEMPT_BYTES, "a tier beyond the limit: the floor"),
        (256 * MiB, 0, 256 * MiB, "a limit below the floor is kept as it is"),
        (256 * MiB, 200 * MiB, 256 * MiB, "the floor never exceeds the job's limit"),
        (4 * GiB, -5, 4 * GiB, "a nonsense negative measure adds nothing"),
    ],
)
def test_attempt_limit(limit: int | None, tier_bytes: int, expected: int | None, why: str) -> None:
    assert attempt_limit(limit, tier_bytes) == expected, why


@pytest.mark.parametrize(
    ("state", "removes"),
    [
        (JobState.SUCCEEDED, True),
        (JobState.FAILED, True),
        (JobState.CANCELLED, True),
        (JobState.INTERRUPTED, False),  # a drain or a stop: it resumes from the tier
        (JobState.QUEUED, False),  # requeued after a lost supervisor
        (JobState.RUNNING, False),
        (JobState.BACKOFF, False),
    ],
)
def test_which_ends_remove_the_tier(state: JobState, removes: bool) -> None:
    assert ends_tier(state) is removes


def test_every_state_is_decided() -> None:
    assert set(JobState) == set(tier.END_STATES) | {
        JobState.INTERRUPTED,
        JobState.QUEUED,
        JobState.RUNNING,
        JobState.BACKOFF,
    }


def test_meter_measures_at_most_every_few_seconds() -> None:
    now, calls = [0.0], []

    def measure() -> int:
        calls.append(now[0])
        return len(calls) * 100

    meter = TierMeter(measure, lambda: now[0], every=5.0)
    seen = []
    for _ in range(49):  # 12 s of 0.25 s polls
        seen.append(meter())
        now[0] += 0.25
    assert calls == [0.0, 5.0, 10.0]
    assert seen[0] == 100 and seen[20] == 200 and seen[-1] == 300  # the cached value in between


def _spec(memory: dict[str, object] | None, monkeypatch: pytest.MonkeyPatch) -> JobSpec:
    ckpt: dict[str, object] = {"mode": "async", "every_steps": 100}
    if memory is not None:
        ckpt["memory"] = memory
    return JobSpec.model_validate({"name": "t", "model": "m.mod:build", "checkpoint": ckpt}, strict=False)


def test_for_job_names_the_tier_of_the_jobs_owner(monkeypatch: pytest.MonkeyPatch, shm_root: Path) -> None:
    alice = Owner(1234, 1234)
    assert tier.for_job(_spec(None, monkeypatch), "j1", alice) is None  # no section, no tier
    default = tier.for_job(_spec({"every_steps": 10}, monkeypatch), "j1", alice)
    assert default == OwnedTier(Path("/dev/shm/ckptd-1234/j1"), alice)
    named = tier.for_job(_spec({"every_steps": 10, "dir": str(shm_root)}, monkeypatch), "j1", alice)
    assert named == OwnedTier(shm_root / "j1", alice)


def _fill(shm_root: Path, job_id: str) -> Path:
    path = memtier.open_tier(str(shm_root), job_id, os.geteuid())
    snap = path / memtier.snapshot_name(20, 1)
    os.mkdir(snap, 0o700)
    (snap / memtier.VALUES).write_bytes(b"\1" * 3 * 4096)
    os.symlink("/etc", path / "planted")  # never followed: neither measured nor removed through
    return path


def test_measure_and_remove_as_ourselves(shm_root: Path) -> None:
    path = _fill(shm_root, "j1")
    t = OwnedTier(path, identity.me())
    assert t.bytes() == memtier.tier_bytes(path) >= 3 * 4096  # the worker's measure, the same
    t.remove()
    assert not path.exists() and shm_root.is_dir() and Path("/etc/passwd").exists()
    assert t.bytes() == 0
    t.remove()  # already gone: fine


def test_the_measure_follows_no_symlink(shm_root: Path) -> None:
    """The owner swaps the tier (or a directory in it) for a symlink: root's measure does not
    walk there."""
    elsewhere = _fill(shm_root, "elsewhere")
    os.mkdir(shm_root / "j1", 0o700)
    os.symlink(elsewhere, shm_root / "j1" / "sub")
    assert memtier.tier_bytes(shm_root / "j1") == 0
    os.symlink(elsewhere, shm_root / "j2")
    with pytest.raises(OSError):
        memtier.tier_bytes(shm_root / "j2")
    assert OwnedTier(shm_root / "j2", identity.me()).bytes() == 0


def test_removal_in_a_child_as_the_owner(shm_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon's way for another user's job: `python -m ckptd.supervisor.tier` started with
    the owner's rights. The switch itself needs two accounts (tests/test_trust.py); here the
    child runs as us, but through the same command line, exit code and error report."""
    monkeypatch.setattr(identity, "needs_switch", lambda owner: True)
    path = _fill(shm_root, "j1")
    OwnedTier(path, identity.me()).remove()
    assert not path.exists() and shm_root.is_dir()
    os.symlink(shm_root, shm_root.parent / f"{shm_root.name}-link")
    try:  # a symlink on the way is refused, and the child's reason comes back
        moved = _fill(shm_root, "j2")
        with pytest.raises(OSError, match="j2"):
            OwnedTier(shm_root.parent / f"{shm_root.name}-link" / "j2", identity.me()).remove()
        assert moved.is_dir()
    finally:
        os.unlink(shm_root.parent / f"{shm_root.name}-link")


def test_the_childs_command_line(shm_root: Path) -> None:
    assert tier.main([]) == 2 and tier.main(["relative/dir"]) == 2
    assert tier.main([str(shm_root / ".." / "x")]) == 2
    path = _fill(shm_root, "j1")
    assert tier.main([str(path)]) == 0 and not path.exists()


class _Failing:
    path = Path("/dev/shm")  # exists: the removal is attempted

    def bytes(self) -> int:
        return 0

    def remove(self) -> None:
        raise OSError("Permission denied")


def test_a_failed_removal_is_logged_not_raised() -> None:
    with structlog.testing.capture_logs() as logs:
        tier.remove_logged(_Failing(), "j1", structlog.get_logger())
    assert logs == [
        {
            "event": Event.MEMORY_TIER_REMOVE_FAILED,
            "job_id": "j1",
            "tier": "/dev/shm",
            "error": "Permission denied",
            "log_level": "warning",
        }
    ]


def _daemon_job(store: Store, job_id: str, spec: JobSpec, state: JobState) -> None:
    submit(
        store, job_id, "t", spec_json(spec), spec_digest(spec), "f", f"/r/{job_id}", identity.me(), 0, None
    )
    path = {
        JobState.QUEUED: [],
        JobState.SUCCEEDED: [JobState.RUNNING, JobState.SUCCEEDED],
        JobState.FAILED: [JobState.RUNNING, JobState.FAILED],
        JobState.CANCELLED: [JobState.CANCELLED],
        JobState.INTERRUPTED: [JobState.RUNNING, JobState.INTERRUPTED],
    }[state]
    for s in path:
        store.transition(job_id, s)


def test_start_up_removes_the_tiers_of_ended_jobs_only(
    tmp_path: Path, shm_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _spec({"every_steps": 10, "dir": str(shm_root)}, monkeypatch)
    store = Store.open(tmp_path)
    states = [JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.INTERRUPTED, JobState.QUEUED]
    for s in states:
        _daemon_job(store, f"job-{s}", spec, s)
        _fill(shm_root, f"job-{s}")
    _daemon_job(store, "no-tier", spec, JobState.SUCCEEDED)  # asked for one, never wrote it
    found = recovery.ended_tiers(store)
    assert [job_id for job_id, _ in found] == ["job-cancelled", "job-failed", "job-succeeded"]
    with structlog.testing.capture_logs() as logs:
        recovery.remove_ended_tiers(store, structlog.get_logger())
    assert sorted(p.name for p in shm_root.iterdir()) == ["job-interrupted", "job-queued"]
    assert [e["event"] for e in logs] == ["memory.tier_removed"] * 3
    assert recovery.ended_tiers(store) == []


def test_heartbeat_memory_tier_bytes_is_read_tolerantly(tmp_path: Path) -> None:
    path = tmp_path / "hb.json"
    base = '{"pid": 1, "attempt": 1, "seq": 1, "phase": "training", "time": 1.0'
    for extra, expected in [
        ("", 0),  # a worker of before the tier
        (', "memory_tier_bytes": 123456', 123456),
        (', "memory_tier_bytes": -1', 0),
        (', "memory_tier_bytes": "lots"', 0),
        (', "memory_tier_bytes": true', 0),
        (', "memory_tier_bytes": 1.5', 0),
    ]:
        path.write_text(base + extra + "}")
        hb = Heartbeat.read(path)
        assert hb is not None and hb.memory_tier_bytes == expected, extra
    beat = Heartbeat(pid=1, attempt=1, seq=1, phase="training", time=1.0, memory_tier_bytes=7)
    path.write_bytes(beat.to_json())
    assert (again := Heartbeat.read(path)) is not None and again.memory_tier_bytes == 7


def test_status_shows_the_tier_when_it_holds_something() -> None:
    live = {
        "attempt": 2,
        "phase": "training",
        "step": 40,
        "last_commit_step": 20,
        "last_commit_age_seconds": 3.0,
        "silent_seconds": 0.5,
        "normal_seconds": None,
        "hang_verdict_seconds": 40,
        "suspect": False,
    }
    assert "memory tier" not in describe_live(live)  # an older daemon's report has no field
    assert "memory tier" not in describe_live(live | {"memory_tier_bytes": 0})
    assert describe_live(live | {"memory_tier_bytes": 3 * MiB // 2}).endswith(", memory tier 1.5 MiB")


def test_cancelling_a_queued_job_removes_its_tier(
    tmp_path: Path, shm_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No supervisor runs for a queued job (requeued by a drain, with the tier of its attempts):
    the API's cancel removes the tier itself."""
    spec = _spec({"every_steps": 10, "dir": str(shm_root)}, monkeypatch)
    store = Store.open(tmp_path)
    _daemon_job(store, "queued", spec, JobState.QUEUED)
    path = _fill(shm_root, "queued")
    log = structlog.get_logger()
    backend = ApiBackend(tmp_path, Registry(), "nobody", threading.Event(), dict, log, Drainer(tmp_path, log))
    status, body = backend.cancel(store, Peer(1, os.geteuid(), os.getegid()), "queued")
    assert (status, body["state"]) == (200, "cancelled")
    assert not os.path.lexists(path) and shm_root.is_dir()

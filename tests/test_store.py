"""The SQLite job store: pragmas, the transition table inside the write transaction, corruption."""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

import pytest

from ckptd.state.states import TRANSITIONS, AttemptClass, IllegalTransition, JobState, is_legal
from ckptd.state.store import Store, StoreError

from .procs import as_uid

ALL_PAIRS = [(a, b) for a in JobState for b in JobState]


def _store_at(tmp_path: Path, state: JobState) -> Store:
    s = Store.open(tmp_path)
    s.create_job("j", "n", "{}", "d", "f", "r")
    # Walk a legal path to `state` (the table itself, not a back door).
    path = {
        JobState.QUEUED: [],
        JobState.RUNNING: [JobState.RUNNING],
        JobState.BACKOFF: [JobState.RUNNING, JobState.BACKOFF],
        JobState.SUCCEEDED: [JobState.RUNNING, JobState.SUCCEEDED],
        JobState.FAILED: [JobState.RUNNING, JobState.FAILED],
        JobState.INTERRUPTED: [JobState.RUNNING, JobState.INTERRUPTED],
        JobState.CANCELLED: [JobState.CANCELLED],
    }[state]
    for st in path:
        s.transition("j", st)
    return s


@pytest.mark.parametrize(("old", "new"), ALL_PAIRS)
def test_transition_table_is_enforced_in_the_store(tmp_path: Path, old: JobState, new: JobState) -> None:
    s = _store_at(tmp_path, old)
    events_before = len(s.events("j"))
    if is_legal(old, new):
        assert s.transition("j", new, "why").state == new
        assert s.job("j").reason == "why"
    else:
        with pytest.raises(IllegalTransition):
            s.transition("j", new)
        assert s.job("j").state == old  # nothing written
        assert len(s.events("j")) == events_before


def test_terminal_states_have_no_way_out() -> None:
    assert TRANSITIONS[JobState.SUCCEEDED] == frozenset()
    assert TRANSITIONS[JobState.CANCELLED] == frozenset()


def test_states_are_stored_verbatim(tmp_path: Path) -> None:
    _store_at(tmp_path, JobState.INTERRUPTED)
    raw = sqlite3.connect(tmp_path / "ckptd.db").execute("SELECT state FROM jobs").fetchone()[0]
    assert raw == "interrupted"


def test_pragmas(tmp_path: Path) -> None:
    s = Store.open(tmp_path)
    db = s._db
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert db.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000


def test_corrupt_store_refuses_to_open_and_is_not_truncated(tmp_path: Path) -> None:
    s = _store_at(tmp_path, JobState.RUNNING)
    s.close()
    db = tmp_path / "ckptd.db"
    data = bytearray(db.read_bytes())
    data[100:4096] = b"\xa5" * (4096 - 100)  # smash the schema page
    db.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="left untouched"):
        Store.open(tmp_path)
    assert db.read_bytes() == bytes(data)


def test_attempts_and_checkpoints(tmp_path: Path) -> None:
    s = _store_at(tmp_path, JobState.RUNNING)
    n = s.start_attempt("j", 4242)
    s.end_attempt(
        "j",
        n,
        exit_code=None,
        signal=9,
        klass=AttemptClass.KILLED,
        evidence="e",
        error_summary=None,
        restored_step=None,
        last_step=57,
    )
    (a,) = s.attempts("j")
    assert (a.n, a.pid, a.klass, a.last_step, a.signal) == (1, 4242, AttemptClass.KILLED, 57, 9)
    assert s.record_checkpoint("j", 40, 0, "/x/ckpt-2", {"loss": 0.5}, "abc")
    assert not s.record_checkpoint("j", 40, 0, "/x/ckpt-2", {"loss": 0.5}, "abc")  # idempotent
    s.record_checkpoint("j", 20, 0, "/x/ckpt-1", {}, "abd")
    assert s.job("j").last_committed_step == 40  # never goes backwards
    s.retire_checkpoints("j", [20])
    assert [c["step"] for c in s.checkpoints("j")] == [40]
    assert [c["step"] for c in s.checkpoints("j", include_retired=True)] == [20, 40]
    # Committed again after its retirement (a quarantined step trained anew): live again.
    assert s.record_checkpoint("j", 20, 0, "/x/ckpt-3", {}, "abe")
    assert [(c["step"], c["path"]) for c in s.checkpoints("j")] == [(20, "/x/ckpt-3"), (40, "/x/ckpt-2")]


def test_an_empty_store_is_refused_not_recreated(tmp_path: Path) -> None:
    """A 0-byte ckptd.db would silently become a new, empty store: every job forgotten."""
    s = Store.open(tmp_path)
    s.create_job("j", "n", "{}", "d", "f", "r")
    s.close()
    for suffix in ("", "-wal", "-shm"):
        p = tmp_path / f"ckptd.db{suffix}"
        if p.exists():
            if suffix:
                p.unlink()
            else:
                p.write_bytes(b"")
    with pytest.raises(StoreError, match=r"is empty .*move it aside"):
        Store.open(tmp_path)
    assert (tmp_path / "ckptd.db").stat().st_size == 0  # left exactly as found


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to try the store as another uid")
def test_a_store_of_another_user_says_permission_denied(tmp_path: Path) -> None:
    home = Path(tempfile.mkdtemp(prefix="ckptd-store-"))
    home.chmod(0o755)
    Store.open(home).close()
    assert (home / "ckptd.db").stat().st_mode & 0o777 == 0o640  # born private
    got = as_uid(65534, 65534, lambda: Store.open(home) and "opened")
    msg = str(got.get("exc") or got)
    shutil.rmtree(home)
    assert "permission denied" in msg and "restore" not in msg, msg


def test_reconcile_makes_the_store_agree_with_the_manifests(tmp_path: Path) -> None:
    """What a worker's inventory at restore does: commits the supervisor never heard of (made
    after it died) appear, rows whose checkpoint rotation deleted meanwhile are retired."""
    s = Store.open(tmp_path)
    s.create_job("j", "n", "{}", "d", "f", "r")
    for step in (20, 40):
        s.record_checkpoint("j", step, 0, f"ckpt-{step}", {}, "x")
    on_disk = [
        {"step": st, "epoch": 1, "path": f"/c/ckpt-{st}", "digest": "y", "metrics": {}} for st in (40, 60, 80)
    ]
    s.reconcile_checkpoints("j", on_disk)
    assert [c["step"] for c in s.checkpoints("j")] == [40, 60, 80]
    assert [c["step"] for c in s.checkpoints("j", include_retired=True)] == [20, 40, 60, 80]
    assert s.job("j").last_committed_step == 80
    s.reconcile_checkpoints("j", [])  # the directory was emptied: nothing is restorable
    assert s.checkpoints("j") == [] and s.job("j").last_committed_step is None

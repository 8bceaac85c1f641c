"""A damaged or lost store: refused and kept as evidence, never written over; run directories it
forgot are reported and can be adopted again; a clean stop leaves ckptd.db complete; a reader
works on a full disk."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from ckptd.daemon.jobs import create_job
from ckptd.state import orphans
from ckptd.state.jobfile import load_job_file
from ckptd.state.states import JobState
from ckptd.state.store import Store, StoreError

from .conftest import ckptd_cmd, write_job
from .daemonproc import daemon_env, start_daemon
from .procs import wait_for


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _other_app_db(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (body TEXT)")
        db.execute("INSERT INTO notes VALUES ('not ckptd')")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b"x"), "not an SQLite database"),
        (lambda p: p.write_text("jobs: lost\n" * 40), "not an SQLite database"),
        (lambda p: p.write_bytes(b"SQLite format 3\x00"), "not an SQLite database"),  # a torn header
        (_other_app_db, "something else"),
    ],
)
def test_a_file_that_is_not_a_store_is_refused_and_left_untouched(
    tmp_path: Path, make: object, message: str
) -> None:
    db = tmp_path / "ckptd.db"
    make(db)  # type: ignore[operator]
    before = _digest(db)
    with pytest.raises(StoreError, match=message) as err:
        Store.open(tmp_path)
    assert "\n" not in str(err.value) and str(db) in str(err.value)
    assert _digest(db) == before
    if message != "something else":  # not even a -wal/-shm beside it
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckptd.db"]


def test_the_cli_says_so_in_one_line_and_exits_2(tmp_path: Path) -> None:
    (tmp_path / "ckptd.db").write_bytes(b"x")
    r = subprocess.run(
        [sys.executable, "-m", "ckptd.daemon", "--home", str(tmp_path), "status"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "not an SQLite database" in r.stderr
    assert (tmp_path / "ckptd.db").read_bytes() == b"x"


def _jobs(home: Path, n: int) -> list[str]:
    job = write_job(home.parent / "jobfile")
    spec, raw = load_job_file(job)
    store = Store.open(home)
    try:
        return [create_job(store, home, spec, raw, job).id for _ in range(n)]
    finally:
        store.close()


def test_run_directories_the_store_forgot_are_found_and_adopted(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ids = _jobs(home, 3)
    for name in ("ckptd.db", "ckptd.db-wal", "ckptd.db-shm"):  # the store is lost
        (home / name).unlink(missing_ok=True)
    (home / "jobs" / "half-made").mkdir()  # a directory that never got its spec
    store = Store.open(home)
    found = {o.job_id: o for o in orphans.find(store, home)}
    assert set(found) == {*ids, "half-made"}
    assert found["half-made"].problem is not None
    for job_id in ids:
        assert found[job_id].problem is None
        orphans.adopt(store, found[job_id])
    assert {j.id: j.state for j in store.jobs()} == dict.fromkeys(ids, JobState.QUEUED)
    assert [o.job_id for o in orphans.find(store, home)] == ["half-made"]


def test_a_clean_end_leaves_every_job_in_ckptd_db_alone(tmp_path: Path) -> None:
    home = tmp_path / "home"
    store = Store.open(home)
    for i in range(30):
        store.create_job(f"j{i}", "n", "{}", "d", "f", "r")
    assert (home / "ckptd.db-wal").stat().st_size > 0
    reader = Store.open(home, check=False)  # another connection, as the API's pool holds
    reader.close()
    assert store.checkpoint_wal()
    assert (home / "ckptd.db-wal").stat().st_size == 0
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy2(home / "ckptd.db", copy / "ckptd.db")  # the file alone, as a naive backup takes it
    assert len(Store.open(copy).jobs()) == 30
    store.close()


def test_backup_copies_a_live_store(tmp_path: Path) -> None:
    home = tmp_path / "home"
    store = Store.open(home)
    for i in range(5):
        store.create_job(f"j{i}", "n", "{}", "d", "f", "r")
    target = tmp_path / "backup.db"
    r = subprocess.run(
        [sys.executable, "-m", "ckptd.daemon", "--home", str(home), "backup", str(target)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    restored = tmp_path / "restored"
    restored.mkdir()
    shutil.copy2(target, restored / "ckptd.db")
    assert len(Store.open(restored).jobs()) == 5
    assert (target.stat().st_mode & 0o077) == 0
    store.close()


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare for a private tmpfs"
)
def test_status_works_on_a_full_disk(tmp_path: Path) -> None:
    """The store lives on a tmpfs filled to the last byte: `ckptd status` still reads it."""
    home = tmp_path / "home"
    home.mkdir()
    script = f"""
set -e
mount -t tmpfs -o size=2m tmpfs {home}
{sys.executable} - <<'EOF'
from pathlib import Path
from ckptd.state.store import Store
s = Store.open(Path("{home}"))
s.create_job("full-disk-job", "n", "{{}}", "d", "f", "r")
s.close()
with open("{home}/filler", "wb", buffering=0) as f:
    try:
        while True:
            f.write(b"\\0" * 4096)
    except OSError:
        pass
EOF
exec {sys.executable} -m ckptd.daemon --home {home} status --json
"""
    r = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "full-disk-job" in r.stdout


def test_the_daemon_refuses_to_start_on_a_file_that_is_not_a_store(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "ckptd.db").write_bytes(b"x")
    r = subprocess.run(
        ckptd_cmd("--home", str(home), "daemon"),
        env=daemon_env(home),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    said = [line for line in r.stderr.splitlines() if "not an SQLite database" in line]
    assert len(said) == 1 and str(home / "ckptd.db") in said[0], r.stderr
    assert (home / "ckptd.db").read_bytes() == b"x"
    assert not (home / "ckptd.db-wal").exists() and not (home / "ckptd.db-shm").exists()


def test_the_daemon_warns_at_start_of_run_directories_the_store_forgot(tmp_path: Path) -> None:
    """The cut-WAL case: every acknowledged job's run directory exists, the store lost some."""
    home = tmp_path / "home"
    ids = _jobs(home, 3)
    store = Store.open(home)
    with store.write() as db:  # what a lost WAL does: the rows are gone, the directories stay
        for job_id in ids[1:]:
            db.execute("DELETE FROM submissions WHERE job_id = ?", (job_id,))
            db.execute("DELETE FROM events WHERE job_id = ?", (job_id,))
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
    store.close()
    d = start_daemon(home)
    try:
        line = wait_for(
            "the orphan warning",
            lambda: next((ln for ln in d.output().splitlines() if "store.orphan_runs" in ln), None),
            30,
        )
    finally:
        d.stop()
    assert '"count": 2' in line, line
    assert all(job_id in line for job_id in ids[1:]) and ids[0] not in line, line


def test_a_reader_never_writes_the_store(tmp_path: Path) -> None:
    """A writer that died with its jobs in the WAL: a reader sees them, and does not checkpoint
    them into ckptd.db at close as a read-write connection would (its close writes)."""
    home, image = tmp_path / "home", tmp_path / "image"
    store = Store.open(home)
    store.query("PRAGMA wal_autocheckpoint = 0")
    for i in range(30):
        store.create_job(f"j{i}", "n", "{}", "d", "f", "r")
    image.mkdir()
    for name in ("ckptd.db", "ckptd.db-wal"):  # what a SIGKILLed daemon leaves
        shutil.copy2(home / name, image / name)
    store.close()
    before = _digest(image / "ckptd.db")
    reader = Store.open(image, readonly=True)
    assert len(reader.jobs()) == 30
    reader.close()
    assert _digest(image / "ckptd.db") == before
    assert (image / "ckptd.db-wal").stat().st_size > 0  # still there for the daemon to recover

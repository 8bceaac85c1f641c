"""ckptd.daemon.spool: job files dropped into the spool are submitted once, as their owner."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from ckptd.daemon.spool import Spool, refusal
from ckptd.state.states import JobState
from ckptd.state.store import Store

from .conftest import write_job
from .daemonproc import start_daemon
from .procs import wait_for

ROOT = Path(__file__).resolve().parent.parent


# -- spool -----------------------------------------------------------------------------------------


class _Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def info(self, event: str, **kw: Any) -> None:
        self.lines.append((event, kw))

    warning = info


def _drop(spool: Path, name: str, text: str) -> Path:
    """Write beside, then rename into place: how a complete file arrives."""
    tmp = spool / f".{name}.tmp"
    tmp.write_text(text)
    os.rename(tmp, spool / name)
    return spool / name


def test_spool_takes_complete_files_once_and_rejects_bad_ones(tmp_path: Path) -> None:
    home = tmp_path / "home"
    store = Store.open(home)
    spool = Spool(home, settle=0.0, log=_Log())
    good = write_job(tmp_path / "src", name="spooled").read_text()
    _drop(spool.dir, "good.yaml", good)
    _drop(spool.dir, "bad.yaml", "name: x\nmodel: 3\nbogus: 1\n")
    (spool.dir / ".partial.yaml.tmp").write_text("name: half")
    (spool.dir / "notes.txt").write_text("not a job")
    taken = {i.name: i for i in spool.scan(store, home)}
    assert set(taken) == {"good.yaml", "bad.yaml"}
    assert taken["good.yaml"].outcome == "accepted" and taken["bad.yaml"].outcome == "rejected"
    assert (spool.dir / "accepted" / "good.yaml").exists()
    error = (spool.dir / "rejected" / "bad.yaml.error.txt").read_text()
    assert "bogus" in error and "model" in error
    assert [j.name for j in store.jobs()] == ["spooled"]
    assert spool.scan(store, home) == []  # nothing left to take
    assert (spool.dir / ".partial.yaml.tmp").exists()


def test_spool_crash_between_submit_and_move_does_not_duplicate(tmp_path: Path) -> None:
    home = tmp_path / "home"
    store = Store.open(home)
    spool = Spool(home, settle=0.0, log=_Log())
    path = _drop(spool.dir, "job.yaml", write_job(tmp_path / "src", name="once").read_text())
    first = spool.take(store, home, path)
    # As if the daemon died before the rename, on a file system whose inodes and mtimes do not
    # survive a remount (FUSE, NFS): the same bytes are back, as a new file.
    text = (spool.dir / "accepted" / "job.yaml").read_bytes()
    (spool.dir / "accepted" / "job.yaml").unlink()
    _drop(spool.dir, "job.yaml", text.decode())
    again = spool.scan(store, home)
    assert [i.outcome for i in again] == ["duplicate"] and again[0].job_id == first.job_id
    assert len(store.jobs()) == 1
    # Once that job has ended, the same file dropped again is a new submission.
    assert first.job_id is not None
    store.transition(first.job_id, JobState.CANCELLED, "test")
    _drop(spool.dir, "job.yaml", text.decode())
    later = spool.scan(store, home)
    assert [i.outcome for i in later] == ["accepted"] and later[0].job_id != first.job_id


def test_spool_waits_for_a_file_to_settle(tmp_path: Path) -> None:
    home = tmp_path / "home"
    spool = Spool(home, settle=3600.0, log=_Log())
    _drop(spool.dir, "fresh.yaml", "name: x\n")
    assert spool.scan(Store.open(home), home) == []


def test_spool_in_the_running_daemon(tmp_path: Path) -> None:
    d = start_daemon(tmp_path / "home", config="spool_settle_seconds: 0.2\n", FAKE_STEPS="5")
    try:
        _drop(d.home / "spool", "dropped.yaml", write_job(tmp_path / "src", name="dropped").read_text())
        jobs = wait_for("the spooled job", lambda: d.api("GET", "/v1/jobs"), 30)
        assert jobs[0]["name"] == "dropped" and jobs[0]["owner_uid"] == os.getuid()
        d.wait_state(jobs[0]["id"], "succeeded")
    finally:
        d.stop()


def _st(uid: int, mode: int, gid: int = 50) -> os.stat_result:
    return os.stat_result((mode, 0, 0, 1, uid, gid, 0, 0, 0, 0))


@pytest.mark.parametrize(
    ("file", "directory", "problem"),
    [
        (_st(1001, 0o100644), _st(1001, 0o40700), None),
        (_st(1001, 0o100600), _st(1001, 0o40770, gid=7), None),  # group: the daemon's (7)
        (
            _st(1001, 0o100644),
            _st(1002, 0o40700),
            "owned by uid 1001 but found in the spool directory of uid 1002",
        ),
        (_st(1001, 0o100644), _st(1001, 0o40777), "directory is writable by other users"),
        (_st(1001, 0o100644), _st(1001, 0o40770, gid=50), "directory is writable by other users"),
        (
            _st(1001, 0o101777),
            _st(1001, 0o41777),
            "directory is writable by other users",
        ),  # sticky: still theirs
        (_st(1001, 0o100666), _st(1001, 0o40700), "writable by group or others"),
        (_st(1001, 0o100664), _st(1001, 0o40700), "writable by group or others"),
    ],
)
def test_who_put_a_file_there_decides_whose_job_it_is(
    file: os.stat_result, directory: os.stat_result, problem: str | None
) -> None:
    found = refusal(file, directory, daemon_gid=7)
    assert found == problem if problem is None else (found is not None and problem in found)

"""What the daemon reads in a job owner's run directory: no symlink, no FIFO, no other owner's
file, and never more than a bounded piece (ckptd.state.safeopen, ckptd.state.protocol)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ckptd.state import protocol as p
from ckptd.state.safeopen import Refused, read_under


@pytest.fixture
def run(tmp_path: Path) -> Path:
    root = tmp_path / "run"
    (root / "attempts" / "0001").mkdir(parents=True)
    (root / "attempts" / "0001" / "error.json").write_text('{"type": "x"}')
    (tmp_path / "secret").write_text('{"type": "secret"}')
    return root


def test_a_plain_file_inside_is_read(run: Path) -> None:
    assert read_under(run, run / "attempts" / "0001" / "error.json") == b'{"type": "x"}'
    assert read_under(run, run / "attempts" / "0001" / "error.json", offset=2, limit=4) == b"type"


@pytest.mark.parametrize("swap", ["file", "directory"])
def test_symlinks_are_refused_wherever_they_are(run: Path, swap: str) -> None:
    if swap == "file":
        (run / "attempts" / "0001" / "error.json").unlink()
        (run / "attempts" / "0001" / "error.json").symlink_to(run.parent / "secret")
        target = run / "attempts" / "0001" / "error.json"
    else:
        (run / "attempts" / "0002").symlink_to(run.parent)
        target = run / "attempts" / "0002" / "secret"
    with pytest.raises(Refused):
        read_under(run, target)


def test_a_fifo_does_not_block_and_is_refused(run: Path) -> None:
    os.mkfifo(run / "heartbeat.json")
    with pytest.raises(Refused):
        read_under(run, run / "heartbeat.json")
    assert p.Heartbeat.read(run / "heartbeat.json", run) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file another owner")
def test_a_file_of_another_owner_is_refused(run: Path) -> None:
    """A hard link to somebody else's file, as a job owner could make one."""
    os.chown(run / "attempts" / "0001" / "error.json", 65534, 65534)
    with pytest.raises(Refused):
        read_under(run, run / "attempts" / "0001" / "error.json")


def test_events_are_read_in_bounded_pieces(run: Path) -> None:
    events = run / p.EVENTS_FILE
    huge = b"x" * (p.MAX_EVENTS_READ + 10) + b"\n"
    events.write_bytes(huge + json.dumps({"event": "after"}).encode() + b"\n")
    tail = p.EventTail(events, root=run)
    seen = []
    for _ in range(4):
        seen += tail.read()
    assert seen == [{"event": "after"}]  # the over-long line is skipped, what follows is not

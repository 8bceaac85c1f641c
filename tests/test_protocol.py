"""The worker ↔ supervisor vocabulary (ckptd.state.protocol): one home for every event kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ckptd.state.protocol import Event, Heartbeat, Phase, parse_phase

from .conftest import ROOT

SOURCES = [p for pkg in ("daemon", "supervisor", "state", "worker") for p in (ROOT / pkg).rglob("*.py")]


def test_every_event_kind_and_phase_is_used() -> None:
    text = "\n".join(p.read_text() for p in SOURCES if p.name != "protocol.py")
    unused = [f"Event.{e.name}" for e in Event if f"Event.{e.name}" not in text]
    unused += [f"Phase.{ph.name}" for ph in Phase if f"Phase.{ph.name}" not in text]
    assert not unused, unused


@pytest.mark.parametrize(
    ("payload", "alive"),
    [
        ({"pid": 7, "attempt": 1, "seq": 3, "phase": "training", "time": 1.0, "step": 5}, True),
        # A newer worker's field (an upgrade with jobs running) must not make it read as hung.
        ({"pid": 7, "attempt": 1, "seq": 3, "phase": "training", "time": 1.0, "goodput_s": 2.5}, True),
        ({"pid": 7, "attempt": 1, "seq": 3, "time": 1.0}, False),  # no phase: not a heartbeat
        ([1, 2, 3], False),
        ("not json", False),
    ],
)
def test_a_heartbeat_with_fields_this_reader_does_not_know_reads_as_alive(
    tmp_path: Path, payload: object, alive: bool
) -> None:
    path = tmp_path / "heartbeat.json"
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    beat = Heartbeat.read(path)
    assert (beat is not None) == alive
    if beat is not None:
        assert (beat.pid, beat.seq, beat.phase) == (7, 3, Phase.TRAINING)


@pytest.mark.parametrize(
    ("said", "read"),
    [
        ("training", Phase.TRAINING),
        (Phase.DONE, Phase.DONE),
        ("saving", Phase.SAVING),
        # Another version's phase, or a damaged file's: the longest grace, and never DONE.
        ("compiling", Phase.STARTING),
        ("DONE", Phase.STARTING),
        ("", Phase.STARTING),
        (3, Phase.STARTING),
        (None, Phase.STARTING),
        (["done"], Phase.STARTING),
    ],
)
def test_a_phase_is_parsed_once_and_an_unknown_one_reads_as_starting(said: object, read: Phase) -> None:
    assert parse_phase(said) is read


def test_a_heartbeat_file_s_phase_reaches_readers_as_a_member(tmp_path: Path) -> None:
    path = tmp_path / "heartbeat.json"
    path.write_text(json.dumps({"pid": 7, "attempt": 1, "seq": 3, "phase": "compiling", "time": 1.0}))
    beat = Heartbeat.read(path)
    assert beat is not None and type(beat.phase) is Phase and beat.phase is Phase.STARTING


def test_a_phase_set_as_text_is_a_member_and_written_as_its_value() -> None:
    """The worker sets the phase from a str on each change: it is parsed there too, and the file
    keeps the plain value older readers expect."""
    beat = Heartbeat(pid=7, attempt=1, seq=3, phase="starting", time=1.0)
    beat.phase = "validating"
    assert beat.phase is Phase.VALIDATING
    assert json.loads(beat.to_json())["phase"] == "validating"

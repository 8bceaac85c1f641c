"""The worker ↔ supervisor vocabulary (ckptd.state.protocol): one home for every event kind."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ckptd.state.protocol import Event, Heartbeat, Phase

from .conftest import ROOT

SOURCES = [p for pkg in ("daemon", "supervisor", "state", "worker") for p in (ROOT / pkg).glob("*.py")]


def test_event_kinds_are_spelt_only_in_the_enum() -> None:
    """A reader and a writer that each spell a kind by hand can drift apart (the phase `done`
    missing from a grace rule made a finished job fail): outside state/protocol.py the kinds
    are Event members, never string literals."""
    kinds = {e.value for e in Event}
    found = []
    for path in SOURCES:
        if path.name == "protocol.py":
            continue
        for m in re.finditer(r"[\"']([a-z_]+\.[a-z_]+)[\"']", path.read_text()):
            if m.group(1) in kinds:
                found.append(f"{path.relative_to(ROOT)}: {m.group(0)}")
    assert not found, found


def test_every_event_kind_and_phase_is_used() -> None:
    text = "\n".join(p.read_text() for p in SOURCES if p.name != "protocol.py")
    unused = [f"Event.{e.name}" for e in Event if f"Event.{e.name}" not in text]
    unused += [f"Phase.{ph.name}" for ph in Phase if f"Phase.{ph.name}" not in text]
    assert not unused, unused


@pytest.mark.parametrize(
    ("payload", "alive"),
    [
        ({"pid": 7, "attempt": 1, "seq": 3, "phase": "train", "time": 1.0, "step": 5}, True),
        # A newer worker's field (an upgrade with jobs running) must not make it read as hung.
        ({"pid": 7, "attempt": 1, "seq": 3, "phase": "train", "time": 1.0, "goodput_s": 2.5}, True),
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
        assert (beat.pid, beat.seq, beat.phase) == (7, 3, "train")

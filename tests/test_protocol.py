"""The worker ↔ supervisor vocabulary (ckptd.state.protocol): one home for every event kind."""

from __future__ import annotations

import re

from ckptd.state.protocol import Event, Phase

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

"""The vocabulary is finished: event kinds, phases and a job's distribution shape are spelt in one
place each (ckptd.state.protocol Event and Phase, ckptd.state.distspec Distribute's properties),
never as string literals where they are written or matched.

A reader and a writer that each spell a word by hand drift apart (the phase `done` missing from
a grace rule once made a finished job fail). An AST scan of the package's sources finds a literal
where a kind, a phase or a strategy is meant; it is tested on planted sources first, so it cannot
pass by finding nothing.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

import pytest

from ckptd.state.protocol import Event

from .conftest import ROOT

PACKAGES = ("daemon", "state", "supervisor", "worker")
# The functions that write an event, and where their kind goes (self not counted).
KIND_ARGUMENT = {"append_event": 1, "add_event": 1, "_event": 2, "record_event": 0}
EVENT_VALUES = frozenset(e.value for e in Event)
DOTTED = re.compile(r"^[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*$")  # the shape of every event kind
# SQL that matches a kind by a literal instead of binding an Event member (`kind = ?`).
SQL_KIND = re.compile(r"\bkind\s*(=|==|!=|<>|\bIN\b|\bNOT IN\b)\s*\(?\s*'", re.IGNORECASE)
# Distribute's own fields are compared where its class defines the properties and validates them.
DISTRIBUTE_HOME = "state/distspec.py"

# Raw strings allowed where they are not meant as a kind, phase or strategy: none today. Each entry
# must still match something (test_every_expected_exception_is_still_needed).
EXPECTED: frozenset[tuple[str, str]] = frozenset()


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    what: str  # without the line: what an expected exception names, stable as code moves

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


def _literals(node: ast.expr) -> list[str]:
    """The string literals `node` is, or holds as a tuple, list or set of them."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return [s for e in node.elts for s in _literals(e)]
    return []


def _subject(node: ast.expr) -> str | None:
    """What a compared expression holds: `event` (ev.get("event"), ev["event"]), `kind` (a store
    row's e["kind"], x.kind, a variable named kind), `phase` (x.phase), `distribute`."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
        key = _literals(node.args[0]) if node.args else []
        return "event" if key == ["event"] else "kind" if key == ["kind"] else None
    if isinstance(node, ast.Subscript):
        key = _literals(node.slice)
        return "event" if key == ["event"] else "kind" if key == ["kind"] else None
    if isinstance(node, ast.Attribute):
        return {"kind": "kind", "phase": "phase", "strategy": "distribute", "engine": "distribute"}.get(
            node.attr
        )
    if isinstance(node, ast.Name) and node.id in ("kind", "event"):
        return "kind"
    return None


class _Scan(ast.NodeVisitor):
    def __init__(self, path: str) -> None:
        self.path, self.found, self.seen = path, list[Finding](), set[int]()

    def report(self, node: ast.AST, what: str) -> None:
        self.found.append(Finding(self.path, getattr(node, "lineno", 0), what))
        self.seen.update(id(n) for n in ast.walk(node))

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        if not (self.path == "state/protocol.py" and node.name == "Event"):  # the one spelling
            self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
        given = [kw.value for kw in node.keywords if kw.arg == ("event" if name == "dict" else "kind")]
        if name in KIND_ARGUMENT and len(node.args) > KIND_ARGUMENT[name]:
            given.append(node.args[KIND_ARGUMENT[name]])
        for arg in given if name in KIND_ARGUMENT or name == "dict" else []:
            for s in _literals(arg):
                self.report(arg, f'event kind "{s}" given to {name}()')
        self.generic_visit(node)

    def visit_Dict(self, node: ast.Dict) -> None:
        for key, value in zip(node.keys, node.values, strict=True):
            if key is not None and _literals(key) == ["event"]:
                for s in _literals(value):
                    self.report(value, f'event kind "{s}" as an "event" value')
        self.generic_visit(node)

    def visit_Compare(self, node: ast.Compare) -> None:
        sides = [node.left, *node.comparators]
        for subject in filter(None, map(_subject, sides)):
            for side in sides:
                for s in _literals(side):
                    if self._raw(subject, s):
                        self.report(side, f'{subject} field compared with "{s}"')
        self.generic_visit(node)

    def _raw(self, subject: str, s: str) -> bool:
        if subject == "kind":  # `kind` also names other things (a containment's): event-shaped only
            return s in EVENT_VALUES or bool(DOTTED.match(s))
        return subject != "distribute" or self.path != DISTRIBUTE_HOME

    def visit_Constant(self, node: ast.Constant) -> None:
        if id(node) in self.seen or not isinstance(node.value, str):
            return
        if node.value in EVENT_VALUES:
            self.report(node, f'event kind "{node.value}" spelt as a literal')
        elif SQL_KIND.search(node.value):
            self.report(node, "SQL matching an event kind by a literal (bind an Event member)")


def scan(source: str, path: str) -> list[Finding]:
    s = _Scan(path)
    s.visit(ast.parse(source, path))
    return s.found


def scan_package() -> list[Finding]:
    return [
        f
        for pkg in PACKAGES
        for file in sorted((ROOT / pkg).rglob("*.py"))
        for f in scan(file.read_text(), str(file.relative_to(ROOT)))
    ]


@pytest.mark.parametrize(
    ("source", "what"),
    [
        ('append_event(path, "job.state", a=1)', 'event kind "job.state" given to append_event()'),
        ('store.add_event(j, "store.new_thing")', 'event kind "store.new_thing" given to add_event()'),
        ('self._event(db, j, "attempt.ended", {})', 'event kind "attempt.ended" given to _event()'),
        (
            'self.record_event("worker.spawned", attempt=1)',
            'event kind "worker.spawned" given to record_event()',
        ),
        ('store.add_event(j, kind="x.y")', 'event kind "x.y" given to add_event()'),
        (
            'display.event({"event": "worker.adopted", "pid": 1})',
            'event kind "worker.adopted" as an "event" value',
        ),
        ('d = dict(event="a.b")', 'event kind "a.b" given to dict()'),
        ('ok = ev.get("event") == "epoch.end"', 'event field compared with "epoch.end"'),
        ('ok = ev["event"] in ("a.b", "c.d")', 'event field compared with "a.b"'),
        ('ok = e["kind"] == "job.created"', 'kind field compared with "job.created"'),
        ('ok = row.kind != "new.kind"', 'kind field compared with "new.kind"'),
        ('ok = kind in {"job.state"}', 'kind field compared with "job.state"'),
        ('ok = hb.phase == "done"', 'phase field compared with "done"'),
        ('ok = spec.distribute.strategy == "multi_worker"', 'distribute field compared with "multi_worker"'),
        ('ok = d.engine != "slurm"', 'distribute field compared with "slurm"'),
        ('KINDS = ("checkpoint.committed",)', 'event kind "checkpoint.committed" spelt as a literal'),
        ("q = \"SELECT * FROM events WHERE kind = 'job.state'\"", "SQL matching an event kind by a literal"),
        ("q = \"SELECT * FROM events WHERE kind IN ('a.b')\"", "SQL matching an event kind by a literal"),
    ],
)
def test_the_scanner_finds_a_planted_raw_string(source: str, what: str) -> None:
    found = scan(f"x = 1\n{source}\n", "daemon/planted.py")
    assert found and {f.line for f in found} == {2}, found
    assert found[0].what.startswith(what)
    assert str(found[0]).startswith("daemon/planted.py:2: ")  # file:line, for the failure message


@pytest.mark.parametrize(
    "source",
    [
        "append_event(path, Event.JOB_STATE, a=1)",
        'display.event({"event": p.Event.WORKER_ADOPTED, "pid": 1})',
        'ok = ev.get("event") == Event.EPOCH_END',
        'ok = e["kind"] in (Event.JOB_CREATED, Event.JOB_STATE)',
        'ok = self.choice.kind == "cgroup-v2"',  # a containment's kind, no event's
        "ok = hb.phase == Phase.DONE",
        "ok = spec.distribute.is_gang",
        'log.info("job.started", job_id=j)',  # a log line's name, stored nowhere
        'q = "SELECT * FROM events WHERE kind = ?"',
        'ev.pop("event", None)',
    ],
)
def test_the_scanner_passes_members_and_other_kinds_of_kind(source: str) -> None:
    assert scan(source, "daemon/planted.py") == []


def test_the_home_of_a_spelling_may_spell_it() -> None:
    enum = 'class Event(StrEnum):\n    JOB_STATE = "job.state"\n'
    props = (
        'class Distribute:\n    def is_gang(self) -> bool:\n        return self.strategy == "multi_worker"\n'
    )
    assert scan(enum, "state/protocol.py") == []
    assert scan(props, DISTRIBUTE_HOME) == []
    assert scan(enum, "state/other.py") != [] and scan(props, "state/other.py") != []


def test_no_raw_event_kind_phase_or_strategy_in_the_package() -> None:
    found = scan_package()
    raw = [str(f) for f in found if (f.path, f.what) not in EXPECTED]
    assert not raw, "use the Event / Phase member or the Distribute property:\n" + "\n".join(raw)


def test_every_expected_exception_is_still_needed() -> None:
    """An entry whose raw string is gone must go too, or it would hide the next one."""
    found = {(f.path, f.what) for f in scan_package()}
    assert not EXPECTED - found, sorted(EXPECTED - found)

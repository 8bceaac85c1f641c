"""The worker's exit contract: each worker-ending error's exit code, and one 'never retried' fact
that the worker's errors and the supervisor's policy both read; no import cycle hidden in a
function of the worker package."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from ckptd.state import protocol as p
from ckptd.state.jobspec import Restart
from ckptd.state.states import AttemptClass as C
from ckptd.supervisor.policy import Action, AttemptOutcome, ExitObservation, classify_exit, decide_restart
from ckptd.worker import errors as e

WORKER = Path(__file__).resolve().parent.parent / "worker"

# error, exit code, recorded in the error file, what the supervisor makes of the code
ENDS: list[tuple[e.WorkerEnd, int, bool, C]] = [
    (e.Preempted(), p.EXIT_PREEMPTED, False, C.PREEMPTED),
    (e.SpareReleased(), p.EXIT_OK, False, C.SUCCEEDED),
    (e.CheckDone([]), p.EXIT_OK, False, C.SUCCEEDED),
    (e.NonFinite(15, "loss is nan"), p.EXIT_NONFINITE, True, C.NAN_LOSS),
    (e.ConfigError("x"), p.EXIT_CONFIG, True, C.CONFIG_ERROR),
    (e.DirLocked("x"), p.EXIT_LOCKED, True, C.CONFIG_ERROR),
    (e.NoValidCheckpoint("x"), p.EXIT_NO_VALID_CHECKPOINT, True, C.CONFIG_ERROR),
]


@pytest.mark.parametrize(("err", "code", "recorded", "klass"), ENDS)
def test_each_worker_end_carries_its_code_and_the_supervisor_reads_it(
    err: e.WorkerEnd, code: int, recorded: bool, klass: C
) -> None:
    assert (err.exit_code, err.recorded) == (code, recorded)
    assert classify_exit(ExitObservation(code, None, type(err).__name__, str(err)))[0] == klass


@pytest.mark.parametrize(("err", "code", "recorded", "klass"), ENDS)
def test_the_worker_and_the_policy_agree_on_what_is_retried(
    err: e.WorkerEnd, code: int, recorded: bool, klass: C
) -> None:
    if klass == C.SUCCEEDED:
        return
    history = [AttemptOutcome(klass, None, None, 3)]
    failed = decide_restart(history, Restart(on_nan="restart"), 0.5).action is Action.FAIL
    assert failed == (not err.retried)


def test_stops_and_non_finite_pass_through_a_scripts_except_exception() -> None:
    for err in (e.Preempted(), e.SpareReleased(), e.CheckDone([]), e.NonFinite(1, "x")):
        assert not isinstance(err, Exception)
    assert isinstance(e.ConfigError("x"), Exception)
    assert e.NonFinite(7, "x").context == {"step": 7}


def test_the_errors_module_is_a_leaf_without_tensorflow() -> None:
    tree = ast.parse((WORKER / "errors.py").read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m.startswith("ckptd.worker")]
    out = subprocess.run(
        [sys.executable, "-c", "import sys, ckptd.worker.errors; print('tensorflow' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "False"


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """The ckptd.worker modules a module imports at its top, and inside its functions."""
    top: set[str] = set()
    lazy: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.ImportFrom) and (child.module or "").startswith("ckptd.worker"):
                module = child.module or ""
                names = [f"{module}.{a.name}" for a in child.names] if module == "ckptd.worker" else [module]
                (lazy if in_function else top).update(n.split(".")[2] for n in names)
            visit(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

    visit(ast.parse(path.read_text()), False)
    return top, lazy


def test_no_import_cycle_hides_inside_a_function() -> None:
    """Imports inside functions are for keeping TensorFlow out (the writer's fork, a cheap
    ckptd.worker.api), never to dodge a cycle: a module imported lazily never imports its
    importer back."""
    graph = {f.stem: _imports(f) for f in WORKER.glob("*.py")}

    def reaches(start: str) -> set[str]:
        seen: set[str] = set()
        todo = [start]
        while todo:
            for nxt in graph.get(todo.pop(), (set(), set()))[0]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = [(m, n) for m, (_, lazy) in graph.items() for n in lazy if m in reaches(n) | {n}]
    assert cycles == []
    assert not [m for m in graph if m in reaches(m)]

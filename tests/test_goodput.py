"""Goodput accounting (ckptd.state.goodput): where a job's wall time went.

The pure accounting is table-driven: each case is a job's recorded facts and the seconds each
part must get. Then the loader on a real store and events file, and one real run with a kill, a
backoff and a hang whose parts must explain its wall time."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from ckptd.state import goodput as g
from ckptd.state.goodput import AttemptFacts, Commit, JobFacts
from ckptd.state.jobfile import load_job_file
from ckptd.state.jobspec import spec_digest, spec_json
from ckptd.state.protocol import EVENTS_FILE, Event
from ckptd.state.states import AttemptClass, JobState
from ckptd.state.store import Store
from ckptd.supervisor.runner import HANG_GRACE_SECONDS

from .conftest import ckptd_cmd, env_with, write_job
from .procs import finish, heartbeat_when, run_dir, start_run, status

Q, R, B, S = JobState.QUEUED, JobState.RUNNING, JobState.BACKOFF, JobState.SUCCEEDED
STOPPED = JobState.INTERRUPTED


C = tuple[int, float, float, str]  # a commit: step, time, seconds, reason


def _a(
    spawned: float,
    ended: float | None,
    klass: AttemptClass | None,
    first: tuple[float, int] | None,
    commits: tuple[C, ...] = (),
    restored: int | None = None,
    last: int | None = None,
    stall: float | None = None,
) -> AttemptFacts:
    """`first`: (time, step) of the first training step."""
    at, step = first if first is not None else (None, 0)
    return AttemptFacts(
        spawned, ended, klass, at, step, restored, last, tuple(Commit(*c) for c in commits), stall
    )


def _i(step: int, at: float, seconds: float = 0.1) -> C:
    return (step, at, seconds, "interval")


def _f(step: int, at: float, seconds: float = 0.2, reason: str = "final") -> C:
    return (step, at, seconds, reason)


Case = tuple[JobFacts, float, dict[str, float]]


def _case(
    states: tuple[tuple[float, str], ...],
    attempts: tuple[AttemptFacts, ...],
    now: float = 99.0,
    sync: bool = True,
    **want: float,
) -> Case:
    return JobFacts(states, attempts, sync), now, want


# Attempt 1 in most cases: spawned at 1, first step (step 1) at 9, commits of steps 20 and 40
# at 11 and 13 (0.1 s saves each); it ends at `ended` with its last heartbeat at `last`.
ONE = (_i(20, 11), _i(40, 13))
RATE = (13.0 - 9.0) / (40 - 1)  # its seconds per step


def _first(klass: AttemptClass, ended: float, last: int, commits: tuple[C, ...] = ONE) -> AttemptFacts:
    return _a(1.0, ended, klass, (9.0, 1), commits, None, last)


def _resumed(spawned: float, first: float, restored: int, final: float, ended: float) -> AttemptFacts:
    """A succeeded attempt: restored `restored`, first step at `first`, final commit (0.2 s) of step 52."""
    return _a(
        spawned, ended, AttemptClass.SUCCEEDED, (first, restored + 1), (_f(52, final),), restored, 52, 0.0
    )


KILLED = (
    ((0.0, R), (14.1, B), (15.1, R), (26.1, S)),
    (_first(AttemptClass.KILLED, 14.0, 50), _resumed(15.2, 23.2, 40, 25.2, 26.0)),
)
CASES: dict[str, Case] = {
    # queued 1 s, started in 8 s, trained to step 52 (final commit 0.3 s, interval stalls 0.4 s by the
    # loop's measure), exited 1 s after the final commit; the job's end state 0.1 s after the exit
    "clean": _case(
        ((0.0, Q), (0.5, R), (15.6, S)),
        (_a(1.0, 15.5, AttemptClass.SUCCEEDED, (9.0, 1), (*ONE, _f(52, 14.5, 0.3)), None, 52, 0.4),),
        waiting=1.0,
        startup=8.0,
        productive=5.5 - 0.7,
        checkpoint_stall=0.7,
        shutdown=1.0,
        other=0.1,
    ),
    # killed at step 50, 1 s after the commit of step 40; 1 s of backoff; attempt 2 restores 40
    "kill after a commit": _case(
        *KILLED,
        waiting=2.0,
        startup=8.0,
        productive=3.8 + 1.8,
        checkpoint_stall=0.4,
        recomputed=1.0,
        restart=0.1 + 8.1,
        shutdown=0.8,
        other=0.1,
    ),
    # asynchronous saves: a failed attempt reports no stall, so its interval commits count none
    "kill, async saves": _case(
        *KILLED,
        sync=False,
        waiting=2.0,
        startup=8.0,
        productive=4.0 + 1.8,
        checkpoint_stall=0.2,
        recomputed=1.0,
        restart=8.2,
        shutdown=0.8,
        other=0.1,
    ),
    # a crash while starting (never trained), 2 s of backoff, then a clean attempt
    "backoff after a start-up crash": _case(
        ((0.0, R), (5.0, B), (7.0, R), (17.6, S)),
        (
            _a(1.0, 5.0, AttemptClass.CRASH, None),
            _a(7.1, 17.6, AttemptClass.SUCCEEDED, (15.1, 1), (_f(20, 17.1, 0.1),), None, 20, 0.0),
        ),
        waiting=3.0,
        startup=4.0,
        restart=8.1,
        productive=1.9,
        checkpoint_stall=0.1,
        shutdown=0.5,
    ),
    # hung after step 50 (10 steps after the commit of step 40, at the attempt's rate), killed at
    # 30 after the verdict and the grace: those 10 steps are recomputed, the rest is the hang
    "hang": _case(
        ((0.0, R), (30.0, B), (31.0, R), (40.5, S)),
        (_first(AttemptClass.HANG, 30.0, 50), _resumed(31.1, 39.1, 40, 40.1, 40.5)),
        waiting=2.0,
        startup=8.0,
        productive=3.8 + 0.8,
        checkpoint_stall=0.4,
        recomputed=10 * RATE,
        hang=30.0 - (13.0 + 10 * RATE),
        restart=8.1,
        shutdown=0.4,
    ),
    # the final save found no space: 30 s waiting for it, then the resume from step 20
    "disk_full wait": _case(
        ((0.0, R), (12.0, B), (42.0, R), (52.5, S)),
        (_first(AttemptClass.DISK_FULL, 12.0, 52, ONE[:1]), _resumed(42.1, 50.1, 20, 52.0, 52.5)),
        waiting=31.0,
        startup=8.0,
        productive=1.9 + 1.7,
        checkpoint_stall=0.3,
        recomputed=1.0,
        restart=8.1,
        shutdown=0.5,
    ),
    # still running: its wall time ends now, its steps since the last commit count as productive
    "running": _case(
        ((0.0, R),),
        (_a(1.0, None, None, (9.0, 1), ONE, None, 45),),
        20.0,
        waiting=1.0,
        startup=8.0,
        productive=11.0 - 0.2,
        checkpoint_stall=0.2,
    ),
    # stopped (preemption save), resumed 87 s later: the pause is not the job's time; the
    # resumed attempt's start is a start-up, not a restart
    "interrupted and resumed": _case(
        ((0.0, R), (12.6, STOPPED), (100.0, R), (111.6, S)),
        (
            _first(AttemptClass.PREEMPTED, 12.5, 30, (ONE[0], _f(30, 12.0, 0.2, "preempted"))),
            _resumed(101.0, 109.0, 30, 111.0, 111.5),
        ),
        200.0,
        waiting=2.0,
        startup=16.0,
        productive=4.5,
        checkpoint_stall=0.5,
        shutdown=1.0,
        other=0.2,
    ),
    # attempt 2 found the commit of step 40 damaged and restored step 20: attempt 1's training
    # after step 20 (and the save of step 40) was lost too
    "quarantined commit": _case(
        ((0.0, R), (14.0, B), (15.0, R), (28.0, S)),
        (_first(AttemptClass.KILLED, 14.0, 45), _resumed(15.0, 23.0, 20, 27.0, 28.0)),
        waiting=2.0,
        startup=8.0,
        productive=1.9 + 3.8,
        checkpoint_stall=0.3,
        recomputed=3.0,
        restart=8.0,
        shutdown=1.0,
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_parts(name: str) -> None:
    facts, now, want = CASES[name]
    got = g.account(facts, now)
    wall = sum(e - s for s, e in g.active_spans(facts.states, now))
    assert got.wall == pytest.approx(wall, abs=1e-6)
    assert math.fsum(got.parts().values()) == pytest.approx(got.wall, abs=1e-6)
    assert got.parts() == pytest.approx({k: want.get(k, 0.0) for k in g.PARTS}, abs=1e-6), name
    assert got.ratio == pytest.approx(want["productive"] / wall)
    assert math.fsum(got.waits.values()) == pytest.approx(got.waiting, abs=1e-9)


@pytest.mark.parametrize(
    ("states", "now", "spans"),
    [
        (((0.0, Q), (3.0, R), (9.0, S)), 50.0, [(0.0, 9.0)]),
        (((0.0, R),), 7.0, [(0.0, 7.0)]),
        (
            ((0.0, R), (2.0, B), (3.0, R), (5.0, JobState.FAILED), (20.0, Q), (21.0, R)),
            30.0,
            [(0.0, 5.0), (20.0, 30.0)],
        ),
        (((0.0, Q), (1.0, JobState.CANCELLED)), 9.0, [(0.0, 1.0)]),
        (((0.0, R), (4.0, STOPPED)), 100.0, [(0.0, 4.0)]),
    ],
)
def test_active_spans(
    states: tuple[tuple[float, str], ...], now: float, spans: list[tuple[float, float]]
) -> None:
    assert g.active_spans(states, now) == spans


def test_waits_by_cause() -> None:
    facts, now, _ = CASES["disk_full wait"]
    assert g.account(facts, now).waits == pytest.approx({"queued": 1.0, "backoff": 0.0, "disk_full": 30.0})
    facts, now, _ = CASES["kill after a commit"]
    assert g.account(facts, now).waits == pytest.approx({"queued": 1.0, "backoff": 1.0, "disk_full": 0.0})


def test_as_dict_and_describe() -> None:
    facts, now, _ = CASES["hang"]
    got = g.account(facts, now)
    d = got.as_dict()
    assert set(d) == {"ratio", "wall", *g.PARTS, "waiting_by_cause"}
    assert d["ratio"] == round(got.ratio, 4) and d["hang"] == round(got.hang, 3)
    line = g.describe(d)
    assert line.startswith(f"goodput {got.ratio:.3f}: productive {got.productive:.1f}s of {got.wall:.1f}s")
    assert f"hang {got.hang:.1f}s" in line and "other" not in line  # parts under 0.05 s are left out


def _ev(kind: Event, attempt: int, ts: float, **data: object) -> str:
    return json.dumps({"event": str(kind), "ts": ts, "attempt": attempt, **data})


def _store(tmp_path: Path, mode: str, run: Path) -> Store:
    spec, _ = load_job_file(write_job(tmp_path, mode=mode))
    store = Store.open(tmp_path / "state")
    store.create_job("j", spec.name, spec_json(spec), spec_digest(spec), "job.yaml", str(run))
    return store


# Attempt 1 started fresh and committed step 20; attempt 2 restored it and finished.
WORKER_EVENTS = [
    _ev(Event.RESTORE_FRESH, 1, 5.0, reason="no committed checkpoint"),
    _ev(Event.TRAINING_FIRST_STEP, 1, 9.0, step=1),
    _ev(Event.CHECKPOINT_COMMITTED, 1, 11.0, step=20, seconds=0.25, reason="interval"),
    '{"event": "checkpoint.committed", "attempt": 1, "ts": "soon"}',  # the owner's file: anything
    "not json",
    _ev(Event.RESTORE_DONE, 2, 20.0, step=20),
    _ev(Event.TRAINING_FIRST_STEP, 2, 23.0, step=21),
    _ev(Event.TRAINING_FIRST_STEP, 2, 22.5, step=21),  # a gang's other member: the earliest
    _ev(Event.CHECKPOINT_COMMITTED, 2, 25.0, step=52, seconds=0.5, reason="final"),
    _ev(Event.TRAINING_DONE, 2, 25.1, step=52, stall_seconds=0.125),
]


def test_gather_reads_the_store_and_the_workers_events(tmp_path: Path) -> None:
    store = _store(tmp_path, "sync", tmp_path)
    store.transition("j", R)
    store.start_attempt("j", 11)
    store.end_attempt(
        "j",
        1,
        exit_code=None,
        signal=9,
        klass=AttemptClass.KILLED,
        evidence="",
        error_summary=None,
        restored_step=None,
        last_step=50,
    )
    for state in (B, R):
        store.transition("j", state)
    store.start_attempt("j", 12)
    (tmp_path / EVENTS_FILE).write_text("\n".join(WORKER_EVENTS) + "\n")
    facts = g.gather(store, "j")
    assert facts.sync_saves and [s for _, s in facts.states] == [Q, R, B, R]
    a1, a2 = store.attempts("j")
    assert facts.attempts == (
        AttemptFacts(
            a1.started_at, a1.ended_at, "killed", 9.0, 1, 0, 50, (Commit(20, 11.0, 0.25, "interval"),)
        ),
        AttemptFacts(a2.started_at, None, None, 22.5, 21, 20, None, (Commit(52, 25.0, 0.5, "final"),), 0.125),
    )
    now = time.time()
    got = g.of_job(store, "j", now=now)
    assert got.wall == pytest.approx(now - facts.states[0][0], abs=1e-6)
    assert math.fsum(got.parts().values()) == pytest.approx(got.wall, abs=1e-6)


def test_gather_without_events_file(tmp_path: Path) -> None:
    store = _store(tmp_path, "async", tmp_path / "gone")
    facts = g.gather(store, "j")
    assert not facts.sync_saves and facts.attempts == () and [s for _, s in facts.states] == [Q]
    got = g.of_job(store, "j", now=facts.states[0][0] + 5.0)  # queued, nothing started yet
    assert got.wall == pytest.approx(5.0) and got.waits["queued"] == pytest.approx(5.0) and got.ratio == 0.0


def test_summary_reports_what_went_wrong_in_its_place(tmp_path: Path) -> None:
    got = g.summary(Store.open(tmp_path), "no-such-job")
    assert got["error"].startswith("goodput not accounted: StoreError") and g.describe(got) == got["error"]


# Every restart waits exactly 1 s (initial = max); a training phase silent for 3 s is a hang.
RESTART = (
    "restart: {max_restarts: 3, backoff_initial_seconds: 1.0, backoff_max_seconds: 1.0, "
    "heartbeat_timeout_seconds: 3, startup_grace_seconds: 120}"
)


def _logged_at(out: str, event: str) -> float:
    """When `ckptd run` logged `event` (its own clock, not the store's)."""
    line = next(ln for ln in out.splitlines() if f'"event": "{event}"' in ln)
    return datetime.fromisoformat(json.loads(line)["timestamp"]).timestamp()


@pytest.mark.tf
def test_a_run_with_a_kill_a_backoff_and_a_hang_is_accounted_to_its_wall_time(tmp_path: Path) -> None:
    """Attempt 1 is SIGKILLed a few steps after a commit, attempt 2 deadlocks after step 70 (10
    steps after a commit) until the verdict and the grace, attempt 3 finishes; each restart
    waits 1 s. The parts must explain the wall time `ckptd run` measured within 1 %."""
    job = write_job(tmp_path, epochs=2)
    job.write_text(re.sub(r"(?m)^restart:.*$", RESTART, job.read_text()))
    home = tmp_path / "home"
    proc = start_run(home, str(job), faults="step_delay=0.03,hang_at_step=70,attempt=2")
    hb = heartbeat_when(run_dir(home), lambda h: h.attempt == 1 and h.step >= (h.committed_step or 10**9) + 5)
    os.kill(hb.pid, signal.SIGKILL)
    rc, out = finish(proc)
    assert rc == 0, out
    st = status(home, run_dir(home).name)
    assert [a["class"] for a in st["attempt_list"]] == ["killed", "hang", "succeeded"]
    gp = st["goodput"]
    measured = _logged_at(out, "job.finished") - _logged_at(out, "job.started")
    named = math.fsum(v for k, v in gp.items() if k in g.PARTS and k != "other")
    print(f"goodput {json.dumps(gp)}; measured wall {measured:.3f} s, named parts {named:.3f} s")  # pytest -s
    assert abs(named - measured) <= 0.01 * measured, (named, measured)
    assert abs(gp["wall"] - measured) <= 0.01 * measured and gp["other"] <= 0.01 * gp["wall"]
    assert math.fsum(gp[k] for k in g.PARTS) == pytest.approx(gp["wall"], abs=0.01)  # ms rounding
    assert gp["recomputed"] > 0 and gp["restart"] > 0 and gp["waiting"] > 0 and gp["checkpoint_stall"] > 0
    assert 2.0 <= gp["waiting_by_cause"]["backoff"] < 2.5  # two restarts, 1 s each
    assert 3.0 <= gp["hang"] <= 3.0 + HANG_GRACE_SECONDS + 2.0  # silence to the verdict, then the grace
    assert gp["ratio"] == pytest.approx(gp["productive"] / gp["wall"], abs=1e-3)
    supervision = (home / "supervision" / st["id"] / EVENTS_FILE).read_text().splitlines()
    exits = [e for e in map(json.loads, supervision) if e["event"] == Event.WORKER_EXITED]
    last = exits[-1]["goodput"]  # the job's end event: its goodput up to the last exit
    assert len(exits) == 3 and last["productive"] == gp["productive"] and last["wall"] <= gp["wall"]
    shown = subprocess.run(
        ckptd_cmd("status", st["id"]), env=env_with(home), capture_output=True, text=True, timeout=60
    )
    assert f"  {g.describe(gp)}\n" in shown.stdout, shown.stdout + shown.stderr

"""The kill-point sweep (conformance): every documented route × every kind of kill moment ×
SIGKILL/SIGTERM × `every_steps` dividing the epoch or not; and, with a memory tier snapshotting
every step (docs/memory-tier.md), SIGKILLs at the moments that matter to it: mid-epoch, an epoch's
end, during a snapshot's copy, just after its commit, and during a restore from it (routes but
the gang, which has no tier). Each cell kills attempt 1 at its moment;
the job must end `succeeded` with a final checkpoint identical tensor for tensor to an
uninterrupted run of the same job (the save counter aside), or the difference must have been
named at start-up (`exactness.warning`).

The whole matrix is ~190 trainings, too long for one CI run: the cells are dealt, in a fixed
order, into CHUNKS parts and a run takes part `seed % CHUNKS`, so CHUNKS consecutive seeds cover
every cell. The seed (default: the day number, so CI walks the matrix day by day) also picks the
mid-epoch kill step. Both are printed in pytest's header; re-run a cell with
CKPTD_SWEEP_SEED=<seed>. CKPTD_SWEEP=all runs every cell, CKPTD_SWEEP_REPORT=FILE appends one JSON
line per cell (docs/porting.md's matrix is made from it).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .conftest import CSV, EXAMPLE, ROOT, SWEEP_CHUNKS, SWEEP_SEED
from .procs import events, final_state_hash, finish, run_dir, start_run, status

PROGRAMS = ROOT / "tests" / "programs"
RESTART = "restart: {max_restarts: 4, backoff_initial_seconds: 0.1, backoff_max_seconds: 0.5}\n"
CHUNKS = SWEEP_CHUNKS
SEED = SWEEP_SEED


@dataclass(frozen=True)
class Route:
    body: str  # the job file's lines (every_steps and restart are added)
    every: tuple[int, int]  # every_steps dividing the epoch, and not dividing it
    validates: bool = True  # ckptd runs a validation pass at epoch ends
    member: str = ""  # a gang: which member a step kill hits
    # A gang: a SIGTERM to a member other than the chief reaches the chief through the
    # supervisor (a heartbeat, then a signal), so the chief stops some steps later; the steps are
    # slowed so that a notice can arrive before the end, and one too near it may not.
    relay_steps: int = 0


ROUTES: dict[str, Route] = {
    # a script calling ckptd.fit (163 training rows of 16: 11 steps, the last of 3 rows)
    "fit": Route(f"entrypoint: {PROGRAMS}/mirrored.py\n", (11, 4)),
    # build() returning a compiled model and arrays; ckptd batches, splits and shuffles
    "build_arrays": Route(
        f"model: {EXAMPLE}/model.py:build\nparams: {{csv: {CSV}}}\n"
        "train: {epochs: 3, batch_size: 32, validation_split: 0.2, seed: 7}\n",
        (10, 7),
    ),
    # build() returning a dataset that reshuffles itself every epoch (768 rows of 64: 12 steps)
    "build_dataset": Route(
        f"model: {PROGRAMS}/reshuffle/model.py:build\nparams: {{csv: {CSV}}}\n"
        "train: {epochs: 3, batch_size: 64, seed: 7}\n",
        (6, 5),
        validates=False,
    ),
    # build() returning ckptd.fit_args(model, x, y, validation_split=...)
    "fit_args": Route(f"model: {PROGRAMS}/mirrored.py:build\n", (11, 4)),
    # a custom GradientTape loop with ckptd.session (640 rows of 32: 20 steps)
    "session": Route(f"entrypoint: {PROGRAMS}/custom_loop.py\n", (10, 7), validates=False),
    "mirrored": Route(
        f"model: {PROGRAMS}/mirrored.py:build\ndistribute: {{strategy: mirrored, replicas: 2}}\n", (11, 4)
    ),
    "gang": Route(
        f"entrypoint: {PROGRAMS}/mirrored.py\ndistribute: {{strategy: multi_worker, nodes: 2}}\n",
        (11, 4),
        member="member=1,step_delay=0.05,",
        relay_steps=10,
    ),
}
MOMENTS = (
    "first_step",
    "mid_epoch",
    "after_commit",
    "epoch_last_step",
    "validation",
    "async_save",
    "final_save",
)
SIGNALS = ("KILL", "TERM")
TIER_MOMENTS = (
    "mid_epoch",
    "epoch_last_step",
    "validation",
    "memory_copy",
    "memory_commit",
    "memory_restore",
)


@dataclass(frozen=True)
class Cell:
    route: str
    moment: str
    signal: str
    divides: bool
    tier: bool = False  # a memory tier, a snapshot every step

    @property
    def every(self) -> int:
        return ROUTES[self.route].every[0 if self.divides else 1]

    @property
    def name(self) -> str:
        tier = "-tier" if self.tier else ""
        return f"{self.route}-{self.moment}-{self.signal}-{'divides' if self.divides else 'nondiv'}{tier}"


def all_cells() -> list[Cell]:
    plain = [
        Cell(r, m, s, d)
        for r, route in ROUTES.items()
        for m in MOMENTS
        if route.validates or m != "validation"
        for s in SIGNALS
        for d in (True, False)
    ]
    tier = [
        Cell(r, m, "KILL", d, tier=True)
        for r, route in ROUTES.items()
        for m in TIER_MOMENTS
        if route.validates or m != "validation"
        for d in (True, False)
    ]
    return plain + tier


def chosen() -> list[Cell]:
    """This run's share: a fixed deal of the matrix into CHUNKS parts, part `SEED % CHUNKS`."""
    cells = all_cells()
    random.Random(0).shuffle(cells)  # fixed: the same deal every run, so parts partition it
    if os.environ.get("CKPTD_SWEEP") == "all":
        return cells
    return [c for i, c in enumerate(cells) if i % CHUNKS == SEED % CHUNKS]


@dataclass(frozen=True)
class Shape:
    """An uninterrupted run's facts: steps per epoch, total steps, its final tensors."""

    run: Path
    steps_per_epoch: int
    total: int
    tensors: dict[str, str]


_golden: dict[tuple[str, int], Shape] = {}


def _job(directory: Path, route: str, every: int, tier: Path | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    job = directory / "job.yaml"
    job.write_text(f"name: sweep-{route.replace('_', '-')}\n" + ROUTES[route].body)
    memory = f", memory: {{every_steps: 1, dir: {tier}}}" if tier is not None else ""
    with job.open("a") as f:
        f.write(f"checkpoint: {{every_steps: {every}, max_to_keep: 3{memory}}}\n" + RESTART)
    return job


def _run(home: Path, job: Path, faults: str = "") -> tuple[Path, dict[str, Any]]:
    rc, out = finish(start_run(home, str(job), faults=faults), timeout=900)
    assert rc == 0, out[-4000:]
    run = run_dir(home)
    return run, status(home, run.name)


def golden(tmp: Path, route: str, every: int) -> Shape:
    """The uninterrupted run of (route, every_steps), once per test process."""
    key = (route, every)
    if key not in _golden:
        run, st = _run(tmp / "golden", _job(tmp / "golden", route, every))
        assert st["state"] == "succeeded" and st["attempts"] == 1, st
        ends = [e for e in events(run) if e["event"] == "epoch.end"]
        _golden[key] = Shape(run, ends[0]["step"], st["last_committed_step"], final_state_hash(run))
    return _golden[key]


def kill_step(cell: Cell, shape: Shape, rng: random.Random) -> int:
    """The training step a moment names, for this job's shape (pure; tested below)."""
    s, e, t = shape.steps_per_epoch, cell.every, shape.total
    if cell.moment == "first_step":
        return 1
    if cell.moment.startswith(("mid_epoch", "memory_")):  # after a commit, between two, not on an edge
        return rng.choice([k for k in range(e + 1, t) if k % e and k % s])
    if cell.moment == "after_commit":  # an interval commit inside an epoch where there is one
        inside = [k for k in range(e, t, e) if k % s]
        return inside[0] if inside else e
    if cell.moment in ("epoch_last_step", "validation"):  # an epoch's last step, not the last epoch's
        return s * rng.randint(1, t // s - 1)
    if cell.moment == "async_save":  # the first interval save, while the writer commits it
        return e
    assert cell.moment == "final_save"
    return t


def faults(cell: Cell, step: int) -> str:
    key = {
        "validation": "kill_in_validation",
        "async_save": "kill_in_writer",
        "final_save": "kill_in_writer",
        "memory_copy": "kill_in_memory",
        "memory_commit": "kill_after_memory",
        # killed after a snapshot's commit, then again while attempt 2 restores it
        "memory_restore": "sigkill_in_restore=2,kill_after_memory",
    }.get(cell.moment, "sigkill_at_step")
    # Only the chief writes checkpoints and snapshots: a writer's kill is its; a step kill hits
    # another member.
    chiefs = key == "kill_in_writer" or cell.moment.startswith("memory_")
    member = "" if chiefs else ROUTES[cell.route].member
    # Saves are asynchronous once the writer has started (seconds); these jobs are shorter.
    writer = "writer_first=1," if cell.moment in ("after_commit", "async_save", "final_save") else ""
    # The tier's writer is niced: on a loaded box the job could end before it copies step N.
    if cell.moment.startswith("memory_"):
        writer += "memory_first=1,"
    return f"{key}={step},kill_signal={cell.signal},{member}{writer}attempt=1"


def _report(cell: Cell, step: int, outcome: str, attempts: list[dict[str, Any]]) -> None:
    path = os.environ.get("CKPTD_SWEEP_REPORT")
    if path:
        with open(path, "a") as f:
            row = {"cell": cell.name, "seed": SEED, "step": step, "outcome": outcome}
            f.write(json.dumps(row | {"classes": [a["class"] for a in attempts]}) + "\n")


@pytest.mark.tf
@pytest.mark.conformance
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("cell", chosen(), ids=lambda c: c.name)
def test_kill_point(tmp_path: Path, tier_root: Path, cell: Cell) -> None:
    shape = golden(tmp_path, cell.route, cell.every)  # without a tier: the tier changes nothing
    assert (shape.steps_per_epoch % cell.every == 0) == cell.divides, (shape.steps_per_epoch, cell.every)
    step = kill_step(cell, shape, random.Random(f"{SEED}-{cell.name}"))
    job = _job(tmp_path / "killed", cell.route, cell.every, tier_root if cell.tier else None)
    run, st = _run(tmp_path / "killed", job, faults(cell, step))
    attempts = st["attempt_list"]
    assert st["state"] == "succeeded", st
    assert st["last_committed_step"] == shape.total, st
    first = attempts[0]["class"]
    # A SIGTERM is a preemption (saved, restarted free). One sent by the writer may land after
    # the last step (these jobs train faster than a commit): the attempt then finishes.
    late = cell.moment in ("async_save", "final_save") or shape.total - step < ROUTES[cell.route].relay_steps
    term = {"preempted", "succeeded"} if late else {"preempted"}
    assert first in ({"killed"} if cell.signal == "KILL" else term), attempts
    got = final_state_hash(run)
    differ = sorted(k for k in shape.tensors.keys() | got.keys() if shape.tensors.get(k) != got.get(k))
    named = [e["cause"] for e in events(run) if e["event"] == "exactness.warning" and e.get("attempt") == 1]
    _report(cell, step, "identical" if not differ else f"named: {named}" if named else "DIFFERS", attempts)
    assert not differ or named, f"{cell.name} (kill at step {step}): tensors that differ: {differ}"
    if cell.moment in ("memory_commit", "memory_restore"):
        # Killed just after a snapshot's commit: a later attempt restores from memory, unless
        # that snapshot was no newer than a durable commit (snapshots due while one is being
        # written are skipped, so the kill may come at a durable commit's step).
        seen = events(run)
        sources = [e.get("source") for e in seen if e["event"] == "restore.done"]
        passed = [s["why"] for e in seen if e["event"] == "memory.ignored" for s in e["snapshots"]]
        assert "memory" in sources or (passed and all("not newer" in why for why in passed)), (
            sources,
            passed,
        )


@pytest.mark.tf
@pytest.mark.conformance
@pytest.mark.timeout(900)
@pytest.mark.parametrize("unshared", [False, True], ids=["one-box", "member-elsewhere"])
def test_a_gang_restores_its_chiefs_snapshot_only_if_every_member_holds_it(
    tmp_path: Path, tier_root: Path, unshared: bool
) -> None:
    """The chief is killed just after a snapshot's commit, mid-epoch. Its members on one box
    read its tier and the gang restores the snapshot; when a member cannot see it (as on another
    node) the whole gang restores the durable tier instead. Both end bit-identical to the run
    without a kill."""
    cell = Cell("gang", "memory_commit", "KILL", True, tier=True)  # commits at epoch ends only
    shape = golden(tmp_path, cell.route, cell.every)
    step = shape.steps_per_epoch + 9  # the snapshot is newer than any commit, landed or not
    job = _job(tmp_path / "killed", cell.route, cell.every, tier_root)
    extra = ",unshared_tier=1" if unshared else ""
    run, st = _run(tmp_path / "killed", job, faults(cell, step) + extra)
    assert st["state"] == "succeeded" and st["attempt_list"][0]["class"] == "killed", st
    assert final_state_hash(run) == shape.tensors
    chief, member = (
        [e for e in evs if e.get("attempt") == 2] for evs in (events(run), events(run / "members/1"))
    )
    starts = [[e for e in evs if e["event"] in ("restore.done", "restore.fresh")] for evs in (chief, member)]
    assert all(len(s) == 1 for s in starts), starts
    sources = [s[0].get("source", "fresh") for s in starts]
    ignored = [
        [s["why"] for e in evs if e["event"] == "memory.ignored" for s in e["snapshots"]]
        for evs in (chief, member)
    ]
    if unshared:  # the durable commit of epoch 1's end if it landed before the kill, else none
        assert sources[0] == sources[1] != "memory", starts
        assert any(why.startswith("gang: a member cannot read") for why in ignored[0]), ignored
        assert any(why.startswith("FileNotFoundError") for why in ignored[1]), ignored
    else:
        assert sources == ["memory", "memory"], starts
        assert starts[0][0]["step"] == starts[1][0]["step"] >= step, starts


@pytest.mark.tf
@pytest.mark.conformance
@pytest.mark.timeout(1200)
def test_a_snapshot_whose_restore_kills_a_member_twice_is_quarantined(
    tmp_path: Path, tier_root: Path
) -> None:
    """The chief is killed just after a snapshot's commit; then member 1 dies while restoring that
    snapshot, in attempts 2 and 3, after the chief has restored it. The chief counts a try until
    every member has restored, so attempt 4 quarantines the snapshot and the gang starts from an
    older state, and the run still ends bit-identical to the one without a kill."""
    cell = Cell("gang", "memory_commit", "KILL", True, tier=True)
    shape = golden(tmp_path, cell.route, cell.every)
    step = shape.steps_per_epoch + 9
    job = _job(tmp_path / "killed", cell.route, cell.every, tier_root)
    run, st = _run(tmp_path / "killed", job, faults(cell, step) + ",sigkill_in_restore=2-3:1")
    assert st["state"] == "succeeded" and [a["class"] for a in st["attempt_list"]][:3] == ["killed"] * 3, st
    assert final_state_hash(run) == shape.tensors
    chief, member = events(run), events(run / "members/1")
    starts = [
        {e["attempt"]: e.get("step", 0) for e in evs if e["event"] in ("restore.done", "restore.fresh")}
        for evs in (chief, member)
    ]
    assert 2 not in starts[1] and 3 not in starts[1], starts  # the member died restoring
    quarantined = [e for e in chief if e["event"] == "memory.quarantined" and e.get("attempt") == 4]
    assert [e["reason"] for e in quarantined] == ["restoring it killed the worker twice"], quarantined
    assert starts[0][4] == starts[1][4] < quarantined[0]["step"], (starts, quarantined)


KILL_STEP_TABLE = [  # (route, moment, divides, steps/epoch, total) -> kill step (rng-free moments)
    ("build_arrays", "first_step", True, 20, 60, 1),
    ("build_arrays", "after_commit", False, 20, 60, 7),
    ("build_arrays", "after_commit", True, 20, 60, 10),
    ("fit", "after_commit", True, 11, 44, 11),  # every commit is on an epoch's edge
    ("fit", "async_save", False, 11, 44, 4),
    ("session", "final_save", True, 20, 80, 80),
]


@pytest.mark.parametrize("route,moment,divides,s,t,want", KILL_STEP_TABLE)
def test_kill_step_table(route: str, moment: str, divides: bool, s: int, t: int, want: int) -> None:
    shape = Shape(Path("."), s, t, {})
    assert kill_step(Cell(route, moment, "KILL", divides), shape, random.Random(0)) == want


@pytest.mark.parametrize("moment", ["mid_epoch", "epoch_last_step"])
def test_random_moments_stay_in_their_place(moment: str) -> None:
    for seed in range(200):
        cell = Cell("build_arrays", moment, "KILL", False)
        k = kill_step(cell, Shape(Path("."), 20, 60, {}), random.Random(seed))
        if moment == "mid_epoch":
            assert 7 < k < 60 and k % 7 and k % 20, k
        else:
            assert k in (20, 40), k


def test_the_parts_partition_the_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    for seed in range(CHUNKS):
        monkeypatch.setattr(__import__(__name__, fromlist=["SEED"]), "SEED", seed)
        seen += [c.name for c in chosen()]
    assert sorted(seen) == sorted(c.name for c in all_cells()) and len(seen) == len(set(seen))

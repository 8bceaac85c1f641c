"""Work lost to a SIGKILL of the worker with and without the memory tier, recovery time from
each tier beside a fresh start, the tier's throughput overhead and its step-loop stall
(docs/memory-tier.md, "Measured with the tier wired in (phase 2)"; issue 29).

    python bench/memtier_loss.py loss --sizes 0.1,1 [--kills 4] [--seed 29] [--json FILE]
    python bench/memtier_loss.py loss --sizes 4 --tiers memory --keep-snapshots 1 --max-delay 60 \
        --no-commit-wait
    python bench/memtier_loss.py overhead [--gb 0.1] [--every 20] [--blocks 12] [--block-steps 200]
    python bench/memtier_loss.py stall [--gb 4] [--repeats 10]

The model is bench/large_model.py's "wide" kind (Input(256) -> Dense(W) -> Dense(1), Adam) sized
to S GB of checkpointed state, batch 8, as bench/scale.py and bench/memtier_cost.py use it.

`loss`: per size, two jobs under `ckptd run` (the foreground supervisor restarts a killed
worker), one without `checkpoint.memory` and one with it, in alternating order. Durable commits
are time-based (`every_seconds`), at the cost model's interval for >= 0.98 throughput
(docs/checkpoint-cost.md): T = 50 x the training seconds one save costs at that size (its measured
table: 0.10 s at 0.1 GB, 1.56 s at 1 GB, 10.24 s at 4 GB), so T = 5 s, 78 s, 512 s; `every_steps`
is out of reach. Each attempt is SIGKILLed by this harness once: after a warm-up (WARM_STEPS steps
past the attempt's first step and the attempt's own first interval commit, so that the kill lands
at a random point of a durable interval and the tier's job shows its durable commits too; the
first kill of the job without the tier is the exception: it lands WARM_STEPS steps after the first
step, before any commit, which measures a fresh start), at a uniformly random delay in [0, T]
seconds (`--max-delay` caps it and `--no-commit-wait` replaces the commit by a snapshot of the
attempt past its first: at 4 GB, T = 512 s does not fit a session; the tier's figures do not
depend on T). The kill is sent as soon as a new heartbeat is seen (polled every 2 ms from 0.5 s
before the kill time; the worker writes one at most every 0.25 s, right after a step's count), so
the heartbeat's step is the step at the kill (the next one may have begun, not ended). Lost steps =
that step - the step the next attempt restored (`restore.done`, or 0 after `restore.fresh`); lost
seconds = lost steps x the attempt's own step time (heartbeat time and step from the warm-up's end
to the kill, snapshots and durable saves included). Recovery = the kill -> the next attempt's
`training.first_step`, split into: the kill -> its spawn (the store's attempt row), the spawn ->
`checkpoint.inventory` (process start, TensorFlow import, model build), -> `restore.done` /
`restore.fresh`, -> the first step. The cold start is attempt 1's spawn -> first step. Snapshot
counts come from the throttled `memory.snapshots` reports (one a minute: a killed worker's last
minute is not reported) plus the heartbeat's `memory_step` at each kill.

`overhead`: one worker process (the real Loop, as bench/overhead_ab.py runs it), no durable
interval saves, the tier's snapshots switched on and off in alternating blocks of whole epochs
(ABBA, bench/ab_loop.py's ABBlocks, whose pairs bench/overhead_ab.py turns into ratios); the
first pair (tracing, first snapshot into a fresh file) is dropped. It also times every step
(before_step to before_step, so a step's after_step with the snapshot's capture is in it) and
prints the step times of snapshot steps beside the others.

`stall`: `SnapshotPlan.capture()` timed directly (repeats) on a model of that size after one
training step (bench/memtier_cost.py's model), the O(1) part a snapshot adds to the step loop.

The box this was written on is shared (2 CPUs, 23 GB RAM, others run tests): every figure is
printed raw with its range, to be read with that in mind.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchjob import heartbeat  # bench/ is on sys.path when a script runs
from overhead_ab import pair_ratios, quartiles
from overhead_units import RESULT_PREFIX, RUN_TIMEOUT_SECONDS
from recovery import _wait
from scale import BATCH, FEATURES, MODEL, events, named

# The cost model's training seconds per durable save (docs/checkpoint-cost.md, bench/scale.py).
SAVE_COST = {0.1: 0.10, 1.0: 1.56, 4.0: 10.24}
# Memory snapshot interval per size: a snapshot (copy + CRC32 beside training) must end before
# the next is due, or it is skipped (`busy`).
MEMORY_EVERY = {0.1: 20, 1.0: 4, 4.0: 2}
WARM_STEPS = 10
SCRIPT = str(Path(__file__).resolve())
TIERS = {True: "memory", False: "none"}
ROWS = 40_000  # 5000 steps an epoch at batch 8
EPOCHS = 50


def durable_seconds(gb: float) -> float:
    """The cost model's interval for >= 0.98 of the throughput: 50 x a save's training cost."""
    return round(50 * SAVE_COST[gb], 1)


def job_dict(name: str, gb: float, every_seconds: float, memory: dict[str, int] | None) -> dict[str, Any]:
    checkpoint: dict[str, Any] = {
        "dir": "checkpoints",
        "every_steps": 10**9,
        "every_seconds": every_seconds,
        "mode": "async",
        "max_to_keep": 2,
    }
    if memory is not None:
        checkpoint["memory"] = memory
    return {
        "name": name,
        "model": f"{MODEL}:build",
        "params": {"kind": "wide", "state_gb": gb, "features": FEATURES, "rows": ROWS},
        "train": {"epochs": EPOCHS, "batch_size": BATCH, "validation_split": 0.0, "seed": 7},
        "checkpoint": checkpoint,
        "restart": {"max_restarts": 100, "backoff_initial_seconds": 0.05, "backoff_max_seconds": 0.05},
    }


# -- loss and recovery ---------------------------------------------------------------------------


def _kill_when(run: Path, attempt: int, after: float) -> dict[str, Any]:
    """SIGKILL the worker of `attempt` at the first new heartbeat at or after time `after`."""
    seen = None
    time.sleep(max(0.0, after - time.time() - 0.5))  # then poll every 2 ms
    while True:
        hb = heartbeat(run)
        if hb and hb["attempt"] == attempt and hb["seq"] != seen:
            if time.time() >= after and seen is not None:
                os.kill(hb["pid"], signal.SIGKILL)
                return dict(hb, t_kill=time.time())
            seen = hb["seq"]
        time.sleep(0.002)


def _restoring(run: Path, attempt: int) -> float | None:
    """The worker's time when `attempt`'s heartbeat turned "restoring" (None if it was missed)."""
    while True:
        hb = heartbeat(run)
        if hb and hb["attempt"] == attempt and hb.get("phase") not in (None, "starting"):
            return float(hb["time"]) if hb["phase"] == "restoring" else None
        time.sleep(0.002)


def _warm(run: Path, attempt: int, fresh: bool, commit: bool, every: int) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        time.sleep(0.05)  # the harness polls lightly: the box has 2 cores
        hb = heartbeat(run)
        if not hb or hb["attempt"] != attempt or hb.get("phase") != "training":
            return None
        evs = events(run)
        first = [e for e in named(evs, "training.first_step") if e["attempt"] == attempt]
        if not first or hb["step"] < first[0]["step"] + WARM_STEPS:
            return None
        if not commit:  # instead: a snapshot of this attempt's beyond its first
            return hb if (hb.get("memory_step") or 0) >= first[0]["step"] + every else None
        if not fresh and not any(
            e["attempt"] == attempt and e.get("reason") == "interval"
            for e in named(evs, "checkpoint.committed")
        ):
            return None
        return hb

    hb: dict[str, Any] = _wait(f"attempt {attempt} warm", ready, 3600)
    return hb


def kill_job(
    tmp: Path, gb: float, tier: bool, args: argparse.Namespace, rng: random.Random
) -> dict[str, Any]:
    name = f"loss-{gb}-{'tier' if tier else 'durable'}-{time.monotonic_ns()}"
    every = args.memory_every or MEMORY_EVERY[gb]
    memory = {"every_steps": every, "keep": args.keep_snapshots} if tier else None
    period = durable_seconds(gb)
    job = tmp / f"{name}.yaml"
    job.write_text(json.dumps(job_dict(name, gb, period, memory)))  # JSON is YAML
    home = tmp / f"home-{name}"
    env = dict(os.environ, CKPTD_HOME=str(home), TF_CPP_MIN_LOG_LEVEL="2")
    with open(tmp / f"{name}.stderr", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ckptd.daemon", "run", str(job)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    kill_points: list[dict[str, Any]] = []
    restoring: dict[int, float | None] = {}
    run: Path = _wait(
        "run dir", lambda: next(iter((home / "jobs").glob("*")), None) if (home / "jobs").exists() else None
    )
    try:
        for k in range(args.kills):
            fresh = not tier and k == 0
            w = _warm(run, k + 1, fresh, not (args.no_commit_wait and tier), every)
            delay = 0.0 if fresh else rng.uniform(0, min(period, args.max_delay or period))
            hb = _kill_when(run, k + 1, time.time() + delay)
            hb["warm"] = w
            hb["fresh_kill"] = fresh
            kill_points.append(hb)
            restoring[k + 2] = _restoring(run, k + 2)
            print(f"  {name}: killed attempt {k + 1} at step {hb['step']}", file=sys.stderr, flush=True)
        last = args.kills + 1
        _wait(
            "the last attempt's first step",
            lambda: any(e["attempt"] == last for e in named(events(run), "training.first_step")),
            3600,
        )
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(Path("/dev/shm") / f"ckptd-{os.getuid()}" / run.name, ignore_errors=True)
    db = sqlite3.connect(home / "ckptd.db")
    spawned = {n: t for n, t in db.execute("SELECT n, started_at FROM attempts")}
    db.close()
    return {
        "gb": gb,
        "tier": tier,
        "period": period,
        "kills": kill_points,
        "every": every,
        "restoring": restoring,
        "spawned": spawned,
        "events": events(run),
    }


def _of(evs: list[dict[str, Any]], name: str, attempt: int) -> dict[str, Any] | None:
    return next((e for e in evs if e["event"] == name and e["attempt"] == attempt), None)


def analyse(job: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per kill: what was lost, where the next attempt restored from, how long it took."""
    evs, rows = job["events"], []
    for k, hb in enumerate(job["kills"]):
        nxt = k + 2
        done, fresh = _of(evs, "restore.done", nxt), _of(evs, "restore.fresh", nxt)
        restore = done or fresh
        first = _of(evs, "training.first_step", nxt)
        # The restore begins when the worker's heartbeat turns "restoring" (seen by the harness;
        # else, for a durable restore, the `restore.begin` event).
        begin = job.get("restoring", {}).get(str(nxt), job.get("restoring", {}).get(nxt))
        if begin is None and (b := _of(evs, "restore.begin", nxt)) is not None:
            begin = b["ts"]
        w = hb["warm"]
        step_time = (hb["time"] - w["time"]) / (hb["step"] - w["step"])
        restored = done["step"] if done else 0
        spawn = job["spawned"][nxt]
        assert restore is not None and first is not None
        rows.append(
            {
                "gb": job["gb"],
                "tier": job["tier"],
                "every": job.get("every", MEMORY_EVERY[job["gb"]]),
                "fresh_kill": hb["fresh_kill"],
                "step": hb["step"],
                "memory_step": hb.get("memory_step"),
                "committed_step": hb.get("committed_step"),
                "restored": restored,
                "source": done["source"] if done else "fresh",
                "lost_steps": hb["step"] - restored,
                "step_time": step_time,
                "lost_seconds": (hb["step"] - restored) * step_time,
                "to_spawn": spawn - hb["t_kill"],
                "to_restoring": None if begin is None else begin - spawn,
                "restore": None if begin is None else restore["ts"] - begin,
                "to_first_step": first["ts"] - restore["ts"],
                "recovery": first["ts"] - hb["t_kill"],
            }
        )
    return rows


def job_summary(job: dict[str, Any]) -> dict[str, Any]:
    evs = job["events"]
    snaps = named(evs, "memory.snapshots")
    commits = [e for e in named(evs, "checkpoint.committed") if e.get("reason") == "interval"]
    gaps = [b["ts"] - a["ts"] for a, b in itertools.pairwise(commits) if a["attempt"] == b["attempt"]]
    first = _of(evs, "training.first_step", 1)
    assert first is not None
    # Each attempt's first interval commit after its first step: the durable interval kept.
    starts = {e["attempt"]: e["ts"] for e in named(evs, "training.first_step")}
    firsts: dict[int, float] = {}
    for e in commits:
        firsts.setdefault(e["attempt"], e["ts"] - starts[e["attempt"]])
    return {
        "taken": sum(e["taken"] for e in snaps),
        "busy": sum(e["busy"] for e in snaps),
        "failed": sum(e["failed"] for e in snaps),
        "mean_seconds": [e["mean_seconds"] for e in snaps if e["mean_seconds"] is not None],
        "commits": len(commits),
        "commit_gaps": gaps,
        "first_commit": list(firsts.values()),
        "commit_seconds": [e["seconds"] for e in commits],
        "cold_start": first["ts"] - job["spawned"][1],
        "unavailable": [
            e for e in evs if e["event"] in ("memory.unavailable", "memory.failed", "memory.quarantined")
        ],
    }


def _span(values: list[float | None], fmt: str = ".2f") -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "-"
    if len(v) == 1:
        return format(v[0], fmt)
    return f"{format(statistics.median(v), fmt)} ({format(min(v), fmt)}–{format(max(v), fmt)})"


def _table(*header: str) -> None:
    print("\n| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))


def _row(*cells: object) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |")


def _tier(job: dict[str, Any]) -> str:
    return f"memory every {job.get('every', MEMORY_EVERY[job['gb']])}" if job["tier"] else "none"


def print_loss(jobs: list[dict[str, Any]]) -> None:
    rows = [r for j in jobs for r in analyse(j)]
    _table(
        "state", "tier", "kill", "step at kill", "newest snapshot / commit at kill", "restored from",
        "lost steps", "step time", "lost seconds",
    )  # fmt: skip
    for r in rows:
        _row(
            f"{r['gb']} GB",
            _tier(r),
            "before any commit" if r["fresh_kill"] else "random",
            r["step"],
            f"{r['memory_step']} / {r['committed_step']}",
            f"{r['source']} @ {r['restored']}",
            r["lost_steps"],
            f"{r['step_time']:.3f} s",
            f"{r['lost_seconds']:.2f} s",
        )
    keys = ("to_spawn", "to_restoring", "restore", "to_first_step", "recovery")
    _table(
        "state", "restored from", "n", "kill → spawn", "spawn → restoring (start, import, build)",
        "→ restore done", "→ first step", "kill → first step",
    )  # fmt: skip
    for gb in sorted({r["gb"] for r in rows}):
        for source in ("memory", "durable", "fresh"):
            sel = [r for r in rows if r["gb"] == gb and r["source"] == source]
            if sel:
                _row(f"{gb} GB", source, len(sel), *(_span([r[k] for r in sel]) for k in keys))
    _table(
        "state", "tier", "durable every", "interval commits", "first step → first commit (s)",
        "gap between commits (s)", "commit latency (s)",
        "snapshots taken / busy / failed (reported)", "snapshot seconds (report means)", "cold start (s)",
    )  # fmt: skip
    for j in jobs:
        s = job_summary(j)
        _row(
            f"{j['gb']} GB",
            _tier(j),
            f"{j['period']} s",
            s["commits"],
            _span(s["first_commit"], ".1f"),
            _span(s["commit_gaps"], ".1f"),
            _span(s["commit_seconds"]),
            f"{s['taken']} / {s['busy']} / {s['failed']}",
            _span(s["mean_seconds"]),
            f"{s['cold_start']:.2f}",
        )
        for e in s["unavailable"]:
            print(f"  {j['gb']} GB: {e}")


def loss(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    jobs = []
    tmp = Path(tempfile.mkdtemp(prefix="ckptd-memloss-", dir=args.tmp_dir))
    try:
        for i, gb in enumerate(float(s) for s in args.sizes.split(",")):
            order = [
                t
                for t in ((True, False) if i % 2 == 0 else (False, True))
                if args.tiers in ("both", TIERS[t])
            ]
            for tier in order:
                t0 = time.monotonic()
                jobs.append(kill_job(tmp, gb, tier, args, rng))
                print(f"{gb} GB tier={tier}: {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
                if args.json:
                    args.json.write_text(json.dumps(jobs))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print_loss(jobs)


# -- overhead ------------------------------------------------------------------------------------


class TierSwitch:
    """Stands for ABBlocks' schedule: switches the loop's memory snapshots on and off and, at an
    on-block's end, waits for the snapshot in flight (charged to that block)."""

    def __init__(self, loop: Any) -> None:
        self.loop, self.on, self.patched = loop, True, False

    def set_enabled(self, on: bool) -> None:
        tier = self.loop.ck.tier
        if not self.patched:
            take = tier.after_step
            tier.after_step = lambda step, in_epoch: take(step, in_epoch) if self.on else tier._collect()
            tier.epoch_recorded = lambda take=tier.epoch_recorded: take() if self.on else None
            self.patched = True
        self.on = on

    def settle(self) -> None:
        tier = self.loop.ck.tier
        while tier._in_flight:
            tier._collect()
            time.sleep(0.001)


def overhead_child(run_root: Path, block_steps: int) -> int:
    from ab_loop import ABBlocks  # imports TensorFlow: only in the child

    from ckptd.state import protocol
    from ckptd.state.paths import RunDir
    from ckptd.worker.__main__ import prepare, train

    loop = prepare(RunDir(run_root), 1)
    ab = ABBlocks(loop, block_steps)
    ab.schedule = TierSwitch(loop)  # type: ignore[assignment]
    stamps: list[float] = []
    loop.before_step.append(lambda: stamps.append(time.monotonic()))
    if train(loop) != protocol.EXIT_OK:
        return 1
    reports = named(events(run_root), "memory.snapshots")
    stats = {k: sum(e[k] for e in reports) for k in ("taken", "busy", "failed")}
    stats["mean_seconds"] = [e["mean_seconds"] for e in reports]
    print(RESULT_PREFIX + json.dumps({"blocks": ab.blocks, "stamps": stamps, "tier": stats}))
    return 0


def overhead(args: argparse.Namespace) -> None:
    run = Path(tempfile.mkdtemp(prefix="ckptd-memab-", dir=args.tmp_dir))
    run_root = run / "jobs" / f"memab-{time.monotonic_ns()}"
    run_root.mkdir(parents=True)
    from ckptd.state.jobspec import JobSpec, spec_json

    spec = job_dict(run_root.name, args.gb, 604800, {"every_steps": args.every, "keep": 2})
    spec["params"]["rows"] = args.block_steps * BATCH
    spec["train"]["epochs"] = args.blocks + 1
    (run_root / "spec.json").write_text(spec_json(JobSpec.model_validate(spec, strict=False)))
    cmd = [sys.executable, SCRIPT, "overhead-child", str(run_root), f"--block-steps={args.block_steps}"]
    try:
        proc = subprocess.run(
            cmd, cwd=run_root, capture_output=True, text=True, timeout=RUN_TIMEOUT_SECONDS, check=False
        )
    finally:
        shutil.rmtree(Path("/dev/shm") / f"ckptd-{os.getuid()}" / run_root.name, ignore_errors=True)
        shutil.rmtree(run, ignore_errors=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        sys.exit(f"overhead child failed: rc {proc.returncode}\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1].removeprefix(RESULT_PREFIX))
    blocks = result["blocks"]
    ratios = pair_ratios(blocks, blocks[2]["start"] if len(blocks) > 2 else None)
    q1, med, q3 = quartiles(ratios)
    used = blocks[2:]
    rate = {
        on: sum(b["steps"] for b in used if b["on"] is on) / sum(b["seconds"] for b in used if b["on"] is on)
        for on in (True, False)
    }
    print(f"\n{args.gb} GB, memory every {args.every} steps, blocks of {blocks[0]['steps']} steps")
    print(f"{len(blocks)} blocks")
    _table("pairs", "ratio on/off: median (quartiles)", "min–max", "pooled", "steps/s on", "steps/s off")
    _row(
        len(ratios),
        f"{med:.4f} ({q1:.4f}–{q3:.4f})",
        f"{min(ratios):.4f}–{max(ratios):.4f}",
        f"{rate[True] / rate[False]:.4f}",
        f"{rate[True]:.2f}",
        f"{rate[False]:.2f}",
    )
    print(f"snapshots (the worker's memory.snapshots reports): {result['tier']}")
    print("ratios: " + ", ".join(f"{r:.4f}" for r in ratios))
    # Step times of the on-blocks after the first pair: snapshot steps beside the others.
    stamps = result["stamps"]
    steps = [(i + 1, b - a) for i, (a, b) in enumerate(itertools.pairwise(stamps))]
    start = blocks[2]["start"] if len(blocks) > 2 else 0.0
    on_ranges = [(b["start"], b["start"] + b["seconds"]) for b in blocks if b["on"] and b["start"] >= start]
    spe = args.block_steps

    def in_on(i: int) -> bool:
        return any(lo <= stamps[i - 1] < hi for lo, hi in on_ranges)

    snap = [d * 1e3 for i, d in steps if in_on(i) and i % args.every == 0 and i % spe]
    other = [d * 1e3 for i, d in steps if in_on(i) and i % args.every and (i + 1) % args.every and i % spe]
    after = [d * 1e3 for i, d in steps if in_on(i) and (i - 1) % args.every == 0 and (i - 1) % spe]
    _table("step kind (on-blocks, epoch ends left out)", "n", "median ms", "p90 ms", "max ms")
    for label, v in (
        ("snapshot step (capture in its after_step)", snap),
        ("the step after it", after),
        ("other steps", other),
    ):
        if v:
            p90 = statistics.quantiles(v, n=10)[-1] if len(v) > 1 else v[0]
            _row(label, len(v), f"{statistics.median(v):.2f}", f"{p90:.2f}", f"{max(v):.2f}")


# -- stall ---------------------------------------------------------------------------------------


def stall(args: argparse.Namespace) -> None:
    from memtier_cost import _model

    from ckptd.worker.checkpoint.snapshot import SnapshotPlan, object_graph_now

    ckpt, _ = _model(args.gb)
    graph = object_graph_now(ckpt)
    assert graph is not None
    plan = SnapshotPlan(ckpt, graph)
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        captured = plan.capture()
        times.append((time.perf_counter() - t) * 1e3)
        del captured
    print(f"\nSnapshotPlan.capture() at {plan.nbytes / 1e9:.2f} GB, {args.repeats} repeats, ms:")
    print(
        f"median {statistics.median(times):.2f}, min {min(times):.2f}, max {max(times):.2f}: "
        + ", ".join(f"{t:.2f}" for t in times)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    lo = sub.add_parser("loss")
    lo.add_argument("--sizes", default="0.1,1")
    lo.add_argument("--kills", type=int, default=3)
    lo.add_argument("--seed", type=int, default=1)
    lo.add_argument("--tiers", choices=("both", "memory", "none"), default="both")
    lo.add_argument("--memory-every", type=int, default=None, help="checkpoint.memory.every_steps")
    lo.add_argument("--keep-snapshots", type=int, default=2, help="checkpoint.memory.keep")
    lo.add_argument(
        "--no-commit-wait",
        action="store_true",
        help="with the tier, warm-up waits for a snapshot of the attempt, not its first durable commit",
    )
    lo.add_argument("--max-delay", type=float, default=None, help="cap on the random kill delay, s")
    lo.add_argument("--json", type=Path, help="write the raw runs (events, kills) here")
    lo.add_argument("--keep", action="store_true", help="keep the scratch directory")
    lo.add_argument("--tmp-dir", default=None)
    ov = sub.add_parser("overhead")
    ov.add_argument("--gb", type=float, default=0.1)
    ov.add_argument("--every", type=int, default=20)
    ov.add_argument("--blocks", type=int, default=12)
    ov.add_argument("--block-steps", type=int, default=200)
    ov.add_argument("--tmp-dir", default=None)
    ch = sub.add_parser("overhead-child")
    ch.add_argument("run_root", type=Path)
    ch.add_argument("--block-steps", type=int, default=200)
    st = sub.add_parser("stall")
    st.add_argument("--gb", type=float, default=4.0)
    st.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    if args.what == "loss":
        loss(args)
    elif args.what == "overhead":
        overhead(args)
    elif args.what == "overhead-child":
        sys.exit(overhead_child(args.run_root, args.block_steps))
    else:
        stall(args)


if __name__ == "__main__":
    main()

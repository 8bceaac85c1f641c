"""Gang recovery: how long a multi_worker gang takes from one member's death to its first
training step after the restore, next to the same gang's cold start, measured in one run.

    python bench/gang_recovery.py [--repeats 3] [--nodes 2] [--engine local|slurm]

Each repeat runs the Pima example as a gang (`distribute: {strategy: multi_worker, nodes: K}`)
under `ckptd run`; the harness SIGKILLs member 1 once the chief has committed step 200, and
reads the times from the chief's events and the supervisor's record:
- cold start: attempt 1's first member spawned → attempt 1's first training step;
- detected: the kill → the supervisor's end of attempt 1 (every member gone);
- recovery: the kill → attempt 2's first training step (whole gang restarted, restore included).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchjob import pima_job  # bench/ is on sys.path when a script runs

KILL_AFTER_STEP = 200


def _events(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def _wait(what: str, probe: Any, timeout: float = 300) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := probe():
            return value
        time.sleep(0.005)
    raise TimeoutError(what)


def one_run(tmp: Path, nodes: int, engine: str) -> dict[str, float]:
    job = pima_job(
        tmp,
        f"gang-bench-{time.monotonic_ns()}",
        8,
        "every_steps: 50, every_seconds: 600",
        "backoff_initial_seconds: 0.05, backoff_max_seconds: 0.05",
    )
    job.write_text(
        job.read_text() + f"distribute: {{strategy: multi_worker, nodes: {nodes}, engine: {engine}}}\n"
    )
    home = tmp / "home"
    env = dict(os.environ, CKPTD_HOME=str(home))
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckptd.daemon", "run", str(job)], env=env, stdout=subprocess.DEVNULL
    )
    run = _wait("the run directory", lambda: next(iter((home / "jobs").glob("*")), None))
    member = run / "members" / "1" / "heartbeat.json"

    def committed() -> bool:
        return any(
            e["event"] == "checkpoint.committed" and e["step"] >= KILL_AFTER_STEP
            for e in _events(run / "events.jsonl")
        )

    _wait("a commit past the kill step", committed)
    pid = json.loads(member.read_text())["pid"]
    t_kill = time.time()
    os.kill(pid, signal.SIGKILL)
    if proc.wait(timeout=600) != 0:
        raise RuntimeError(f"the gang did not finish; see {run}")
    chief = _events(run / "events.jsonl")
    record = _events(home / "supervision" / run.name / "events.jsonl")
    first = {e["attempt"]: e["ts"] for e in chief if e["event"] == "training.first_step"}
    spawned = min(e["ts"] for e in record if e["event"] == "worker.spawned" and e["attempt"] == 1)
    ended = next(e["ts"] for e in record if e["event"] == "worker.exited" and e["attempt"] == 1)
    return {
        "cold_start": first[1] - spawned,
        "detected": ended - t_kill,
        "recovery": first[2] - t_kill,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--engine", choices=("local", "slurm"), default="local")
    args = ap.parse_args(argv)
    rows = []
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="ckptd-gang-bench-") as tmp:
            rows.append(one_run(Path(tmp), args.nodes, args.engine))
        print(f"repeat {i + 1}: " + ", ".join(f"{k} {v:.2f} s" for k, v in rows[-1].items()), flush=True)
    print(f"\ngang of {args.nodes} (engine {args.engine}), Pima, {args.repeats} repeats: median seconds")
    print(f"{'cold start':>12} {'detected':>10} {'recovery':>10}")
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(f"{med['cold_start']:>12.2f} {med['detected']:>10.2f} {med['recovery']:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

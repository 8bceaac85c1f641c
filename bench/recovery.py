"""Recovery benchmark: cold start, crash detection and recovery after `kill -9` of the worker,
cold, forked by the job's fork server, with the hot spare and in a warm worker, and the
supervisor's own footprint. Prints a table of medians.

    python bench/recovery.py [--repeats 5]

Each repeat runs the Pima example four times, interleaved: under `ckptd run` (foreground
supervisor) with `restart.hot_spare: false`, every attempt imported afresh (`CKPTD_ZYGOTE=0`,
"cold") or forked by the job's fork server (the default, "forked"), with `true` ("spare"), and
under `ckptd daemon`
with `warm_workers: true` and two slots, so a warm worker (as the job's user) waits in the free one
("warm"). The
harness SIGKILLs the worker after its second committed checkpoint and measures, from the job store
and the worker's events:
- start: attempt 1's spawn (store row) → its first training step (in a warm worker for "warm");
- crash noticed: the kill → the supervisor's end-of-attempt record;
- recovery: the kill → the first training step of attempt 2 (restore included).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from benchjob import heartbeat, pima_job  # bench/ is on sys.path when a script runs

MODES = ("cold", "forked", "spare", "warm")


def _job(directory: Path, spare: bool) -> Path:
    return pima_job(
        directory,
        f"recovery-{int(spare)}-{time.monotonic_ns()}",
        6,
        "every_steps: 40, every_seconds: 600, max_to_keep: 3",
        f"hot_spare: {str(spare).lower()}, backoff_initial_seconds: 0.05, backoff_max_seconds: 0.05",
    )


def _wait(what: str, probe: Any, timeout: float = 180) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = probe()
        if value:
            return value
        time.sleep(0.005)
    raise TimeoutError(what)


def _ckptd(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "ckptd.daemon", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def one_run(tmp: Path, mode: str) -> dict[str, float]:
    home = tmp / f"home-{mode}-{time.monotonic_ns()}"
    env = dict(os.environ, CKPTD_HOME=str(home), CKPTD_FAULTS="step_delay=0.01")
    if mode == "cold":
        env["CKPTD_ZYGOTE"] = "0"
    job = _job(tmp, mode == "spare")
    if mode == "warm":
        home.mkdir(parents=True)
        (home / "daemon.yaml").write_text("max_concurrent_jobs: 2\nwarm_workers: true\nspool: false\n")
        proc = _ckptd(env, "daemon")
        # Warm workers wait as the user of a likely job: the free slot gets one once this job runs.
        _wait("the daemon", lambda: (home / "ckptd.sock").exists())
        subprocess.run(
            [sys.executable, "-m", "ckptd.daemon", "submit", str(job)],
            env=env,
            check=True,
            capture_output=True,
        )
    else:
        proc = _ckptd(env, "run", "--progress", "json", str(job))
    try:
        return _measure(home, proc, mode)
    finally:
        if mode == "warm":
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)


def _measure(home: Path, proc: subprocess.Popen[bytes], mode: str) -> dict[str, float]:
    run = _wait(
        "run dir", lambda: next(iter((home / "jobs").glob("*")), None) if (home / "jobs").exists() else None
    )
    sup = psutil.Process(proc.pid)
    cpu0, t0 = sup.cpu_times(), time.monotonic()
    hb = _wait(
        "two commits",
        lambda: (h := heartbeat(run)) and h["attempt"] == 1 and (h.get("committed_step") or 0) >= 80 and h,
    )
    if mode == "spare":  # measure a warm spare: wait until it has imported TF and built the model
        _wait("a warm spare", lambda: (run / "attempts" / "spare" / "ready").exists())
    if mode == "warm":  # the free slot's warm worker is ready
        _wait("a warm worker", lambda: list((home / "warm").glob("*/*.ready")))
    rss = sup.memory_info().rss
    cpu1, t1 = sup.cpu_times(), time.monotonic()
    t_kill = time.time()
    os.kill(hb["pid"], signal.SIGKILL)
    if mode == "warm":  # the daemon keeps running: wait for attempt 2's first step
        _wait("attempt 2 training", lambda: 2 in _first_steps(run), 600)
    else:
        proc.wait(timeout=600)
    db = sqlite3.connect(home / "ckptd.db")
    rows = db.execute("SELECT n, started_at, ended_at FROM attempts ORDER BY n").fetchall()
    first = _first_steps(run)
    return {
        "cold_start": first[1] - rows[0][1],
        "noticed": rows[0][2] - t_kill,
        "recovery": first[2] - t_kill,
        "sup_rss_mb": rss / 2**20,
        "sup_cpu_pct": 100 * ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) / (t1 - t0),
    }


def _first_steps(run: Path) -> dict[int, float]:
    events = []
    for line in (run / "events.jsonl").read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:  # a line being written
            continue
    return {e["attempt"]: e["ts"] for e in events if e["event"] == "training.first_step"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    results: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="ckptd-recovery-") as d:
        for i in range(args.repeats):
            for mode in MODES if i % 2 == 0 else tuple(reversed(MODES)):
                results[mode].append(one_run(Path(d), mode))
                print(
                    f"repeat {i + 1} {mode}: "
                    + " ".join(f"{k}={v:.3f}" for k, v in results[mode][-1].items()),
                    file=sys.stderr,
                )

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in results[mode])

    cold = statistics.median([r["cold_start"] for r in results["cold"]])
    print(f"\nrecovery after kill -9 of the worker (medians of {args.repeats}, {os.cpu_count()} cores)")
    print(f"{'measure':<44}{'seconds':>10}{'x cold start':>14}   target")
    rows = [
        ("cold start (spawn -> first step)", cold, None, ""),
        ("start in a warm worker (spawn -> first step)", med("warm", "cold_start"), None, ""),
        ("crash noticed (kill -> attempt recorded)", med("cold", "noticed"), None, "<= 0.2 s"),
        ("cold recovery (kill -> first step)", med("cold", "recovery"), 1.1, "<= 1.1x"),
        ("forked recovery (kill -> first step)", med("forked", "recovery"), None, ""),
        ("a forked attempt (fork -> first step)", med("forked", "cold_start"), None, ""),
        ("hot-spare recovery (kill -> first step)", med("spare", "recovery"), 0.25, "<= 0.25x"),
        ("warm-worker recovery (kill -> first step)", med("warm", "recovery"), None, ""),
    ]
    for name, value, limit, target in rows:
        ratio = value / cold
        verdict = "" if limit is None else ("pass" if ratio <= limit else "FAIL")
        if name.startswith("crash"):
            verdict = "pass" if value <= 0.2 else "FAIL"
        print(f"{name:<44}{value:>10.3f}{ratio:>14.2f}   {target} {verdict}")
    print(
        f"{'supervisor RSS while supervising (MB)':<44}{med('cold', 'sup_rss_mb'):>10.1f}{'':>14}   <= 60 MB"
    )
    print(
        f"{'supervisor CPU while supervising (% core)':<44}{med('cold', 'sup_cpu_pct'):>10.2f}"
        f"{'':>14}   <= 1 %"
    )


if __name__ == "__main__":
    main()

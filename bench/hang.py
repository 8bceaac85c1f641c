"""Hang-detection benchmark: how long after a worker stops making progress does the supervisor
declare a hang, and does it ever declare one falsely (start-up, restore, a long save)?

    python bench/hang.py [--repeats 5] [--timeout 3]

Each repeat runs the Pima example under `ckptd run` with `heartbeat_timeout_seconds` = --timeout:
- detect: SIGSTOP the worker mid-training; latency = the `heartbeat.missed` log line's time − the
  time of the stop (target: ≤ timeout + 1 s);
- no false alarm: a run whose start-up (TensorFlow import, ~3-5 s), restore after a SIGKILL and
  saves (save_delay = timeout + 1.5 s) each last longer than the timeout must end with no `hang`.
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
from datetime import datetime
from pathlib import Path
from typing import Any

from benchjob import heartbeat, pima_job  # bench/ is on sys.path when a script runs


def _job(directory: Path, name: str, timeout: float) -> Path:
    return pima_job(
        directory,
        name,
        3,
        "every_steps: 50, every_seconds: 600, max_to_keep: 3",
        f"heartbeat_timeout_seconds: {timeout}, startup_grace_seconds: 120, "
        "backoff_initial_seconds: 0.05, backoff_max_seconds: 0.05",
    )


def _start(tmp: Path, name: str, timeout: float, faults: str) -> tuple[subprocess.Popen[str], Path]:
    home = tmp / f"home-{name}"
    env = dict(os.environ, CKPTD_HOME=str(home), CKPTD_FAULTS=faults)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckptd.daemon", "run", "--progress", "json", str(_job(tmp, name, timeout))],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, home


def _heartbeat(home: Path) -> dict[str, Any] | None:
    run = next(iter((home / "jobs").glob("*")), None) if (home / "jobs").exists() else None
    return heartbeat(run) if run else None


def _classes(home: Path) -> list[str]:
    db = sqlite3.connect(home / "ckptd.db")
    rows = [r[0] for r in db.execute("SELECT class FROM attempts ORDER BY n")]
    db.close()
    return rows


def detect_once(tmp: Path, i: int, timeout: float) -> float:
    proc, home = _start(tmp, f"detect-{i}", timeout, "step_delay=0.01")
    end = time.monotonic() + 180
    while time.monotonic() < end:
        hb = _heartbeat(home)
        if hb and hb["phase"] == "training" and (hb.get("committed_step") or 0) >= 50:
            break
        time.sleep(0.01)
    if not hb:
        raise RuntimeError(f"no heartbeat in {home} within 180 s")
    t_stop = time.time()
    os.kill(hb["pid"], signal.SIGSTOP)
    _, err = proc.communicate(timeout=300)
    for line in err.splitlines():
        if '"heartbeat.missed"' in line:
            ts = json.loads(line)["timestamp"].replace("Z", "+00:00")
            return datetime.fromisoformat(ts).timestamp() - t_stop
    raise RuntimeError("no heartbeat.missed line:\n" + err[-2000:])


def no_false_alarm_once(tmp: Path, i: int, timeout: float) -> list[str]:
    faults = f"step_delay=0.01,save_delay={timeout + 1.5},sigkill_at_step=75,attempt=1"
    proc, home = _start(tmp, f"quiet-{i}", timeout, faults)
    proc.communicate(timeout=600)
    return _classes(home)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=3.0)
    args = ap.parse_args()
    latencies: list[float] = []
    false_alarms = 0
    with tempfile.TemporaryDirectory(prefix="ckptd-hang-") as d:
        for i in range(args.repeats):
            latencies.append(detect_once(Path(d), i, args.timeout))
            classes = no_false_alarm_once(Path(d), i, args.timeout)
            false_alarms += classes.count("hang")
            print(
                f"repeat {i + 1}: detected after {latencies[-1]:.2f} s; quiet run classes {classes}",
                file=sys.stderr,
            )
    print(
        f"\nhang detection, heartbeat_timeout_seconds={args.timeout} "
        f"({args.repeats} repeats, {os.cpu_count()} cores)"
    )
    print(f"{'measure':<48}{'value':>10}   target")
    med, worst = statistics.median(latencies), max(latencies)
    limit = args.timeout + 1
    print(
        f"{'stop -> heartbeat.missed, median (s)':<48}{med:>10.2f}   <= {limit:.1f} "
        f"{'pass' if med <= limit else 'FAIL'}"
    )
    print(
        f"{'stop -> heartbeat.missed, worst (s)':<48}{worst:>10.2f}   <= {limit:.1f} "
        f"{'pass' if worst <= limit else 'FAIL'}"
    )
    print(
        f"{'false alarms (slow start-up, restore, long saves)':<48}{false_alarms:>10d}   0 "
        f"{'pass' if false_alarms == 0 else 'FAIL'}"
    )


if __name__ == "__main__":
    main()

"""What metrics and goodput accounting cost the training loop. Prints a table.

    python bench/metrics_ab.py [--seconds 120] [--block 10] [--scrape 1]

1. In the loop: the only per-step addition is the heartbeat's `expect_seconds` (a smoothed gap,
   ckptd.worker.runtime.Beater._expect). Timed over 200 000 beats with and without it, then set
   against the mean step time of the real run below.
2. Around the loop (A/B, one run): `ckptd run --metrics-address` trains the Pima example (made
   slow: 20 ms steps, as a small real model) while the harness scrapes /metrics every
   `--scrape` seconds in "on" blocks and not at all in "off" blocks, ordered on, off, off, on, …
   (ABBA: a linear drift hits both sides equally). Each block's rate comes from the heartbeat's
   step; each adjacent on/off pair gives a ratio. Scraping is done by this process, on the same
   2 cores, as a Prometheus on the training box would. Goodput is accounted at scrape time and at
   attempt ends, in the supervisor: it is part of what "on" costs.
Target (issue 27): the loop's rate with metrics on ≥ 99.5 % of off.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ckptd.state.protocol import Heartbeat  # noqa: E402
from ckptd.worker.runtime import Beater  # noqa: E402
from tests.conftest import ckptd_cmd, env_with, write_job  # noqa: E402

PATTERN = (True, False, False, True)


def beat_cost(tmp: Path) -> tuple[float, float]:
    """Seconds per beat() with and without the expectation (no file written: a long interval)."""
    beater = Beater(tmp / "hb.json", attempt=1, interval=1e9)
    with_it = min(timeit.repeat(lambda: beater.beat("training", step=1), number=200_000, repeat=3)) / 200_000
    beater._expect = lambda now, changed: None  # type: ignore[method-assign]
    without = min(timeit.repeat(lambda: beater.beat("training", step=1), number=200_000, repeat=3)) / 200_000
    return with_it, without


def step_of(run: Path) -> tuple[float, int] | None:
    hb = Heartbeat.read(run / "heartbeat.json")
    return (hb.time, hb.step) if hb is not None and hb.phase == "training" else None


def scrape(address: str) -> None:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        r.read()


def ab(args: argparse.Namespace, tmp: Path) -> tuple[list[float], float]:
    home = tmp / "home"
    job = write_job(tmp, name="ab", epochs=1000, every_steps=100)
    env = env_with(home) | {"CKPTD_FAULTS": "step_delay=0.02"}
    proc = subprocess.Popen(
        ckptd_cmd("run", "--progress", "json", "--metrics-address", "127.0.0.1:0", str(job)),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        address = run = None
        assert proc.stdout is not None
        while address is None or run is None:
            line = proc.stdout.readline()
            if '"metrics.serving"' in line:
                address = json.loads(line)["address"]
            if '"job.started"' in line:
                run = Path(json.loads(line)["run_dir"])
        while step_of(run) is None or step_of(run)[1] < 300:  # type: ignore[index]
            time.sleep(0.2)  # past the writer's start-up
        rates: list[tuple[bool, float]] = []
        end = time.monotonic() + args.seconds
        i = 0
        while time.monotonic() < end:
            on = PATTERN[i % len(PATTERN)]
            t0, s0 = step_of(run) or (time.time(), 0)
            block_end = time.monotonic() + args.block
            while time.monotonic() < block_end:
                if on:
                    scrape(address)
                time.sleep(args.scrape)
            t1, s1 = step_of(run) or (t0, s0)
            rates.append((on, (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0))
            i += 1
        ratios = []
        for (a_on, a), (_, b) in zip(rates[::2], rates[1::2], strict=False):  # (on, off) or (off, on)
            on_rate, off_rate = (a, b) if a_on else (b, a)
            if off_rate > 0:
                ratios.append(on_rate / off_rate)
        steps_rate = statistics.mean(r for _, r in rates)
        return ratios, 1.0 / steps_rate if steps_rate else 0.0
    finally:
        proc.terminate()
        proc.communicate(timeout=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--block", type=float, default=10.0)
    ap.add_argument("--scrape", type=float, default=1.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ckptd-metrics-ab-") as tmp:
        with_it, without = beat_cost(Path(tmp))
        ratios, step_seconds = ab(args, Path(tmp))
    extra = with_it - without
    print(f"{'beat() with / without expect_seconds':<44}{with_it * 1e6:>8.2f} / {without * 1e6:.2f} µs")
    print(f"{'mean step of the A/B run':<44}{step_seconds * 1e3:>8.2f} ms")
    print(f"{'expectation per step / step':<44}{100 * extra / step_seconds:>8.4f} %")
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [float("nan")] * 3
    label = f"rate scraped every {args.scrape:.0f} s / not scraped"
    print(
        f"{label:<44}{statistics.median(ratios):>8.4f}"
        f"  (quartiles {q[0]:.4f}-{q[2]:.4f}, {len(ratios)} pairs)   target >= 0.995"
    )


if __name__ == "__main__":
    main()

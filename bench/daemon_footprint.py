"""The daemon's footprint with metrics on and a full store: RSS and CPU of `ckptd daemon` with
`--metrics-address`, 1000 finished jobs (with attempts and commits) in its store and live jobs
running (the protocol-speaking fake worker: this measures the daemon, not TensorFlow), scraped
every `--scrape` seconds (Prometheus's default is 15 s; 1 s is the harsh case). Prints a table.

    python bench/daemon_footprint.py [--jobs 1000] [--live 2] [--seconds 60] [--scrape 1]

Target (docs/benchmarks.md): RSS <= 60 MB, CPU <= 1 % of a core.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ckptd.state.jobfile import load_job_file  # noqa: E402
from ckptd.state.jobspec import spec_digest, spec_json  # noqa: E402
from ckptd.state.states import AttemptClass, JobState  # noqa: E402
from ckptd.state.store import Store  # noqa: E402
from tests.conftest import write_job  # noqa: E402
from tests.daemonproc import fake_job, start_daemon  # noqa: E402
from tests.procs import wait_for  # noqa: E402

METRICS = "metrics_address: 127.0.0.1:0\n"


def fill(home: Path, tmp: Path, n: int) -> None:
    """n finished jobs, each with two attempts and three commits, as months of use leave them."""
    spec, _ = load_job_file(write_job(tmp, name="old", epochs=1))
    store = Store.open(home)
    for i in range(n):
        job_id = f"old-{i:05d}"
        store.create_job(job_id, "old", spec_json(spec), spec_digest(spec), "job.yaml", str(tmp / job_id))
        store.transition(job_id, JobState.RUNNING, "bench")
        for a in (1, 2):
            n_a = store.start_attempt(job_id, 1000 + a)
            klass = AttemptClass.KILLED if a == 1 else AttemptClass.SUCCEEDED
            store.end_attempt(
                job_id,
                n_a,
                exit_code=0 if a == 2 else None,
                signal=9 if a == 1 else None,
                klass=klass,
                evidence="bench",
                error_summary=None,
                restored_step=None if a == 1 else 200,
                last_step=250 if a == 1 else 300,
            )
        for step in (100, 200, 300):
            store.record_checkpoint(job_id, step, 0, f"ckpt-{step}", {"loss": 0.5}, "digest")
        store.transition(job_id, JobState.SUCCEEDED, "bench")
    store.close()


def scrape(address: str) -> int:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        return len(r.read())


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    home = tmp / "home"
    home.mkdir()
    fill(home, tmp, args.jobs)
    steps = str(int(args.seconds / args.step_seconds) * 4)
    d = start_daemon(
        home,
        config=("metrics_address: 127.0.0.1:0\n" if args.metrics else "")
        + f"max_concurrent_jobs: {args.live}\n",
        FAKE_STEPS=steps,
        FAKE_STEP_SECONDS=str(args.step_seconds),
    )
    try:
        address = args.metrics and wait_for(
            "metrics.serving",
            lambda: next(
                (json.loads(x)["address"] for x in d.output().splitlines() if '"metrics.serving"' in x), None
            ),
        )
        for i in range(args.live):
            d.submit(fake_job(tmp, f"live{i}"))
        proc = psutil.Process(d.proc.pid)
        time.sleep(3)  # the live jobs start
        cpu0, t0, size, scrapes = proc.cpu_times(), time.monotonic(), 0, 0
        rss = []
        while time.monotonic() - t0 < args.seconds:
            if address:
                size = scrape(address)
                scrapes += 1
            rss.append(proc.memory_info().rss)
            time.sleep(args.scrape)
        cpu1, t1 = proc.cpu_times(), time.monotonic()
        busy = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
        return {
            "rss_max_mb": max(rss) / 2**20,
            "cpu_pct": 100 * busy / (t1 - t0),
            "scrapes": scrapes,
            "scrape_bytes": size,
        }
    finally:
        d.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--live", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--scrape", type=float, default=1.0)
    ap.add_argument(
        "--step-seconds", type=float, default=0.25, help="fake worker step (heartbeat; commit per 10)"
    )
    ap.add_argument(
        "--no-metrics", dest="metrics", action="store_false", help="the baseline: no metrics served"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ckptd-footprint-") as tmp:
        r = measure(args, Path(tmp))
    how = f"metrics scraped every {args.scrape} s" if args.metrics else "no metrics"
    live = f"{args.live} live (fake workers, {args.step_seconds} s steps)"
    print(f"daemon, {args.jobs} finished jobs, {live}, {how}, {args.seconds:.0f} s")
    print(f"{'daemon RSS, max (MB)':<36}{r['rss_max_mb']:>10.1f}   <= 60 MB")
    print(f"{'daemon CPU (% of a core)':<36}{r['cpu_pct']:>10.2f}   <= 1 %")
    print(f"{'scrapes / bytes per scrape':<36}{r['scrapes']:>10.0f} / {r['scrape_bytes']:.0f}")


if __name__ == "__main__":
    main()

"""Checkpoint cost at GB scale: how stall, save and restore bandwidth, memory and throughput grow
with the size of the state, beside the disk's own bandwidth, in one run.

    .venv/bin/python bench/scale.py [--sizes 0.1,1,4] [--mode async] [--dir DIR] [--plot docs/scale.svg]

Per size S (GB of checkpointed state: bench/large_model.py's "wide" model, Adam):
- disk: `dd if=/dev/zero bs=16M conv=fsync` writes S GB in the run directory (write bandwidth);
  the file is evicted from the page cache (posix_fadvise DONTNEED) and `dd` reads it back (cold
  read). Three samples, median (this box's virtual disk varies several-fold between writes).
- base: a worker (`python -m ckptd.worker RUN 1`) trains 4N+1 steps without interval saves; steps /
  seconds from its first step's end to its epoch's end is the uncheckpointed throughput.
- checkpointed: the same model trains 4N+1 steps with a save every N steps (the extra step makes
  the final save one of its own), where N makes the interval >= 10x one checkpoint's disk time
  (from dd, after a 10-step calibration run). Printed:
  stall per save (the step loop's wait, from the worker's stats); save bandwidth (checkpoint bytes
  / the writer's time from hand-over to commit) for the interval saves, written beside training,
  and for the final save, which training waits for (the writer alone); throughput ÷ base and the
  training seconds each save cost (window time minus the base rate's time for as many steps); the
  peak extra memory of saving: the largest PSS of the worker and its children (a writer process,
  if any) while it trains with saves, minus the same while the base run trains (sampled every
  50 ms from /proc/PID/smaps_rollup, so shared memory counts once; the final save, after the
  epoch's end, is outside both windows).
- restore: the checkpoint directory is evicted from the page cache and a worker with one more
  epoch restores it; restore time is restore.begin -> restore.done (every tensor read and its CRC
  checked, then the objects restored), read bandwidth = checkpoint bytes / that time, and time to
  first step is restore.done -> training.first_step. The worker is then killed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MODEL = HERE / "large_model.py"
BATCH = 8
FEATURES = 256
RUN_TIMEOUT = 3600.0
SAMPLE_SECONDS = 0.05
DISK_SAMPLES = 3
INTERVALS = 4  # interval saves per checkpointed run (the base run trains as many steps)


# -- disk ----------------------------------------------------------------------------------------


def evict(paths: list[Path]) -> None:
    """Drop these files' pages from the page cache (clean pages only: sync first)."""
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def dd_rate(stderr: str) -> float:
    """Bytes/s from dd's last line ('... bytes (...) copied, 3.1 s, 330 MB/s')."""
    m = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", stderr)
    if not m:
        raise RuntimeError(f"cannot parse dd output: {stderr!r}")
    return int(m.group(1)) / float(m.group(2))


def disk_bandwidth(directory: Path, nbytes: int) -> tuple[list[float], list[float]]:
    """DISK_SAMPLES write and cold-read bandwidths of a file of `nbytes` (this box's virtual disk
    varies several-fold from one write to the next)."""
    path = directory / "dd.bin"
    count = max(1, math.ceil(nbytes / 2**24))
    writes, reads = [], []
    for _ in range(DISK_SAMPLES):
        write = subprocess.run(
            ["dd", "if=/dev/zero", f"of={path}", "bs=16M", f"count={count}", "conv=fsync"],
            capture_output=True,
            text=True,
            check=True,
        )
        evict([path])
        read = subprocess.run(
            ["dd", f"if={path}", "of=/dev/null", "bs=16M"], capture_output=True, text=True, check=True
        )
        path.unlink()
        writes.append(dd_rate(write.stderr))
        reads.append(dd_rate(read.stderr))
    return writes, reads


# -- memory --------------------------------------------------------------------------------------


def pss(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    m = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) * 1024 if m else 0


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class Sampler(threading.Thread):
    """(wall time, PSS of the worker and its children) every SAMPLE_SECONDS."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.done = pid, threading.Event()
        self.samples: list[tuple[float, int]] = []

    def run(self) -> None:
        while not self.done.wait(SAMPLE_SECONDS):
            self.samples.append((time.time(), pss(self.pid) + sum(pss(c) for c in children(self.pid))))

    def peak(self, evs: list[dict[str, Any]]) -> int:
        """The largest sample from the first step to the epoch's end."""
        start = float(named(evs, "training.first_step")[0]["ts"])
        end = float(named(evs, "epoch.end")[-1]["ts"])
        return max((b for t, b in self.samples if start <= t <= end), default=0)


# -- runs ----------------------------------------------------------------------------------------


def spec(gb: float, steps: int, epochs: int, every: int | None, mode: str | None) -> str:
    from ckptd.state.jobspec import JobSpec, spec_json

    checkpoint: dict[str, Any] = {
        "dir": "checkpoints",
        "every_steps": every or 10**9,
        "every_seconds": None if every else 604800,
        "max_to_keep": 2,
    }
    if mode:
        checkpoint["mode"] = mode
    job = JobSpec.model_validate(
        {
            "name": f"scale-{gb}",
            "model": f"{MODEL}:build",
            "params": {"kind": "wide", "state_gb": gb, "features": FEATURES, "rows": steps * BATCH},
            "train": {"epochs": epochs, "batch_size": BATCH, "validation_split": 0.0, "seed": 7},
            "checkpoint": checkpoint,
        },
        strict=False,
    )
    text: str = spec_json(job)
    return text


def events(run_dir: Path) -> list[dict[str, Any]]:
    out = []
    path = run_dir / "events.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def named(evs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in evs if e.get("event") == name]


def run_worker(run_dir: Path, until: str | None = None) -> tuple[list[dict[str, Any]], Sampler]:
    """Run one worker attempt; with `until`, kill it once that event is logged."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    with open(run_dir / "stderr.log", "w") as stderr:  # the child holds its own descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "ckptd.worker", str(run_dir), "1"],
            cwd=run_dir,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    sampler = Sampler(proc.pid)
    sampler.start()
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if until and named(events(run_dir), until):
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.2)
        else:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                raise RuntimeError(f"{run_dir}: timed out")
        code = proc.wait()
    finally:
        sampler.done.set()
        sampler.join()
    if until is None and code != 0:
        tail = (run_dir / "stderr.log").read_text().strip().splitlines()[-15:]
        raise RuntimeError(f"{run_dir}: worker exit {code}\n" + "\n".join(tail))
    return events(run_dir), sampler


def checkpoint_bytes(ckpt_dir: Path) -> tuple[int, list[Path]]:
    manifests = sorted(ckpt_dir.glob("ckpt-*.manifest.json"), key=lambda p: int(p.name.split(".")[0][5:]))
    files = json.loads(manifests[-1].read_text())["files"]
    return sum(int(f["size"]) for f in files.values()), [ckpt_dir / n for n in files]


@dataclass
class Row:
    gb: float
    state_bytes: int = 0
    disk_write: float = 0.0  # median of the samples
    disk_read: float = 0.0
    disk_writes: list[float] = field(default_factory=list)
    disk_reads: list[float] = field(default_factory=list)
    every: int = 0
    step_seconds: float = 0.0
    saves: int = 0
    asked: int = 0
    stall_ms: float = 0.0
    save_bw: float = 0.0  # interval saves, written beside training (median)
    save_seconds: float = 0.0
    final_bw: float = 0.0  # the final save, which training waits for (the writer alone)
    lost_per_save: float = 0.0  # training seconds each save cost (window time - base-rate time)
    throughput: float = 0.0
    extra_bytes: int = 0
    restore_seconds: float = 0.0
    restore_bw: float = 0.0
    first_step_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def loop_rate(evs: list[dict[str, Any]]) -> tuple[int, float]:
    """Steps and seconds from the first step's end to the epoch's end: without the process start
    and the first step (tracing), with every stall and slower step a save causes."""
    done = named(evs, "training.done")[-1]
    first = float(named(evs, "training.first_step")[0]["ts"])
    end = float(named(evs, "epoch.end")[-1]["ts"])
    return int(done["steps"]) - 1, end - first


def measure(gb: float, root: Path, mode: str | None, per_gb: float | None) -> Row:
    """One size; `per_gb`: an interval of that many seconds per GB of state instead of 10x the
    disk time."""
    row = Row(gb)
    row.disk_writes, row.disk_reads = disk_bandwidth(root, int(gb * 1e9))
    row.disk_write, row.disk_read = statistics.median(row.disk_writes), statistics.median(row.disk_reads)
    disk_seconds = gb * 1e9 / row.disk_write
    # base: a short calibration of the step time first decides N
    base = root / f"base-{gb}"
    base.mkdir()
    (base / "spec.json").write_text(spec(gb, 10, 1, None, mode))
    evs, _ = run_worker(base)
    steps, seconds = loop_rate(evs)
    row.step_seconds = seconds / steps
    every_seconds = per_gb * gb if per_gb else 10 * disk_seconds
    row.every = max(5, math.ceil(every_seconds / row.step_seconds))
    shutil.rmtree(base)
    base.mkdir()
    (base / "spec.json").write_text(spec(gb, INTERVALS * row.every + 1, 1, None, mode))
    evs, base_sampler = run_worker(base)
    steps, seconds = loop_rate(evs)
    base_rate = steps / seconds
    base_peak = base_sampler.peak(evs)
    row.step_seconds = seconds / steps
    shutil.rmtree(base)
    # checkpointed
    run = root / f"ckpt-{gb}"
    run.mkdir()
    (run / "spec.json").write_text(spec(gb, INTERVALS * row.every + 1, 1, row.every, mode))
    evs, sampler = run_worker(run)
    steps, seconds = loop_rate(evs)
    row.throughput = (steps / seconds) / base_rate
    done = named(evs, "training.done")[-1]
    row.saves, row.asked = int(done.get("saves", 0)), int(done.get("due", 0))
    row.stall_ms = 1000 * float(done.get("stall_seconds", 0.0)) / max(row.saves, 1)
    interval = [e for e in named(evs, "checkpoint.committed") if e.get("reason") == "interval"]
    row.state_bytes, files = checkpoint_bytes(run / "checkpoints")
    if interval:
        row.save_seconds = sorted(float(e["seconds"]) for e in interval)[len(interval) // 2]
        row.save_bw = row.state_bytes / row.save_seconds
        row.extra_bytes = sampler.peak(evs) - base_peak
    else:
        row.notes.append("no interval save committed")
    row.lost_per_save = (seconds - steps / base_rate) / max(row.saves, 1)
    final = [e for e in named(evs, "checkpoint.committed") if e.get("reason") == "final"]
    if final:
        row.final_bw = row.state_bytes / float(final[-1]["seconds"])
    else:
        row.notes.append("no final save")
    # restore, cold
    evict(files)
    (run / "spec.json").write_text(spec(gb, INTERVALS * row.every + 1, 2, row.every, mode))
    for stale in ("events.jsonl",):
        (run / stale).unlink(missing_ok=True)
    evs, _ = run_worker(run, until="training.first_step")
    begin, end = named(evs, "restore.begin"), named(evs, "restore.done")
    first = named(evs, "training.first_step")
    if begin and end and first:
        row.restore_seconds = float(end[-1]["ts"]) - float(begin[-1]["ts"])
        row.restore_bw = row.state_bytes / row.restore_seconds
        row.first_step_seconds = float(first[-1]["ts"]) - float(end[-1]["ts"])
    else:
        row.notes.append("restore not observed")
    shutil.rmtree(run)
    return row


def mb(n: float) -> str:
    return f"{n / 1e6:,.0f}"


def print_table(rows: list[Row]) -> None:
    head = (
        "state GB | disk write MB/s (min-max) | save MB/s beside training (×disk) | "
        "final save MB/s (×disk) | stall ms/save | every N steps (step s) | training s lost/save | "
        "saves/asked | throughput ÷ none | extra memory MB (×state) | disk read MB/s | "
        "restore s (MB/s, ×disk) | restore→first step s"
    )
    print(head)
    print("|".join("---" for _ in head.split("|")))
    for r in rows:
        s = r.state_bytes or 1
        print(
            f"{s / 1e9:.2f} | {mb(r.disk_write)} ({mb(min(r.disk_writes))}-{mb(max(r.disk_writes))}) | "
            f"{mb(r.save_bw)} ({r.save_bw / r.disk_write:.2f}) | "
            f"{mb(r.final_bw)} ({r.final_bw / r.disk_write:.2f}) | "
            f"{r.stall_ms:.1f} | {r.every} ({r.step_seconds:.3f}) | {r.lost_per_save:.2f} | "
            f"{r.saves}/{r.asked} | "
            f"{r.throughput:.3f} | {mb(r.extra_bytes)} ({r.extra_bytes / s:.2f}) | {mb(r.disk_read)} | "
            f"{r.restore_seconds:.1f} ({mb(r.restore_bw)}, {r.restore_bw / r.disk_read:.2f}) | "
            f"{r.first_step_seconds:.1f}" + (f"  [{'; '.join(r.notes)}]" if r.notes else "")
        )


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gbs = [r.state_bytes / 1e9 for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(gbs, [r.save_bw / 1e6 for r in rows], "o-", label="ckptd save beside training")
    axes[0].plot(gbs, [r.final_bw / 1e6 for r in rows], "o-", label="ckptd final save")
    axes[0].plot(gbs, [r.disk_write / 1e6 for r in rows], "s--", label="disk write (dd+fsync)")
    axes[0].plot(gbs, [r.restore_bw / 1e6 for r in rows], "o-", label="ckptd restore (cold)")
    axes[0].plot(gbs, [r.disk_read / 1e6 for r in rows], "s--", label="disk read (cold)")
    axes[0].set(xlabel="state (GB)", ylabel="MB/s", title="bandwidth")
    axes[0].legend(fontsize=7)
    axes[1].plot(gbs, [r.stall_ms for r in rows], "o-")
    axes[1].set(xlabel="state (GB)", ylabel="ms", title="step-loop stall per save")
    axes[2].plot(
        gbs, [r.extra_bytes / max(r.state_bytes, 1) for r in rows], "o-", label="extra memory ÷ state"
    )
    axes[2].plot(gbs, [r.throughput for r in rows], "s-", label="throughput ÷ none")
    axes[2].set(xlabel="state (GB)", title="memory and throughput")
    axes[2].legend(fontsize=7)
    for ax in axes:
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.1,1,4", help="GB of state per size (default 0.1,1,4)")
    ap.add_argument("--mode", choices=["sync", "async"], help="checkpoint.mode (default: the job default)")
    ap.add_argument("--dir", type=Path, help="where to run (default: a temporary directory under /var/tmp)")
    ap.add_argument("--plot", type=Path, help="write a plot (SVG/PNG) of the figures")
    ap.add_argument("--json", type=Path, help="write the rows as JSON")
    ap.add_argument(
        "--interval-per-gb",
        type=float,
        help="save every this many seconds per GB of state (default: 10x the disk time from dd)",
    )
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ckptd-scale-", dir=args.dir or "/var/tmp"))
    rows = []
    try:
        for gb in [float(s) for s in args.sizes.split(",")]:
            print(f"# size {gb} GB ...", file=sys.stderr, flush=True)
            rows.append(measure(gb, root, args.mode, args.interval_per_gb))
            print(f"# {rows[-1]}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"mode: {args.mode or 'default'}; batch {BATCH}; {os.cpu_count()} CPUs")
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

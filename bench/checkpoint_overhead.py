"""Checkpoint overhead benchmark: training throughput with checkpointing / without, printed as a table.

    /work/venv/bin/python bench/checkpoint_overhead.py [--repeats 5] [--quick]

Every run is a fresh process. ckptd runs are `python -m ckptd.worker RUN_DIR 1` on a generated
spec.json; their throughput is steps / loop_seconds from the `training.done` event (the step loops
including save stalls, without process start, TF import and data loading). Keras runs call
`model.fit` in a child process of this script and time the whole fit() call. Methods run interleaved:
each repeat runs every (model, interval, method) once, in a shuffled order; the table reports medians.
The second part compares ckptd's sync save throughput on the large model with the disk's own
sequential write + fsync bandwidth, measured in the same directory during the same run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PIMA_MODEL = ROOT / "examples" / "pima" / "model.py"
PIMA_CSV = ROOT / "examples" / "pima" / "pima-indians-diabetes.csv"
LARGE_MODEL = HERE / "large_model.py"

SEED = 7
INTERVALS = (20, 100)
OFF_EVERY_STEPS = 10**9
OFF_EVERY_SECONDS = 604800.0
RUN_TIMEOUT_SECONDS = 1800
ASYNC_STALL_TARGET = 0.10  # async stall per save / sync stall per save
BANDWIDTH_TARGET = 0.7  # ckptd sync save throughput / disk write+fsync bandwidth
DISK_TEST_BYTES = 256 * 2**20
DISK_CHUNK_BYTES = 8 * 2**20
DISK_SAMPLES_MIN = 3
RESULT_PREFIX = "BENCH-RESULT "
# Steady state: epochs that end this long after the first step are the measured window. It leaves
# out one-time start-up costs (the first tf.function trace, the async writer's TensorFlow import
# competing with training for the CPU) that a run of hours does not feel.
WARMUP_SECONDS = 6.0
THROUGHPUT_TARGETS = {20: 0.95, 100: 0.98}  # ckptd async, steady ratio

BASELINES = ("none", "keras-none")
CKPTD_METHODS = ("none", "ckptd-sync", "ckptd-async")
CHECKPOINT_METHODS = ("ckptd-sync", "ckptd-async", "keras-ModelCheckpoint", "keras-BackupAndRestore")
BASELINE_OF = {"ckptd-sync": "none", "ckptd-async": "none", "keras-ModelCheckpoint": "keras-none",
               "keras-BackupAndRestore": "keras-none"}


@dataclass(frozen=True)
class Case:
    name: str
    entry: str  # /abs/path/file.py:function
    params: dict[str, Any]
    epochs: int
    batch_size: int


@dataclass(frozen=True)
class Unit:
    case: Case
    method: str
    interval: int | None  # None for the baselines

    @property
    def key(self) -> tuple[str, str, int | None]:
        return self.case.name, self.method, self.interval

    def label(self) -> str:
        every = f"every {self.interval}" if self.interval else "no ckpt"
        return f"{self.case.name:5} {every:9} {self.method}"


@dataclass
class Result:
    steps: int
    seconds: float
    saves: int = 0  # interval saves taken (async: snapshots handed to the writer)
    due: int = 0  # interval saves that fell due (async: more than taken when coalesced)
    stall_seconds: float = 0.0
    save_seconds: list[float] = field(default_factory=list)
    ckpt_bytes: int | None = None
    steady: float | None = None  # steps/s over the epochs after WARMUP_SECONDS

    @property
    def steps_per_sec(self) -> float:
        return self.steps / self.seconds

    @property
    def commits(self) -> int:
        """Interval checkpoints committed by the end of the run (`saves` counts the ones due)."""
        return len(self.save_seconds)

    @property
    def stall_per_save(self) -> float | None:
        return self.stall_seconds / self.saves if self.saves else None


Results = dict[tuple[str, str, int | None], list[Result | None]]


# -- running one unit ----------------------------------------------------------------------------


def run_process(cmd: list[str], cwd: Path, label: str) -> subprocess.CompletedProcess[str] | None:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=RUN_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        print(f"  FAILED {label}: timed out after {RUN_TIMEOUT_SECONDS} s", file=sys.stderr)
        return None
    if proc.returncode != 0:
        tail = "\n    ".join(proc.stderr.strip().splitlines()[-12:])
        print(f"  FAILED {label}: exit code {proc.returncode}; stderr tail:\n    {tail}", file=sys.stderr)
        return None
    return proc


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def newest_checkpoint_bytes(ckpt_dir: Path) -> int | None:
    manifests = sorted(ckpt_dir.glob("ckpt-*.manifest.json"),
                       key=lambda p: int(p.name.split(".")[0].rsplit("-", 1)[1]))
    if not manifests:
        return None
    files = json.loads(manifests[-1].read_text()).get("files", {})
    return sum(int(f["size"]) for f in files.values())


def ckptd_spec_json(unit: Unit) -> str:
    from ckptd.state.jobspec import JobSpec, spec_json

    every = unit.interval or OFF_EVERY_STEPS
    mode = "async" if unit.method == "ckptd-async" else "sync"
    case = unit.case
    spec = JobSpec.model_validate({
        "name": f"bench-{case.name}", "model": case.entry, "params": case.params,
        "train": {"epochs": case.epochs, "batch_size": case.batch_size, "validation_split": 0.0,
                  "seed": SEED, "deterministic": True},
        "checkpoint": {"dir": "checkpoints", "every_steps": every, "every_seconds": OFF_EVERY_SECONDS,
                       "max_to_keep": 3, "mode": mode}}, strict=False)
    text: str = spec_json(spec)
    return text


def run_ckptd(unit: Unit, run_dir: Path) -> Result | None:
    try:
        (run_dir / "spec.json").write_text(ckptd_spec_json(unit))
    except ValueError as e:  # pydantic's ValidationError, e.g. a mode the schema does not know
        print(f"  FAILED {unit.label()}: job spec rejected: {e}", file=sys.stderr)
        return None
    cmd = [sys.executable, "-m", "ckptd.worker", str(run_dir), "1"]
    if run_process(cmd, run_dir, unit.label()) is None:
        return None
    events = read_events(run_dir / "events.jsonl")
    done = [e for e in events if e.get("event") == "training.done"]
    if not done or not done[-1].get("steps") or not done[-1].get("loop_seconds"):
        print(f"  FAILED {unit.label()}: no usable training.done event", file=sys.stderr)
        return None
    last = done[-1]
    saves = [float(e["seconds"]) for e in events
             if e.get("event") == "checkpoint.committed" and e.get("reason") == "interval"]
    first = [float(e["ts"]) for e in events if e.get("event") == "training.first_step"]
    ends = [(float(e["ts"]), int(e["step"])) for e in events if e.get("event") == "epoch.end"]
    return Result(steps=int(last["steps"]), seconds=float(last["loop_seconds"]),
                  saves=int(last.get("saves", 0)), due=int(last.get("due", 0)),
                  stall_seconds=float(last.get("stall_seconds", 0.0)),
                  save_seconds=saves, ckpt_bytes=newest_checkpoint_bytes(run_dir / "checkpoints"),
                  steady=steady_rate(first[0], ends) if first else None)


def steady_rate(start: float, epoch_ends: list[tuple[float, int]]) -> float | None:
    """Steps/s between the first epoch end at least WARMUP_SECONDS after `start` and the last."""
    window = [(t, step) for t, step in epoch_ends if t - start >= WARMUP_SECONDS]
    if len(window) < 2 or window[-1][0] <= window[0][0]:
        return None
    return (window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0])


def run_keras(unit: Unit, run_dir: Path) -> Result | None:
    config = {"entry": unit.case.entry, "params": unit.case.params, "epochs": unit.case.epochs,
              "batch_size": unit.case.batch_size, "method": unit.method, "interval": unit.interval,
              "dir": str(run_dir / "out")}
    config_path = run_dir / "keras.json"
    config_path.write_text(json.dumps(config))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--keras-child", str(config_path)]
    proc = run_process(cmd, run_dir, unit.label())
    if proc is None:
        return None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if not lines:
        print(f"  FAILED {unit.label()}: the child printed no result", file=sys.stderr)
        return None
    data = json.loads(lines[-1].removeprefix(RESULT_PREFIX))
    return Result(steps=int(data["steps"]), seconds=float(data["seconds"]), ckpt_bytes=data["bytes"],
                  steady=data.get("steady"))


def run_unit(unit: Unit, tmp_root: Path) -> Result | None:
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=tmp_root))
    try:
        runner = run_ckptd if unit.method in CKPTD_METHODS else run_keras
        return runner(unit, run_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


# -- the Keras child process ---------------------------------------------------------------------


def load_build(entry: str) -> Callable[[dict[str, Any]], Any]:
    path, func = entry.rsplit(":", 1)
    sys.path.insert(0, str(Path(path).parent))
    spec = importlib.util.spec_from_file_location(f"bench_model_{Path(path).stem}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    build: Callable[[dict[str, Any]], Any] = getattr(module, func)
    return build


def keras_callbacks(method: str, interval: int | None, out: Path) -> list[Any]:
    import keras

    out.mkdir(parents=True, exist_ok=True)
    if method == "keras-ModelCheckpoint":
        return [keras.callbacks.ModelCheckpoint(filepath=str(out / "ckpt.weights.h5"),
                                                save_weights_only=True, save_freq=interval)]
    if method == "keras-BackupAndRestore":
        return [keras.callbacks.BackupAndRestore(backup_dir=str(out / "backup"), save_freq=interval)]
    return []


def keras_child(config_path: Path) -> int:
    import keras
    import tensorflow as tf

    cfg = json.loads(config_path.read_text())
    keras.utils.set_random_seed(SEED)
    tf.config.experimental.enable_op_determinism()
    model, (x, y) = load_build(cfg["entry"])(cfg["params"])
    out = Path(cfg["dir"])
    per_epoch = math.ceil(len(y) / cfg["batch_size"])
    first: list[float] = []
    ends: list[tuple[float, int]] = []
    clock = keras.callbacks.LambdaCallback(  # the same window as ckptd's events (wall clock)
        on_train_batch_end=lambda batch, logs: first or first.append(time.time()),
        on_epoch_end=lambda epoch, logs: ends.append((time.time(), (epoch + 1) * per_epoch)))
    callbacks = keras_callbacks(cfg["method"], cfg["interval"], out)
    t0 = time.perf_counter()
    model.fit(x, y, epochs=cfg["epochs"], batch_size=cfg["batch_size"], validation_split=0.0,
              shuffle=True, verbose=0, callbacks=[*callbacks, clock])
    seconds = time.perf_counter() - t0
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) or None
    print(RESULT_PREFIX + json.dumps({"steps": cfg["epochs"] * per_epoch, "seconds": seconds,
                                      "bytes": written, "steady": steady_rate(first[0], ends)}))
    return 0


# -- disk bandwidth ------------------------------------------------------------------------------


def measure_disk(directory: Path) -> float:
    """Sequential write of DISK_TEST_BYTES in DISK_CHUNK_BYTES chunks, then fsync: bytes/s."""
    chunk = os.urandom(DISK_CHUNK_BYTES)
    path = directory / "disk-bandwidth.bin"
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(DISK_TEST_BYTES // DISK_CHUNK_BYTES):
            os.write(fd, chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    path.unlink()
    return DISK_TEST_BYTES / seconds


# -- the schedule --------------------------------------------------------------------------------


def make_cases(args: argparse.Namespace) -> list[Case]:
    small_epochs = args.small_epochs or (3 if args.quick else 12)
    large_rows = args.large_rows or (4000 if args.quick else 9600)
    large_epochs = args.large_epochs or 1
    small = Case("small", f"{PIMA_MODEL}:build", {"csv": str(PIMA_CSV)}, epochs=small_epochs,
                 batch_size=10)
    large = Case("large", f"{LARGE_MODEL}:build",
                 {"kind": args.large_kind, "rows": large_rows, "seed": SEED}, epochs=large_epochs,
                 batch_size=32)
    names = args.models.split(",")
    return [c for c in (small, large) if c.name in names]


def units_of(case: Case) -> list[Unit]:
    units = [Unit(case, m, None) for m in BASELINES]
    units += [Unit(case, m, n) for n in INTERVALS for m in CHECKPOINT_METHODS]
    return units


def describe(result: Result | None) -> str:
    if result is None:
        return "n/a"
    stall = result.stall_per_save
    extra = f", stall {stall * 1e3:.1f} ms/save x {result.saves}" if stall is not None else ""
    return f"{result.steps_per_sec:.1f} steps/s ({result.steps} steps in {result.seconds:.2f} s{extra})"


def run_all(cases: list[Case], repeats: int, tmp_root: Path) -> tuple[Results, list[float]]:
    results: Results = {}
    disk: list[float] = []
    start = time.monotonic()
    for r in range(repeats):
        disk.append(measure_disk(tmp_root))
        units = [u for c in cases for u in units_of(c)]
        random.Random(SEED + r).shuffle(units)
        for i, unit in enumerate(units, 1):
            result = run_unit(unit, tmp_root)
            results.setdefault(unit.key, []).append(result)
            print(f"[{time.monotonic() - start:6.0f}s] repeat {r + 1}/{repeats} run {i}/{len(units)} "
                  f"{unit.label()}: {describe(result)}", file=sys.stderr, flush=True)
    while len(disk) < DISK_SAMPLES_MIN:
        disk.append(measure_disk(tmp_root))
    return results, disk


# -- the report ----------------------------------------------------------------------------------


def ok(runs: Sequence[Result | None]) -> list[Result]:
    return [r for r in runs if r is not None]


def median_or_none(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def median_rate(runs: Sequence[Result | None]) -> float | None:
    return median_or_none([r.steps_per_sec for r in ok(runs)])


def median_steady(runs: Sequence[Result | None]) -> float | None:
    return median_or_none([r.steady for r in ok(runs) if r.steady is not None])


def median_stall(runs: Sequence[Result | None]) -> float | None:
    return median_or_none([s for r in ok(runs) if (s := r.stall_per_save) is not None])


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def verdict(value: float | None, target: float, at_most: bool) -> str:
    if value is None:
        return "n/a"
    passed = value <= target if at_most else value >= target
    return f"{'PASS' if passed else 'FAIL'} ({value:.3f})"


HEADER = ("model", "interval", "method", "ok", "steps/s", "ratio", "steady", "stall ms/save",
          "commits/due", "target", "result")


def table_rows(case: Case, results: Results) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for base in BASELINES:
        runs = results.get((case.name, base, None), [])
        rate = median_rate(runs)
        rows.append((case.name, "-", base, f"{len(ok(runs))}/{len(runs)}", fmt(rate, ".1f"),
                     "1.000" if rate else "n/a", "1.000" if median_steady(runs) else "n/a",
                     "-", "-", "-", "-"))
        for n in INTERVALS:
            rows += [method_row(case, m, n, results) for m in CHECKPOINT_METHODS if BASELINE_OF[m] == base]
    return rows


def commits_text(runs: Sequence[Result | None]) -> str:
    good = ok(runs)
    if not good:
        return "n/a"
    return f"{statistics.median(r.commits for r in good):g}/{statistics.median(r.due for r in good):g}"


def async_verdict(case: Case, interval: int, results: Results) -> str:
    runs = ok(results.get((case.name, "ckptd-async", interval), []))
    if runs and statistics.median(r.commits for r in runs) == 0:
        return "n/a: no interval save committed"
    stall = median_stall(runs)
    sync = median_stall(results.get((case.name, "ckptd-sync", interval), []))
    return verdict(stall / sync if stall is not None and sync else None, ASYNC_STALL_TARGET, True)


def method_row(case: Case, method: str, interval: int, results: Results) -> tuple[str, ...]:
    runs = results.get((case.name, method, interval), [])
    base_runs = results.get((case.name, BASELINE_OF[method], None), [])
    rate, base = median_rate(runs), median_rate(base_runs)
    ratio = rate / base if rate is not None and base else None
    steady, steady_base = median_steady(runs), median_steady(base_runs)
    steady_ratio = steady / steady_base if steady is not None and steady_base else None
    stall_text, commits, target, result = "-", "-", "-", "-"
    if method.startswith("ckptd"):
        stall = median_stall(runs)
        stall_text = fmt(stall * 1e3 if stall is not None else None, ".1f")
        commits = commits_text(runs)
    if method == "ckptd-async":
        goal = THROUGHPUT_TARGETS[interval]
        target = f"stall/sync <= {ASYNC_STALL_TARGET:.2f}; steady >= {goal:.2f}"
        result = (f"{async_verdict(case, interval, results)}; "
                  f"{verdict(steady_ratio, goal, False)}")
    return (case.name, str(interval), method, f"{len(ok(runs))}/{len(runs)}", fmt(rate, ".1f"),
            fmt(ratio, ".3f"), fmt(steady_ratio, ".3f"), stall_text, commits, target, result)


def render(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in [HEADER, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def bandwidth_lines(results: Results, disk: list[float]) -> list[str]:
    disk_bw = statistics.median(disk)
    samples = ", ".join(f"{d / 1e6:.0f}" for d in disk)
    lines = [f"disk sequential write + fsync ({DISK_TEST_BYTES // 2**20} MiB in "
             f"{DISK_CHUNK_BYTES // 2**20} MiB chunks): median {disk_bw / 1e6:.1f} MB/s "
             f"of {len(disk)} samples [{samples}]"]
    runs = [r for n in INTERVALS for r in ok(results.get(("large", "ckptd-sync", n), []))]
    seconds = median_or_none([s for r in runs for s in r.save_seconds])
    size = median_or_none([float(r.ckpt_bytes) for r in runs if r.ckpt_bytes])
    if seconds is None or size is None:
        return [*lines, "ckptd sync save throughput (large): n/a (no successful large ckptd-sync run)"]
    save_bw = size / seconds
    lines.append(f"ckptd sync save throughput (large): checkpoint {size / 1e6:.1f} MB / median interval "
                 f"save {seconds:.3f} s (of {sum(len(r.save_seconds) for r in runs)} saves) = "
                 f"{save_bw / 1e6:.1f} MB/s")
    lines.append(f"save / disk bandwidth ratio: target >= {BANDWIDTH_TARGET:.2f}: "
                 f"{verdict(save_bw / disk_bw, BANDWIDTH_TARGET, False)}")
    return lines


def size_lines(cases: list[Case], results: Results) -> list[str]:
    lines = []
    for case in cases:
        for method, what in (("ckptd-sync", "ckptd checkpoint (model + optimizer + state)"),
                             ("keras-ModelCheckpoint", "Keras ModelCheckpoint .weights.h5")):
            sizes = [float(r.ckpt_bytes) for n in INTERVALS
                     for r in ok(results.get((case.name, method, n), [])) if r.ckpt_bytes]
            lines.append(f"{case.name}: {what}: {fmt(median_or_none(sizes), ',.0f')} bytes")
    return lines


def fs_type(path: Path) -> str:
    best, kind = "", "?"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    for line in mounts:
        parts = line.split()
        if len(parts) >= 3 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
            best, kind = parts[1], f"{parts[2]} on {parts[0]}"
    return kind


def version_of(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_lines(tmp_root: Path, load_at_start: str) -> list[str]:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [f"nproc: {affinity} (cpu_count {os.cpu_count()}), CPU: {cpu_model()}, "
            f"load average at start {load_at_start}, at end {load_average()}",
            f"python {platform.python_version()}, tensorflow {version_of('tensorflow')}, "
            f"keras {version_of('keras')}, ckptd {version_of('ckptd')}, {platform.platform()}",
            f"benchmark directory: {tmp_root} ({fs_type(tmp_root)})"]


def async_deferred(cases: list[Case], results: Results) -> bool:
    return any(r.commits < r.due for c in cases for n in INTERVALS
               for r in ok(results.get((c.name, "ckptd-async", n), [])))


def print_report(cases: list[Case], results: Results, disk: list[float], repeats: int,
                 tmp_root: Path, elapsed: float, load_at_start: str) -> None:
    rows = [row for case in cases for row in table_rows(case, results)]
    print()
    print(f"== Checkpoint overhead: medians of {repeats} interleaved repeat(s), {elapsed:.0f} s total ==")
    for case in cases:
        steps = sorted({r.steps for key, runs in results.items() if key[0] == case.name for r in ok(runs)})
        print(f"{case.name}: {case.entry.rsplit('/', 1)[-1]} params={json.dumps(case.params)} "
              f"epochs={case.epochs} batch={case.batch_size}, steps per run: {steps or 'n/a'}")
    print(render(rows))
    print("ratio: ckptd rows vs 'none' (ckptd, checkpointing off); keras rows vs 'keras-none' (plain fit).")
    print("ckptd steps/s = steps / loop_seconds of the worker's training.done event (includes the first "
          "tf.function trace and save stalls; excludes process start, TF import and data loading).")
    print("keras steps/s = steps / wall time of the whole model.fit() call (includes one tf.function "
          "trace and fit's data setup). 'ok' = successful runs / runs.")
    print(f"steady = the same ratio over the epochs ending >= {WARMUP_SECONDS:g} s after the first step "
          "(leaves out one-time start-up: first trace, the async writer's TensorFlow import).")
    print("stall ms/save = the worker's stall_seconds / saves. commits/due = interval checkpoints "
          "committed by the end of the run / interval saves the step loop counted as due (medians).")
    if async_deferred(cases, results):
        print("NOTE: ckptd-async committed fewer interval checkpoints than fell due: a save that falls "
              "due while the writer is busy, starting, or pacing itself (checkpoint.async_writer_share) "
              "is deferred to the next step the writer can take it, and saves falling due meanwhile "
              "coalesce into it. stall ms/save counts the snapshots taken.")
    print()
    print("\n".join(size_lines(cases, results)))
    print()
    print("\n".join(bandwidth_lines(results, disk)))
    print()
    print("\n".join(machine_lines(tmp_root, load_at_start)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats (default 5)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 repeat, fewer steps")
    ap.add_argument("--models", default="small,large", help="comma-separated subset of small,large")
    ap.add_argument("--large-kind", choices=("embedding", "dense"), default="embedding",
                    help="large model variant, see bench/large_model.py (dense: ~300 ms/step on 2 cores)")
    ap.add_argument("--small-epochs", type=int, default=None,
                    help="epochs of the small model at batch 10 (default 12; --quick: 3)")
    ap.add_argument("--large-epochs", type=int, default=None,
                    help="epochs of the large model (default 1; the steady window needs >= 3)")
    ap.add_argument("--large-rows", type=int, default=None,
                    help="rows of the large model, 1 epoch at batch 32 (default 9600; --quick: 4000)")
    ap.add_argument("--tmp-dir", default=None, help="parent of the benchmark's temporary directory")
    ap.add_argument("--keras-child", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.keras_child:
        return keras_child(Path(args.keras_child))
    repeats = 1 if args.quick else args.repeats
    cases = make_cases(args)
    tmp_root = Path(tempfile.mkdtemp(prefix="ckptd-bench-", dir=args.tmp_dir))
    start, load_at_start = time.monotonic(), load_average()
    try:
        results, disk = run_all(cases, repeats, tmp_root)
        print_report(cases, results, disk, repeats, tmp_root, time.monotonic() - start, load_at_start)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

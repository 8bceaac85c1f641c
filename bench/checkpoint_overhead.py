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
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from overhead_report import load_average, print_report  # bench/ is on sys.path
from overhead_units import (
    BASELINES,
    CHECKPOINT_METHODS,
    CKPTD_METHODS,
    DISK_CHUNK_BYTES,
    DISK_SAMPLES_MIN,
    DISK_TEST_BYTES,
    INTERVALS,
    OFF_EVERY_SECONDS,
    OFF_EVERY_STEPS,
    RESULT_PREFIX,
    RUN_TIMEOUT_SECONDS,
    SEED,
    WARMUP_SECONDS,
    Case,
    Result,
    Results,
    Unit,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PIMA_MODEL = ROOT / "examples" / "pima" / "model.py"
PIMA_CSV = ROOT / "examples" / "pima" / "pima-indians-diabetes.csv"
LARGE_MODEL = HERE / "large_model.py"


# -- running one unit ----------------------------------------------------------------------------


def run_process(cmd: list[str], cwd: Path, label: str) -> subprocess.CompletedProcess[str] | None:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_SECONDS
        )
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
    manifests = sorted(
        ckpt_dir.glob("ckpt-*.manifest.json"), key=lambda p: int(p.name.split(".")[0].rsplit("-", 1)[1])
    )
    if not manifests:
        return None
    files = json.loads(manifests[-1].read_text()).get("files", {})
    return sum(int(f["size"]) for f in files.values())


def ckptd_spec_json(unit: Unit) -> str:
    from ckptd.state.jobspec import JobSpec, spec_json

    every = unit.interval or OFF_EVERY_STEPS
    case = unit.case
    checkpoint: dict[str, Any] = {
        "dir": "checkpoints",
        "every_steps": every,
        "every_seconds": OFF_EVERY_SECONDS,
        "max_to_keep": 3,
    }
    if unit.method != "ckptd-default":
        checkpoint["mode"] = "async" if unit.method == "ckptd-async" else "sync"
    spec = JobSpec.model_validate(
        {
            "name": f"bench-{case.name}",
            "model": case.entry,
            "params": case.params,
            "train": {
                "epochs": case.epochs,
                "batch_size": case.batch_size,
                "validation_split": 0.0,
                "seed": SEED,
                "deterministic": True,
            },
            "checkpoint": checkpoint,
        },
        strict=False,
    )
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
    saves = [
        float(e["seconds"])
        for e in events
        if e.get("event") == "checkpoint.committed" and e.get("reason") == "interval"
    ]
    first = [float(e["ts"]) for e in events if e.get("event") == "training.first_step"]
    ends = [(float(e["ts"]), int(e["step"])) for e in events if e.get("event") == "epoch.end"]
    return Result(
        steps=int(last["steps"]),
        seconds=float(last["loop_seconds"]),
        saves=int(last.get("saves", 0)),
        due=int(last.get("due", 0)),
        stall_seconds=float(last.get("stall_seconds", 0.0)),
        save_seconds=saves,
        ckpt_bytes=newest_checkpoint_bytes(run_dir / "checkpoints"),
        steady=steady_rate(first[0], ends) if first else None,
    )


def steady_rate(start: float, epoch_ends: list[tuple[float, int]]) -> float | None:
    """Steps/s between the first epoch end at least WARMUP_SECONDS after `start` and the last."""
    window = [(t, step) for t, step in epoch_ends if t - start >= WARMUP_SECONDS]
    if len(window) < 2 or window[-1][0] <= window[0][0]:
        return None
    return (window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0])


def run_keras(unit: Unit, run_dir: Path) -> Result | None:
    config = {
        "entry": unit.case.entry,
        "params": unit.case.params,
        "epochs": unit.case.epochs,
        "batch_size": unit.case.batch_size,
        "method": unit.method,
        "interval": unit.interval,
        "dir": str(run_dir / "out"),
    }
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
    return Result(
        steps=int(data["steps"]),
        seconds=float(data["seconds"]),
        ckpt_bytes=data["bytes"],
        steady=data.get("steady"),
    )


def run_unit(unit: Unit, tmp_root: Path) -> Result | None:
    # Write back what earlier units left dirty (a large checkpoint is 100+ MB) now, so that the
    # kernel's writeback does not compete with this unit's training for the 2 cores.
    os.sync()
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
        return [
            keras.callbacks.ModelCheckpoint(
                filepath=str(out / "ckpt.weights.h5"), save_weights_only=True, save_freq=interval
            )
        ]
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
        on_train_batch_end=lambda batch, logs: None if first else first.append(time.time()),
        on_epoch_end=lambda epoch, logs: ends.append((time.time(), (epoch + 1) * per_epoch)),
    )
    callbacks = keras_callbacks(cfg["method"], cfg["interval"], out)
    t0 = time.perf_counter()
    model.fit(
        x,
        y,
        epochs=cfg["epochs"],
        batch_size=cfg["batch_size"],
        validation_split=0.0,
        shuffle=True,
        verbose=0,
        callbacks=[*callbacks, clock],
    )
    seconds = time.perf_counter() - t0
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) or None
    print(
        RESULT_PREFIX
        + json.dumps(
            {
                "steps": cfg["epochs"] * per_epoch,
                "seconds": seconds,
                "bytes": written,
                "steady": steady_rate(first[0], ends),
            }
        )
    )
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
    small = Case("small", f"{PIMA_MODEL}:build", {"csv": str(PIMA_CSV)}, epochs=small_epochs, batch_size=10)
    large = Case(
        "large",
        f"{LARGE_MODEL}:build",
        {"kind": args.large_kind, "rows": large_rows, "seed": SEED},
        epochs=large_epochs,
        batch_size=32,
    )
    names = args.models.split(",")
    return [c for c in (small, large) if c.name in names]


def units_of(case: Case, methods: set[str]) -> list[Unit]:
    units = [Unit(case, m, None) for m in BASELINES if m in methods]
    units += [Unit(case, m, n) for n in INTERVALS for m in CHECKPOINT_METHODS if m in methods]
    return units


def describe(result: Result | None) -> str:
    if result is None:
        return "n/a"
    stall = result.stall_per_save
    extra = f", stall {stall * 1e3:.1f} ms/save x {result.saves}" if stall is not None else ""
    return f"{result.steps_per_sec:.1f} steps/s ({result.steps} steps in {result.seconds:.2f} s{extra})"


def run_all(
    cases: list[Case],
    methods: set[str],
    repeats: int,
    tmp_root: Path,
) -> tuple[Results, list[float]]:
    results: Results = {}
    disk: list[float] = []
    start = time.monotonic()
    for r in range(repeats):
        disk.append(measure_disk(tmp_root))
        units = [u for c in cases for u in units_of(c, methods)]
        random.Random(SEED + r).shuffle(units)
        for i, unit in enumerate(units, 1):
            result = run_unit(unit, tmp_root)
            results.setdefault(unit.key, []).append(result)
            print(
                f"[{time.monotonic() - start:6.0f}s] repeat {r + 1}/{repeats} run {i}/{len(units)} "
                f"{unit.label()}: {describe(result)}",
                file=sys.stderr,
                flush=True,
            )
    while len(disk) < DISK_SAMPLES_MIN:
        disk.append(measure_disk(tmp_root))
    return results, disk


def methods_of(text: str) -> set[str]:
    known = {*BASELINES, *CHECKPOINT_METHODS}
    methods = {m.strip() for m in text.split(",") if m.strip()}
    if not methods or methods - known:
        sys.exit(
            f"--methods: unknown {sorted(methods - known) or 'empty list'}; known: {', '.join(sorted(known))}"
        )
    return methods


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats (default 5)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 repeat, fewer steps")
    ap.add_argument("--models", default="small,large", help="comma-separated subset of small,large")
    ap.add_argument(
        "--methods",
        default=",".join((*BASELINES, *CHECKPOINT_METHODS)),
        help="comma-separated subset of the methods (default: all); a checkpointing "
        "method is compared with its baseline, which must be in the subset",
    )
    ap.add_argument(
        "--large-kind",
        choices=("embedding", "dense"),
        default="embedding",
        help="large model variant, see bench/large_model.py (dense: ~300 ms/step on 2 cores)",
    )
    ap.add_argument(
        "--small-epochs",
        type=int,
        default=None,
        help="epochs of the small model at batch 10 (default 12; --quick: 3)",
    )
    ap.add_argument(
        "--large-epochs",
        type=int,
        default=None,
        help="epochs of the large model (default 1; the steady window needs >= 3)",
    )
    ap.add_argument(
        "--large-rows",
        type=int,
        default=None,
        help="rows of the large model, 1 epoch at batch 32 (default 9600; --quick: 4000)",
    )
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
        results, disk = run_all(cases, methods_of(args.methods), repeats, tmp_root)
        print_report(cases, results, disk, repeats, tmp_root, time.monotonic() - start, load_at_start)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

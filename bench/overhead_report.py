"""The checkpoint overhead benchmark's printed report: medians, ratios, verdicts against the
targets, checkpoint sizes, save vs disk bandwidth and the machine it ran on."""

from __future__ import annotations

import json
import os
import platform
import statistics
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from overhead_units import (
    ASYNC_STALL_TARGET,
    BANDWIDTH_TARGET,
    BASELINE_OF,
    BASELINES,
    CHECKPOINT_METHODS,
    DISK_CHUNK_BYTES,
    DISK_TEST_BYTES,
    INTERVALS,
    THROUGHPUT_TARGETS,
    WARMUP_SECONDS,
    Case,
    Result,
    Results,
)


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


def paired_steady(runs: Sequence[Result | None], base_runs: Sequence[Result | None]) -> float | None:
    """Median over repeats of (steady rate / the baseline's steady rate in the same repeat): drift
    of the machine between repeats cancels out of each pair."""
    return median_or_none(
        [
            r.steady / b.steady
            for r, b in zip(runs, base_runs, strict=False)
            if r is not None and b is not None and r.steady and b.steady
        ]
    )


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def verdict(value: float | None, target: float, at_most: bool) -> str:
    if value is None:
        return "n/a"
    passed = value <= target if at_most else value >= target
    return f"{'PASS' if passed else 'FAIL'} ({value:.3f})"


HEADER = (
    "model",
    "interval",
    "method",
    "ok",
    "steps/s",
    "ratio",
    "steady",
    "paired",
    "stall ms/save",
    "commits/due",
    "target",
    "result",
)


def table_rows(case: Case, results: Results) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for base in BASELINES:
        if (case.name, base, None) not in results:
            continue  # not in --methods
        runs = results.get((case.name, base, None), [])
        rate = median_rate(runs)
        rows.append(
            (
                case.name,
                "-",
                base,
                f"{len(ok(runs))}/{len(runs)}",
                fmt(rate, ".1f"),
                "1.000" if rate else "n/a",
                "1.000" if median_steady(runs) else "n/a",
                "-",
                "-",
                "-",
                "-",
                "-",
            )
        )
        for n in INTERVALS:
            rows += [
                method_row(case, m, n, results)
                for m in CHECKPOINT_METHODS
                if BASELINE_OF[m] == base and (case.name, m, n) in results
            ]
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


def ratio_of(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def method_row(case: Case, method: str, interval: int, results: Results) -> tuple[str, ...]:
    runs = results.get((case.name, method, interval), [])
    base_runs = results.get((case.name, BASELINE_OF[method], None), [])
    rate, base = median_rate(runs), median_rate(base_runs)
    ratio = rate / base if rate is not None and base else None
    steady, steady_base = median_steady(runs), median_steady(base_runs)
    steady_ratio = steady / steady_base if steady is not None and steady_base else None
    paired = paired_steady(runs, base_runs)
    stall_text, commits, target, result = "-", "-", "-", "-"
    if method.startswith("ckptd"):
        stall = median_stall(runs)
        stall_text = fmt(stall * 1e3 if stall is not None else None, ".1f")
        commits = commits_text(runs)
    if method == "ckptd-async":
        goal = THROUGHPUT_TARGETS[interval]
        target = f"stall/sync <= {ASYNC_STALL_TARGET:.2f}; steady >= {goal:.2f}"
        result = (
            f"{async_verdict(case, interval, results)}; steady "
            f"{verdict(steady_ratio, goal, False)}, paired {verdict(paired, goal, False)}"
        )
    if method == "ckptd-default":
        keras = results.get((case.name, "keras-BackupAndRestore", interval), [])
        keras_ratio = ratio_of(
            median_steady(keras), median_steady(results.get((case.name, "keras-none", None), []))
        )
        target = "steady >= keras-BackupAndRestore's"
        result = verdict(steady_ratio / keras_ratio if steady_ratio and keras_ratio else None, 1.0, False)
        result += f" (Keras {fmt(keras_ratio, '.3f')})"
    return (
        case.name,
        str(interval),
        method,
        f"{len(ok(runs))}/{len(runs)}",
        fmt(rate, ".1f"),
        fmt(ratio, ".3f"),
        fmt(steady_ratio, ".3f"),
        fmt(paired, ".3f"),
        stall_text,
        commits,
        target,
        result,
    )


def render(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [HEADER, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def bandwidth_lines(results: Results, disk: list[float]) -> list[str]:
    disk_bw = statistics.median(disk)
    samples = ", ".join(f"{d / 1e6:.0f}" for d in disk)
    lines = [
        f"disk sequential write + fsync ({DISK_TEST_BYTES // 2**20} MiB in "
        f"{DISK_CHUNK_BYTES // 2**20} MiB chunks): median {disk_bw / 1e6:.1f} MB/s "
        f"of {len(disk)} samples [{samples}]"
    ]
    runs = [r for n in INTERVALS for r in ok(results.get(("large", "ckptd-sync", n), []))]
    seconds = median_or_none([s for r in runs for s in r.save_seconds])
    size = median_or_none([float(r.ckpt_bytes) for r in runs if r.ckpt_bytes])
    if seconds is None or size is None:
        return [*lines, "ckptd sync save throughput (large): n/a (no successful large ckptd-sync run)"]
    save_bw = size / seconds
    lines.append(
        f"ckptd sync save throughput (large): checkpoint {size / 1e6:.1f} MB / median interval "
        f"save {seconds:.3f} s (of {sum(len(r.save_seconds) for r in runs)} saves) = "
        f"{save_bw / 1e6:.1f} MB/s"
    )
    lines.append(
        f"save / disk bandwidth ratio: target >= {BANDWIDTH_TARGET:.2f}: "
        f"{verdict(save_bw / disk_bw, BANDWIDTH_TARGET, False)}"
    )
    return lines


def size_lines(cases: list[Case], results: Results) -> list[str]:
    lines = []
    for case in cases:
        for method, what in (
            ("ckptd-sync", "ckptd checkpoint (model + optimizer + state)"),
            ("keras-ModelCheckpoint", "Keras ModelCheckpoint .weights.h5"),
        ):
            sizes = [
                float(r.ckpt_bytes)
                for n in INTERVALS
                for r in ok(results.get((case.name, method, n), []))
                if r.ckpt_bytes
            ]
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
    return [
        f"nproc: {affinity} (cpu_count {os.cpu_count()}), CPU: {cpu_model()}, "
        f"load average at start {load_at_start}, at end {load_average()}",
        f"python {platform.python_version()}, tensorflow {version_of('tensorflow')}, "
        f"keras {version_of('keras')}, ckptd {version_of('ckptd')}, {platform.platform()}",
        f"benchmark directory: {tmp_root} ({fs_type(tmp_root)})",
    ]


def async_deferred(cases: list[Case], results: Results) -> bool:
    return any(
        r.commits < r.due
        for c in cases
        for n in INTERVALS
        for r in ok(results.get((c.name, "ckptd-async", n), []))
    )


def print_report(
    cases: list[Case],
    results: Results,
    disk: list[float],
    repeats: int,
    tmp_root: Path,
    elapsed: float,
    load_at_start: str,
) -> None:
    rows = [row for case in cases for row in table_rows(case, results)]
    print()
    print(f"== Checkpoint overhead: medians of {repeats} interleaved repeat(s), {elapsed:.0f} s total ==")
    for case in cases:
        steps = sorted({r.steps for key, runs in results.items() if key[0] == case.name for r in ok(runs)})
        print(
            f"{case.name}: {case.entry.rsplit('/', 1)[-1]} params={json.dumps(case.params)} "
            f"epochs={case.epochs} batch={case.batch_size}, steps per run: {steps or 'n/a'}"
        )
    print(render(rows))
    print("ratio: ckptd rows vs 'none' (ckptd, checkpointing off); keras rows vs 'keras-none' (plain fit).")
    print(
        "ckptd steps/s = steps / loop_seconds of the worker's training.done event (includes the first "
        "tf.function trace and save stalls; excludes process start, TF import and data loading)."
    )
    print(
        "keras steps/s = steps / wall time of the whole model.fit() call (includes one tf.function "
        "trace and fit's data setup). 'ok' = successful runs / runs."
    )
    print(
        f"steady = the same ratio over the epochs ending >= {WARMUP_SECONDS:g} s after the first step "
        "(leaves out one-time start-up: first trace, the async writer's TensorFlow import)."
    )
    print(
        "paired = the median over repeats of the steady ratio to the baseline run of the same "
        "repeat (each repeat runs every unit once, in a shuffled order; every unit starts after "
        "os.sync(), so it does not pay for the writeback of the unit before)."
    )
    print(
        "stall ms/save = the worker's stall_seconds / saves. commits/due = interval checkpoints "
        "committed by the end of the run / interval saves the step loop counted as due (medians)."
    )
    if async_deferred(cases, results):
        print(
            "NOTE: ckptd-async committed fewer interval checkpoints than fell due: a save that falls "
            "due while the writer is busy, starting, or paced (checkpoint.async_writer_share, and "
            "checkpoint.async_overhead_budget: the measured cost per save) is deferred to the next "
            "step the writer may take it, and saves falling due meanwhile coalesce into it. "
            "stall ms/save counts the snapshots taken."
        )
    print()
    print("\n".join(size_lines(cases, results)))
    print()
    print("\n".join(bandwidth_lines(results, disk)))
    print()
    print("\n".join(machine_lines(tmp_root, load_at_start)))

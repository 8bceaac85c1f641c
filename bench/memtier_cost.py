"""What one memory-tier snapshot costs beside a durable save (docs/memory-tier.md, issue 29).

For each size: a model `Input(256) -> Dense(W) -> Dense(1)` with Adam sized to S GB of state
(bench/large_model.py's "wide" kind, built directly), one training step, then, each alone on an
otherwise idle worker: the capture (the step loop's stall), the copy into the tier with its digest (xxh3_128)
(ckptd.worker.checkpoint.memsnap.write into a fresh file; a TierWriter over a reused one), the
tier's verification (read + CRC32), the restore by assignment,
and for comparison a TF bundle of the same state written to disk and fsynced (ckpt.write + fsync
of each file). Training-time cost beside a running step loop is phase 2's A/B bench.

    python bench/memtier_cost.py --sizes 0.1,1 [--disk DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from ckptd.state import memtier as mt
from ckptd.worker.checkpoint import memsnap
from ckptd.worker.checkpoint.snapshot import SnapshotPlan, object_graph_now


def _model(state_gb: float) -> tuple[tf.train.Checkpoint, keras.Model]:
    width = max(1, int(state_gb * 1e9 / 4 / 3 / 257))  # kernel + bias, each held 3x (Adam)
    model = keras.Sequential([keras.Input((256,)), keras.layers.Dense(width), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    model.optimizer.build(model.trainable_variables)
    x = np.ones((8, 256), np.float32)
    model.train_on_batch(x, np.ones((8, 1), np.float32))
    ckpt = tf.train.Checkpoint(model=model, optimizer=model.optimizer, step=tf.Variable(1, dtype=tf.int64))
    _ = ckpt.save_counter
    return ckpt, model


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _fsync_tree(path: Path) -> None:
    for p in path.iterdir():
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def _durable_bundle(ckpt: tf.train.Checkpoint, directory: Path) -> None:
    ckpt.write(str(directory / "b"))
    _fsync_tree(directory)


def measure(state_gb: float, disk: Path) -> dict[str, float]:
    ckpt, _ = _model(state_gb)
    graph = object_graph_now(ckpt)
    assert graph is not None
    plan = SnapshotPlan(ckpt, graph)
    root = Path("/dev/shm") / f"ckptd-bench-{uuid.uuid4().hex[:8]}"
    tier = mt.open_tier(str(root), "bench", os.geteuid())
    out: dict[str, float] = {"bytes": plan.nbytes}
    try:
        stalls = []
        for _ in range(5):
            t = time.perf_counter()
            captured = plan.capture()
            stalls.append(time.perf_counter() - t)
        out["stall_ms"] = 1000 * min(stalls)
        at = memsnap.Position("bench@x", 1, 1, 0, 1)
        snap: list[mt.Snap] = []
        # A capture is consumed by the copy (SnapshotPlan.fill): each write gets its own.
        out["write_s"] = _timed(lambda: snap.append(memsnap.write(tier, plan, captured, at)))
        # A TierWriter's steady state: keep 1, so from the third write on the file is a reused one.
        writer = memsnap.TierWriter(tier, plan, keep=1)
        try:
            reused = []
            for n in (2, 3, 4):
                captured = plan.capture()
                t = time.perf_counter()
                writer.write(captured, memsnap.Position("bench@x", 1, n, 0, n))
                reused.append(time.perf_counter() - t)
        finally:
            writer.close()
        out["reused_s"] = min(reused[1:])
        snap[0] = mt.snapshots(tier)[0][-1]
        out["verify_s"] = _timed(lambda: mt.verify(snap[0]))
        out["restore_s"] = _timed(lambda: memsnap.restore(snap[0], ckpt, plan))
        out["tier_bytes"] = mt.tier_bytes(tier)
        bundle = Path(tempfile.mkdtemp(dir=disk, prefix="ckptd-bench-"))
        try:
            out["bundle_fsync_s"] = _timed(lambda: _durable_bundle(ckpt, bundle))
        finally:
            shutil.rmtree(bundle)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.1,1")
    ap.add_argument("--disk", type=Path, default=Path.cwd())
    args = ap.parse_args()
    print(
        "| state | stall (capture) | copy + digest into the tier, fresh file | the same, reused file "
        "| verify (read + digest) "
        "| restore by assignment | TF bundle + fsync to disk | tier RAM |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for size in (float(s) for s in args.sizes.split(",")):
        r = measure(size, args.disk)
        gb = r["bytes"] / 1e9
        cells = [
            f"{gb:.2f} GB",
            f"{r['stall_ms']:.1f} ms",
            f"{r['write_s']:.2f} s ({gb / r['write_s']:.2f} GB/s)",
            f"{r['reused_s']:.2f} s ({gb / r['reused_s']:.2f} GB/s)",
            f"{r['verify_s']:.2f} s ({gb / r['verify_s']:.2f} GB/s)",
            f"{r['restore_s']:.2f} s",
            f"{r['bundle_fsync_s']:.2f} s ({gb / r['bundle_fsync_s']:.2f} GB/s)",
            f"{r['tier_bytes'] / 1e9:.2f} GB",
        ]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

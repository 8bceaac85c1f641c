"""T04: the system-call order of real saves, traced with strace, follows the commit protocol;
TF's stock CheckpointManager, traced the same way, does not (negative control)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ckptd.state.jobfile import load_job_file
from ckptd.state.jobspec import spec_json

from .conftest import EXAMPLE
from .straceaudit import audit, manifest_commits, parse, state_file_commits

pytestmark = [pytest.mark.tf, pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")]
TRACED = "openat,write,pwrite64,fsync,fdatasync,rename,renameat,renameat2,unlink,unlinkat"


def _strace(tmp_path: Path, argv: list[str]) -> str:
    log = tmp_path / "strace.log"
    subprocess.run(
        ["strace", "-f", "-qq", "-y", "-e", f"trace={TRACED}", "-o", str(log), *argv],
        check=True,
        timeout=300,
        capture_output=True,
    )
    return log.read_text()


def test_ckptd_commits_follow_the_protocol(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    spec, _ = load_job_file(EXAMPLE / "job.yaml")
    spec = spec.model_copy(
        update={
            "train": spec.train.model_copy(update={"epochs": 1}),
            "checkpoint": spec.checkpoint.model_copy(update={"every_steps": 20, "max_to_keep": 1}),
        }
    )
    (run / "spec.json").write_text(spec_json(spec))
    log = _strace(tmp_path, [sys.executable, "-m", "ckptd.worker", str(run), "1"])
    ops = parse(log)
    ckdir = str(run / "checkpoints")
    commits = manifest_commits(ops)
    # Steps 20, 40 and the final 52, committed by the forked async writer; under strace it may
    # still be writing 20 when 40 is due, and that save then coalesces into the final one.
    assert len(commits) in (2, 3), commits
    assert audit(ops, ckdir, commits) == []
    # `ckptd logs` never lags the last commit after a power cut: each commit's event is synced.
    # The trainer writes it when it reads the writer's reply, so other events may come first.
    events = str(run / "events.jsonl")
    for commit, _ in commits:
        writes = [o for o in ops[commit.i :] if o.call == "write" and o.path == events]
        after = [next((o.call for o in ops[w.i + 1 :] if o.path == events), None) for w in writes]
        synced = [w for w, call in zip(writes, after, strict=True) if call == "fsync"]
        assert synced, (commit, writes)


STOCK = """
import sys, keras, numpy as np, tensorflow as tf
m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), keras.layers.Dense(1)])
m.compile(optimizer="adam", loss="mse")
x, y = np.zeros((20, 8), "float32"), np.zeros((20,), "float32")
ck = tf.train.Checkpoint(model=m, optimizer=m.optimizer)
mgr = tf.train.CheckpointManager(ck, sys.argv[1], max_to_keep=1)
for _ in range(3):
    m.train_on_batch(x, y)
    mgr.save()
"""


def test_negative_control_stock_checkpoint_manager_fails_the_audit(tmp_path: Path) -> None:
    ckdir = tmp_path / "stock"
    script = tmp_path / "stock.py"
    script.write_text(STOCK)
    ops = parse(_strace(tmp_path, [sys.executable, str(script), str(ckdir)]))
    commits = state_file_commits(ops)  # TF's marker: its `checkpoint` state file
    assert len(commits) == 3
    problems = audit(ops, str(ckdir), commits)
    assert any("not fsynced" in p for p in problems), problems
    assert any("unlinked before" in p or "not fsynced" in p for p in problems)

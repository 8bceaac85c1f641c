"""A protocol-speaking stand-in for ckptd.worker, without TensorFlow, for daemon tests.

It does what the supervisor observes of a real worker: holds the checkpoint lock, beats from its
step loop, appends `checkpoint.committed` events, saves and exits 75 on SIGTERM, records its exit
code. Selected with CKPTD_WORKER_MODULE=tests.fakeworker (daemon tests only; the real worker is
exercised by the TensorFlow tests). FAKE_STEPS and FAKE_STEP_SECONDS shape the run;
FAKE_CRASH_AT=N makes attempt 1 crash at step N (FAKE_HANG_AT=N: hang there);
FAKE_SAVE_SECONDS slows the save on SIGTERM;
FAKE_ESCAPE=1 starts a setsid child and a double-forked grandchild (tests/escaper.py).
With --warm it waits for its hand-over line like a warm worker (ckptd.supervisor.warm).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from ckptd.state import protocol as p
from ckptd.state.durable import atomic_write_text, write_nondurable
from ckptd.state.jobspec import spec_from_json
from ckptd.state.paths import RunDir
from ckptd.state.protocol import Phase
from ckptd.supervisor.identity import drop_to, owner_from_json
from ckptd.worker.runtime import lock_dir, log_to

stop = []


def main() -> int:
    p.wait_contained()
    run, attempt = RunDir(Path(sys.argv[1])), int(sys.argv[2])
    log_to(run.attempt_dir(attempt))  # as the real worker: its own rights, its own logs
    if marker := os.environ.get("FAKE_WHOAMI"):  # the rights it runs with, for trust tests
        who = {
            "uid": os.getuid(),
            "euid": os.geteuid(),
            "gid": os.getgid(),
            "groups": sorted(os.getgroups()),
            "caps": _caps(),
        }
        atomic_write_text(run.root / marker, json.dumps(who))
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    if os.environ.get("FAKE_ESCAPE") == "1":  # children that leave its process group
        from tests.escaper import escape

        escape(run.root)
    spec = spec_from_json(run.spec_file.read_text())
    lock_dir(run.checkpoint_dir(spec.checkpoint.dir))
    total, pause = int(os.environ.get("FAKE_STEPS", "40")), float(os.environ.get("FAKE_STEP_SECONDS", "0.05"))
    events = run.root / p.EVENTS_FILE
    committed = _restored(events)
    hb = p.Heartbeat(
        pid=os.getpid(),
        attempt=attempt,
        seq=0,
        phase=Phase.TRAINING,
        time=time.time(),
        restored_step=committed,
        step=committed or 0,
    )
    code = p.EXIT_OK
    crash_at = int(os.environ.get("FAKE_CRASH_AT", "0")) if attempt == 1 else 0
    hang_at = int(os.environ.get("FAKE_HANG_AT", "0")) if attempt == 1 else 0
    for step in range((committed or 0) + 1, total + 1):
        if step == crash_at:
            raise RuntimeError(f"fake crash at step {step}")
        if step == hang_at:
            time.sleep(3600)  # alive, no heartbeat: a deadlock
        time.sleep(pause)
        hb.seq, hb.step, hb.time = hb.seq + 1, step, time.time()
        write_nondurable(run.heartbeat, hb.to_json())
        if step % 10 == 0 or stop:
            p.append_event(
                events,
                "checkpoint.committed",
                step=step,
                epoch=0,
                path=f"ckpt-{step}",
                metrics={},
                digest="fake",
            )
        if stop:
            time.sleep(float(os.environ.get("FAKE_SAVE_SECONDS", "0")))  # a slow final save
            code = p.EXIT_PREEMPTED
            break
    if stall := float(os.environ.get("FAKE_DONE_STALL", "0")):  # slow to exit after its end
        hb.seq, hb.phase, hb.time = hb.seq + 1, Phase.DONE, time.time()
        write_nondurable(run.heartbeat, hb.to_json())
        time.sleep(stall)
    atomic_write_text(run.attempt_dir(attempt) / p.EXIT_FILE, f"{code}\n")
    return code


def warm() -> int:
    Path(f"{os.getpid()}.ready").write_text("")
    line = sys.stdin.readline()
    Path(f"{os.getpid()}.ready").unlink(missing_ok=True)  # as ckptd.worker --warm: taken, no longer waiting
    if not line.strip():
        return p.EXIT_OK
    job = json.loads(line)
    if job.get("owner"):
        drop_to(owner_from_json(job["owner"]))
    os.environ.update(job["env"])
    os.chdir(job["run"])
    run = RunDir(Path(job["run"]))
    atomic_write_text(run.warm_env(os.getpid()), json.dumps(job["env"]))
    run.attempt_dir(int(job["mode"])).mkdir(parents=True, exist_ok=True)  # the worker's own logs
    sys.argv[1:] = [job["run"], job["mode"]]
    return main()


def _caps() -> dict[str, str]:
    lines = Path("/proc/self/status").read_text().splitlines()
    return {
        ln.split(":")[0]: ln.split()[1]
        for ln in lines
        if ln.startswith(("CapInh", "CapPrm", "CapEff", "CapAmb"))
    }


def _restored(events: Path) -> int | None:
    steps = [ev["step"] for ev in p.EventTail(events).read() if ev.get("event") == "checkpoint.committed"]
    return max(steps) if steps else None


if __name__ == "__main__":
    sys.exit(warm() if sys.argv[1:] == ["--warm"] else main())

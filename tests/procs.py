"""Helpers for real-process tests: start `ckptd run`, poll with deadlines (never fixed sleeps)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ckptd.state.protocol import Heartbeat

from . import conftest
from .conftest import ckptd_cmd, env_with

T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 120.0, interval: float = 0.02) -> T:
    timeout = conftest.slow(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def start_run(home: Path, *args: str, faults: str = "") -> subprocess.Popen[str]:
    env = env_with(home)
    if faults:
        env["CKPTD_FAULTS"] = faults
    return subprocess.Popen(
        ckptd_cmd("run", "--progress", "json", *args),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_dir(home: Path) -> Path:
    return wait_for(
        "the run directory",
        lambda: next(iter((home / "jobs").glob("*")), None) if (home / "jobs").exists() else None,
    )


def heartbeat_when(run: Path, cond: Callable[[Heartbeat], bool], timeout: float = 120) -> Heartbeat:
    def probe() -> Heartbeat | None:
        hb = Heartbeat.read(run / "heartbeat.json")
        return hb if hb is not None and cond(hb) else None

    return wait_for("a heartbeat", probe, timeout)


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=conftest.slow(timeout))
    return proc.returncode, out


def status(home: Path, job_id: str) -> dict[str, Any]:
    r = subprocess.run(
        ckptd_cmd("status", job_id, "--json"),
        env=env_with(home),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    data: dict[str, Any] = json.loads(r.stdout)
    return data


def events(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


def final_state_hash(run: Path) -> dict[str, str]:
    """SHA-256 per tensor of the newest committed checkpoint (weights, optimizer slots, step,
    epoch, RNG), excluding the save counter and the JSON host state (it holds wall times)."""
    import hashlib

    import tensorflow as tf

    ckdir = run / "checkpoints"
    newest = max(ckdir.glob("ckpt-*.manifest.json"), key=lambda p: int(p.name.split("-")[1].split(".")[0]))
    prefix = str(ckdir / newest.name.replace(".manifest.json", ""))
    reader = tf.train.load_checkpoint(prefix)
    out = {}
    for name, _ in tf.train.list_variables(prefix):
        if "save_counter" in name or "host_state" in name or name.startswith("_CHECKPOINTABLE"):
            continue
        value = reader.get_tensor(name)
        out[name] = hashlib.sha256(value if isinstance(value, bytes) else value.tobytes()).hexdigest()
    return out


def as_uid(uid: int, gid: int, fn: Callable[[], Any], groups: tuple[int, ...] = ()) -> dict[str, Any]:
    """Run `fn` in a forked child with `uid`, `gid` and `groups` (root only): {"ok": result} or
    {"status": N, "error": msg} for an API refusal, or {"exc": "Type: msg"}."""
    from ckptd.daemon.client import ApiRefused

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        try:
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            try:
                out: dict[str, Any] = {"ok": fn()}
            except ApiRefused as e:
                out = {"status": e.status, "error": str(e)}
            except BaseException as e:
                out = {"exc": f"{type(e).__name__}: {e}"}
            os.write(w, json.dumps(out, default=str).encode())
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    return dict(json.loads(b"".join(chunks)))

"""Every process a job starts is the job's (issue 25): a setsid child and a double-forked
grandchild that ignore SIGTERM end with their attempt, through the attempt's cgroup (root, here)
or, where no cgroup can be had, the supervisor as a child subreaper (forced, and as nobody)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from ckptd.supervisor.contain import choose

from .conftest import ROOT, slow
from .daemonproc import fake_job, start_daemon
from .procs import wait_for

V2, V1 = Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup/freezer")


@pytest.mark.parametrize(
    ("override", "v2", "v1", "kind"),
    [
        (None, V2, V1, "cgroup-v2"),
        (None, None, V1, "cgroup-v1"),
        (None, None, None, "subreaper"),
        ("subreaper", V2, V1, "subreaper"),
    ],
)
def test_which_containment_for_which_host(
    override: str | None, v2: Path | None, v1: Path | None, kind: str
) -> None:
    choice = choose(override, v2, v1)
    assert choice.kind == kind and choice.why
    assert choice.base == {"cgroup-v2": v2, "cgroup-v1": v1, "subreaper": None}[kind]


DRIVER = r"""
import json, os, sys, time
from pathlib import Path
from ckptd.state.submissions import Owner
from ckptd.supervisor import contain, process
kind, where, uid, python = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if kind == "subreaper":
    contain._INSTANCE = contain.Containment(contain.choose("subreaper", None, None))
ops = process.RealProcessOps(owner=None if uid == os.geteuid() else Owner(uid, uid))
pid = ops.spawn([python, "-m", "tests.escaper", str(where)], where, where / "out.log", where / "err.log")
while ops.poll(pid) is None:
    time.sleep(0.02)
print(json.dumps({"kind": ops.containment.choice.kind, "escapees": (where / "escapees.txt").read_text()}))
"""


def _dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _python_for(uid: int) -> str:
    """The escaper needs only the standard library: another uid runs the system's Python (the
    test venv's may sit in root's home)."""
    if uid == os.geteuid():
        return sys.executable
    system = shutil.which("python3", path="/usr/bin:/usr/local/bin")
    if system is None:
        pytest.skip("no system python3 for another uid")
    return system


def _drive(tmp_path: Path, kind: str, uid: int, first_exits: bool) -> tuple[str, list[int]]:
    where = tmp_path / f"{kind}-{uid}"
    where.mkdir()
    where.chmod(0o777)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ESCAPER_FIRST_EXITS": "1" if first_exits else "0"}
    r = subprocess.run(
        [sys.executable, "-c", DRIVER, kind, str(where), str(uid), _python_for(uid)],
        capture_output=True,
        text=True,
        timeout=slow(60),
        env=env,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    return out["kind"], [int(p) for p in out["escapees"].split()]


@pytest.mark.parametrize("first_exits", [False, True])
@pytest.mark.parametrize(
    ("kind", "uid"),
    [("auto", os.geteuid()), ("subreaper", os.geteuid()), ("subreaper", 65534)],
)
def test_what_escaped_the_process_group_ends_with_the_attempt(
    tmp_path: Path, kind: str, uid: int, first_exits: bool
) -> None:
    if uid != os.geteuid() and os.geteuid() != 0:
        pytest.skip("needs root to run the worker as nobody")
    tmp_path.chmod(0o755)
    for parent in tmp_path.parents:  # pytest's base directories are 0700: nobody must reach ours
        if parent == Path("/tmp"):
            break
        parent.chmod(parent.stat().st_mode | 0o005)
    found, escapees = _drive(tmp_path, kind, uid, first_exits)
    if kind == "auto" and os.geteuid() == 0:
        assert found.startswith("cgroup-"), found  # root always has a cgroup here
    try:
        wait_for("the escapees to be killed", lambda: all(_dead(p) for p in escapees), slow(10))
    finally:
        for p in escapees:
            with __import__("contextlib").suppress(ProcessLookupError):
                os.kill(p, 9)


def test_cancel_ends_a_jobs_setsid_children(tmp_path: Path) -> None:
    home = tmp_path / "home"
    d = start_daemon(home, FAKE_STEPS="2000", FAKE_STEP_SECONDS="0.02", FAKE_ESCAPE="1")
    try:
        job = d.submit(fake_job(tmp_path))
        run = home / "jobs" / job
        text = wait_for(
            "escapees", lambda: (run / "escapees.txt").exists() and (run / "escapees.txt").read_text(), 30
        )
        escapees = [int(p) for p in str(text).split()]
        assert all(not _dead(p) for p in escapees)
        d.api("POST", f"/v1/jobs/{job}/cancel")
        d.wait_state(job, "cancelled")
        wait_for("the escapees to be killed", lambda: all(_dead(p) for p in escapees), slow(10))
        assert '"containment"' in d.output()
    finally:
        d.stop()

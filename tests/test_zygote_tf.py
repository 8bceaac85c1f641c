"""A job's fork server (ckptd.supervisor.zygote): its attempts fork from one process that imported
TensorFlow once; its end, and a fork server that dies, cost no attempt and no job."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from ckptd.state.protocol import EXIT_CONFIG
from ckptd.supervisor import zygote

from .conftest import ROOT, write_job
from .procs import finish, heartbeat_when, run_dir, start_run, status, wait_for

pytestmark = [pytest.mark.tf, pytest.mark.own_fork_server]
PROGRAMS = ROOT / "tests" / "programs"


def _parent(pid: int) -> psutil.Process:
    parent = psutil.Process(pid).parent()
    assert parent is not None
    return parent


# With PYTHONPROFILEIMPORTTIME=1 every process logs each module it imports: a process that
# imported TensorFlow itself has the package's own line. (TF's import banner, e.g. "oneDNN
# custom operations are on", depends on the CPU and on CUDA libraries being present.)
_TF_IMPORTED = re.compile(r"^import time:.*\|\s*tensorflow$", re.M)


def _imported_tf(log: Path) -> bool:
    return _TF_IMPORTED.search(log.read_text()) is not None


def _forked(out: str) -> list[int]:
    """The attempts the fork server started, from `ckptd run`'s JSON progress."""
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return [e["attempt"] for e in lines if e.get("event") == "worker.forked"]


def test_every_attempt_forks_from_one_import_and_the_server_ends_with_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    home = tmp_path / "home"
    proc = start_run(home, str(write_job(tmp_path, epochs=4)), faults="step_delay=0.02")
    run = run_dir(home)
    first = heartbeat_when(run, lambda h: h.attempt == 1 and (h.committed_step or 0) >= 20)
    zygote = _parent(first.pid)
    assert "--zygote" in zygote.cmdline() and zygote.pid != proc.pid
    os.kill(first.pid, signal.SIGKILL)
    second = heartbeat_when(run, lambda h: h.attempt == 2 and h.pid != first.pid)
    assert _parent(second.pid).pid == zygote.pid  # the same import serves the restart
    rc, out = finish(proc)
    assert rc == 0, out
    attempts = status(home, run.name)["attempt_list"]
    assert [a["class"] for a in attempts] == ["killed", "succeeded"]  # SIGKILL, as the zygote saw it
    assert attempts[1]["restored_step"] >= 20
    assert _forked(out) == [1, 2]
    # The attempts' own logs start after the import: only the server imported TensorFlow.
    assert _imported_tf(run / "attempts" / "zygote.log")
    for n in ("0001", "0002"):
        assert not _imported_tf(run / "attempts" / n / "stderr.log")
    wait_for(
        "the fork server's end", lambda: not zygote.is_running() or zygote.status() == psutil.STATUS_ZOMBIE
    )


def test_a_fork_server_that_dies_costs_no_attempt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kill the server under a running worker, then the worker: the supervisor never gets that
    exit code (`lost`, from the worker's own records), and the next attempt starts cold."""
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    home = tmp_path / "home"
    proc = start_run(home, str(write_job(tmp_path, epochs=4)), faults="step_delay=0.02")
    run = run_dir(home)
    first = heartbeat_when(run, lambda h: h.attempt == 1 and (h.committed_step or 0) >= 20)
    _parent(first.pid).kill()
    os.kill(first.pid, signal.SIGKILL)
    rc, out = finish(proc)
    assert rc == 0, out
    attempts = status(home, run.name)["attempt_list"]
    assert [a["class"] for a in attempts] == ["lost", "succeeded"], attempts
    assert attempts[1]["restored_step"] >= 20
    assert _forked(out) == [1]
    assert _imported_tf(run / "attempts" / "0002" / "stderr.log")  # a cold start


@pytest.mark.parametrize(
    ("module", "switch", "forks"),
    [
        ("ckptd.worker", None, True),
        ("ckptd.worker", "1", True),
        ("ckptd.worker", "0", False),  # an operator's way back to a fresh import per attempt
        ("ckptd.worker", "False", False),  # as a unit file or a shell would spell it
        ("ckptd.worker", " off", False),
        ("ckptd.worker", "no", False),
        ("ckptd.worker", "yes", True),
        ("tests.fakeworker", None, False),  # a protocol-speaking fake has no fork server
    ],
)
def test_who_forks(monkeypatch: pytest.MonkeyPatch, module: str, switch: str | None, forks: bool) -> None:
    if switch is None:
        monkeypatch.delenv("CKPTD_ZYGOTE", raising=False)
    else:
        monkeypatch.setenv("CKPTD_ZYGOTE", switch)
    assert zygote.wanted(module) is forks


@pytest.mark.parametrize("containment", ["auto", "subreaper"])
def test_a_forked_workers_escaped_children_end_with_its_attempt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, containment: str
) -> None:
    """A forked worker is not the supervisor's child; what it starts outside its session is
    still the attempt's (its cgroup, or the subreaper's sweep by token)."""
    monkeypatch.setenv("CKPTD_CONTAINMENT", containment)
    job = tmp_path / "escaping.yaml"
    job.write_text(
        f"name: escaping\nentrypoint: {PROGRAMS / 'escaping.py'}\ncheckpoint: {{every_steps: 4}}\n"
    )
    home = tmp_path / "home"
    rc, out = finish(start_run(home, str(job)))
    assert rc == 0, out
    assert _forked(out) == [1]
    run = run_dir(home)
    escapees = [int(p) for p in (run / "escapees.txt").read_text().split()]
    assert len(escapees) == 2
    try:
        wait_for("the escapees' end", lambda: all(_gone(p) for p in escapees), 30)
    finally:
        for pid in escapees:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_shared_fork_server_serves_each_job_with_its_own_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$CKPTD_FORK_SERVER (the suite's speed-up): two jobs at once fork from one server; each
    worker gets its own supervisor's environment (a fault set for one job only fires in it) and
    exit code; the server outlives its jobs and ends at EOF on its stdin."""
    sock = tmp_path / "fork.sock"
    server = subprocess.Popen(
        [sys.executable, "-m", "ckptd.worker", "--zygote", "--listen", str(sock)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert server.stdin is not None and server.stdout is not None
    try:
        assert b"ready" in server.stdout.readline()
        monkeypatch.setenv(zygote.SHARED_ENV, str(sock))
        fault = "sigkill_at_step=30,attempt=1"
        killed = start_run(tmp_path / "a", str(write_job(tmp_path / "a", epochs=2)), faults=fault)
        plain = start_run(tmp_path / "b", str(write_job(tmp_path / "b", epochs=2)))
        for proc, home, classes in ((killed, "a", ["killed", "succeeded"]), (plain, "b", ["succeeded"])):
            rc, out = finish(proc)
            assert rc == 0, out
            assert len(_forked(out)) == len(classes)
            attempts = status(tmp_path / home, run_dir(tmp_path / home).name)["attempt_list"]
            assert [a["class"] for a in attempts] == classes  # the SIGKILL, as the server saw it
        assert server.poll() is None
        assert not list((tmp_path / "a" / "jobs").glob("*/attempts/zygote.log"))  # no job's own server
        server.stdin.close()
        assert server.wait(timeout=30) == 0
    finally:
        server.kill()
        server.wait()
        server.stdout.close()


@pytest.mark.parametrize(
    ("prefix", "same"),
    [
        ([], True),
        (["nice", "-n", "5"], False),  # its workers would run at another priority
        (["prlimit", "--nofile=64:64"], False),  # ... with other resource limits
        (["unshare", "-m"], False),  # ... in another mount namespace (a test's private tmpfs)
    ],
)
def test_a_shared_fork_server_is_used_only_from_its_own_context(prefix: list[str], same: bool) -> None:
    if prefix and (shutil.which(prefix[0]) is None or (prefix[0] == "unshare" and os.geteuid() != 0)):
        pytest.skip(f"needs {prefix[0]} (and root for unshare)")
    other = subprocess.Popen([*prefix, "sleep", "60"])
    try:
        wait_for("the process's context", lambda: psutil.Process(other.pid).name() == "sleep", 30)
        assert zygote.same_context(other.pid) is same
    finally:
        other.kill()
        other.wait()


def test_a_listen_path_already_taken_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """Bound before TensorFlow's import: the error comes at once."""
    taken = tmp_path / "sock"
    taken.write_text("")
    out = subprocess.run(
        [sys.executable, "-m", "ckptd.worker", "--zygote", "--listen", str(taken)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == EXIT_CONFIG, out
    assert out.stderr.strip().splitlines() == [
        f"python -m ckptd.worker --zygote --listen {taken}: Address already in use; "
        "remove a stale socket there or choose another path"
    ], out.stderr

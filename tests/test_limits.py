"""A worker that could not create a thread (issue 25: gang members aborted on a busy box): the
evidence in its stderr, the class it gets, and the abort itself, reproduced under a low
RLIMIT_NPROC for a thread-hungry process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ckptd.state.states import AttemptClass as C
from ckptd.supervisor.evidence import read_error
from ckptd.supervisor.limits import THREAD_ABORT, thread_abort
from ckptd.supervisor.policy import ExitObservation, classify_exit

ABORT = (
    "2026-12-01 I tensorflow/core/...: collective ops\n"
    "terminate called after throwing an instance of 'std::system_error'\n"
    "  what():  Resource temporarily unavailable\n"
)


@pytest.mark.parametrize(
    ("tail", "found"),
    [
        (ABORT, True),
        ("pthread_create failed: Resource temporarily unavailable\n", True),
        ("OSError: [Errno 11] Resource temporarily unavailable (a non-blocking read)\n", False),
        ("terminate called after throwing an instance of 'std::bad_alloc'\n", False),
        ("", False),
    ],
)
def test_thread_abort_is_recognised_only_with_its_two_halves(tail: str, found: bool) -> None:
    assert (thread_abort(tail) is not None) == found


def test_the_abort_is_read_from_stderr_when_there_is_no_error_file(tmp_path: Path) -> None:
    adir = tmp_path / "attempts" / "0001"
    adir.mkdir(parents=True)
    (adir / "stderr.log").write_text("x" * 20000 + "\n" + ABORT)  # only the tail is read
    err = read_error(tmp_path, adir / "error.json")
    assert err["type"] == THREAD_ABORT and "RLIMIT_NPROC" in err["message"]
    klass, evidence = classify_exit(ExitObservation(None, 6, err["type"], err["message"]))
    assert klass == C.RESOURCE_LIMIT and "SIGABRT" in evidence and "Resource temporarily" in evidence


TF = "import tensorflow as tf; x = tf.random.uniform((200, 200)); print(float(tf.reduce_sum(x @ x)))"
PIDS = Path("/sys/fs/cgroup/pids")


@pytest.mark.tf
@pytest.mark.skipif(
    os.geteuid() != 0 or not (PIDS / "cgroup.procs").exists(), reason="needs root and v1 pids"
)
def test_a_tensorflow_process_out_of_threads_aborts_and_is_classed_resource_limit(tmp_path: Path) -> None:
    """The real abort: TensorFlow in a cgroup allowed 6 tasks (as a unit's TasksMax or a uid's
    RLIMIT_NPROC would, on a busy box) dies of SIGABRT with no error file; its stderr names it."""
    cg = PIDS / f"ckptd-test-limits-{os.getpid()}"
    cg.mkdir()
    adir = tmp_path / "attempts" / "0001"
    adir.mkdir(parents=True)
    try:
        (cg / "pids.max").write_text("6\n")
        with open(adir / "stderr.log", "wb") as err:
            r = subprocess.run(
                ["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$0" -c "$1"', sys.executable, TF],
                stdout=subprocess.DEVNULL,
                stderr=err,
                timeout=120,
            )
    finally:
        cg.rmdir()
    assert r.returncode == -6, (adir / "stderr.log").read_text()[-2000:]
    err = read_error(tmp_path, adir / "error.json")
    klass, evidence = classify_exit(ExitObservation(None, 6, err.get("type"), err.get("message")))
    assert klass == C.RESOURCE_LIMIT, (adir / "stderr.log").read_text()[-2000:]
    assert "pthread_create" in evidence

from __future__ import annotations

import contextlib
import os
import resource
import select
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "pima"
CSV = EXAMPLE / "pima-indians-diabetes.csv"


GOLDEN_EPOCHS = 4


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--cpu-hogs",
        type=int,
        default=int(os.environ.get("CKPTD_TEST_CPU_HOGS", "0")),
        metavar="N",
        help="run the tests with N busy processes competing for the CPUs, as on a "
        "shared training box (CI runs the `timing` tests with 4; default $CKPTD_TEST_CPU_HOGS or 0)",
    )


# How much slower than a quiet box this session is expected to run: the declared hogs, the other
# pytest-xdist workers and the load already there when it starts, per CPU (at most 4x). Test
# deadlines and pytest-timeout scale by it, so a loaded CI stretches the tests' patience, never
# the product's timing rules.
SLOWDOWN = 1.0

# The kill-point sweep (tests/test_killsweep.py) runs part SWEEP_SEED % SWEEP_CHUNKS of its matrix;
# by default the day number, so consecutive days' CI runs walk the whole matrix.
SWEEP_CHUNKS = 8
SWEEP_SEED = int(os.environ.get("CKPTD_SWEEP_SEED", str(int(time.time() // 86400))))


def slow(seconds: float) -> float:
    """A test deadline, stretched for a loaded box (see SLOWDOWN)."""
    return seconds * SLOWDOWN


def pytest_configure(config: pytest.Config) -> None:
    global SLOWDOWN
    cpus = os.cpu_count() or 1
    hogs = config.getoption("--cpu-hogs")
    peers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) - 1
    SLOWDOWN = min(4.0, max(1.0, (hogs + peers + os.getloadavg()[0]) / cpus))
    base = getattr(config.option, "timeout", None) or config.getini("timeout")
    if SLOWDOWN > 1.0 and base:  # pytest-timeout reads the option before the ini value
        config.option.timeout = float(base) * SLOWDOWN


def pytest_report_header(config: pytest.Config) -> str:
    return (
        f"ckptd: cpu hogs {config.getoption('--cpu-hogs')}, test deadlines x{SLOWDOWN:.2f}, "
        f"timeout {config.option.timeout or config.getini('timeout')} s; kill sweep seed "
        f"{SWEEP_SEED} (part {SWEEP_SEED % SWEEP_CHUNKS} of {SWEEP_CHUNKS}; CKPTD_SWEEP_SEED re-runs it)"
    )


def _cpu_seconds() -> float:
    """This process's CPU time and that of its reaped descendants (the workers, writers and
    daemons a test started and waited for), the shared fork server's workers included."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    total = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    if _FORK_SERVER:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(_FORK_SERVER[0]).cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    """With $CKPTD_TEST_CPU_LOG set, append "CPU-seconds wall-seconds node-id" per test (setup,
    call and teardown) to that file: on a shared box wall times mislead, CPU seconds do not."""
    log = os.environ.get("CKPTD_TEST_CPU_LOG")
    cpu, wall = _cpu_seconds(), time.monotonic()
    yield
    if log:
        line = f"{_cpu_seconds() - cpu:.2f} {time.monotonic() - wall:.2f} {item.nodeid}\n"
        with open(log, "a") as f:  # one short append per line: xdist workers may share the file
            f.write(line)


# The pid of this test process's shared fork server, once started (for _cpu_seconds).
_FORK_SERVER: list[int] = []


@pytest.fixture(scope="session")
def fork_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One fork server per test process (`ckptd.worker --zygote --listen`, $CKPTD_FORK_SERVER):
    the attempts of every `tf` test fork from it, as a job's attempts fork from its own zygote,
    instead of each test's job paying ~3.7 CPU-seconds of import in a zygote of its own. A test
    marked `own_fork_server` (the zygote's own tests) keeps the job's own."""
    sock = tmp_path_factory.mktemp("forkserver") / "fork.sock"
    with open(sock.parent / "server.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ckptd.worker", "--zygote", "--listen", str(sock)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,  # a test's kill of its own process group never reaches it
        )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        ready = select.select([proc.stdout], [], [], slow(120))[0]
        assert ready and b"ready" in proc.stdout.readline(), f"no fork server: see {log.name}"
        _FORK_SERVER.append(proc.pid)
        yield sock
    finally:
        _FORK_SERVER.clear()
        proc.stdin.close()  # its EOF: it exits; the workers it forked are gone with their tests
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


@pytest.fixture(autouse=True)
def _shared_fork_server(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("tf") and not request.node.get_closest_marker("own_fork_server"):
        from ckptd.supervisor.zygote import SHARED_ENV

        monkeypatch.setenv(SHARED_ENV, str(request.getfixturevalue("fork_server")))


@pytest.fixture(scope="session", autouse=True)
def cpu_hogs(request: pytest.FixtureRequest) -> Iterator[int]:
    """Busy loops for the whole session (nice 0, like the other work on a shared box)."""
    n = request.config.getoption("--cpu-hogs")
    hogs = [
        subprocess.Popen(
            [sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL, start_new_session=True
        )
        for _ in range(n)
    ]
    try:
        yield n
    finally:
        for h in hogs:
            h.kill()
            h.wait()


@pytest.fixture(scope="session")
def golden(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An uninterrupted run of the test job (write_job, GOLDEN_EPOCHS): the oracle for exact
    resume, shared by every module that interrupts that job."""
    from .procs import final_state_hash, finish, run_dir, start_run

    tmp = tmp_path_factory.mktemp("golden")
    home = tmp / "home"
    rc, out = finish(start_run(home, str(write_job(tmp, epochs=GOLDEN_EPOCHS))))
    assert rc == 0, out
    return final_state_hash(run_dir(home))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "home"
    monkeypatch.setenv("CKPTD_HOME", str(h))
    return h


def write_job(
    directory: Path,
    name: str = "pima-test",
    epochs: int = 3,
    every_steps: int = 20,
    extra: str = "",
    model: str | None = None,
    mode: str = "sync",
) -> Path:
    """A small Pima job: few epochs, frequent checkpoints."""
    directory.mkdir(parents=True, exist_ok=True)
    job = directory / f"{name}.yaml"
    job.write_text(
        f"name: {name}\n"
        f"model: {model or str(EXAMPLE / 'model.py') + ':build'}\n"
        f"params: {{csv: {CSV}}}\n"
        f"train: {{epochs: {epochs}, batch_size: 10, validation_split: 0.33, seed: 7}}\n"
        f"checkpoint: {{every_steps: {every_steps}, every_seconds: 600, max_to_keep: 3, "
        f"mode: {mode}}}\n"
        "best: {monitor: val_accuracy, mode: max, filepath: weights.best.hdf5}\n"
        "restart: {max_restarts: 3, backoff_initial_seconds: 0.1, backoff_max_seconds: 0.5}\n" + extra
    )
    return job


def ckptd_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ckptd.daemon", *args]


def env_with(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["CKPTD_HOME"] = str(home)
    return env


@pytest.fixture
def tier_root() -> Iterator[Path]:
    """A memory-tier root of the test's own under /dev/shm (a tier must be on a tmpfs), removed
    afterwards whatever the test left in it."""
    root = Path("/dev/shm") / f"ckptd-test-{uuid.uuid4().hex[:12]}"
    yield root
    shutil.rmtree(root, ignore_errors=True)

"""Daemon parts: queue decisions (table-driven), spool intake, sd_notify, the socket path, the unit."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from ckptd.daemon import jobs
from ckptd.daemon.notify import Notifier
from ckptd.daemon.schedule import Queued, may_act, pick_jobs, slot_count, warm_wanted
from ckptd.daemon.sockets import SocketError, prepare_path
from ckptd.daemon.spool import Spool
from ckptd.state.paths import RunDir
from ckptd.state.states import JobState
from ckptd.state.store import Store
from ckptd.supervisor.process import worker_env

from .conftest import write_job
from .daemonproc import start_daemon
from .procs import wait_for

ROOT = Path(__file__).resolve().parent.parent

# -- pure decisions ------------------------------------------------------------------------------

PICK = [
    # queue (id, gpus), running, slots, free gpus -> started
    ([("a", 0), ("b", 0)], 0, 1, [], [("a", [])]),
    ([("a", 0), ("b", 0)], 0, 2, [], [("a", []), ("b", [])]),
    ([("a", 0)], 1, 1, [], []),
    ([("a", 1), ("b", 1)], 0, 2, [0, 1], [("a", [0]), ("b", [1])]),
    ([("a", 2), ("b", 1)], 0, 2, [1], []),  # the head waits for 2 GPUs; b does not jump it
    ([("a", 2)], 0, 2, [0, 3], [("a", [0, 3])]),
    ([], 0, 4, [0], []),
]


@pytest.mark.parametrize(("queue", "running", "slots", "free", "started"), PICK)
def test_pick_jobs(
    queue: list[tuple[str, int]],
    running: int,
    slots: int,
    free: list[int],
    started: list[tuple[str, list[int]]],
) -> None:
    assert pick_jobs([Queued(j, g) for j, g in queue], running, slots, free) == started


@pytest.mark.parametrize(
    ("configured", "gpus", "slots"), [(None, [], 1), (None, [0, 1, 2], 3), (4, [], 4), (1, [0, 1], 1)]
)
def test_slot_count(configured: int | None, gpus: list[int], slots: int) -> None:
    assert slot_count(configured, gpus) == slots


@pytest.mark.parametrize(
    ("enabled", "slots", "running", "warm"),
    [(True, 1, 0, 1), (True, 1, 1, 0), (True, 4, 1, 3), (True, 2, 3, 0), (False, 4, 0, 0)],
)
def test_warm_wanted(enabled: bool, slots: int, running: int, warm: int) -> None:
    assert warm_wanted(enabled, slots, running) == warm


@pytest.mark.parametrize(
    ("peer", "owner", "admin", "ok"),
    [(1000, 1000, False, True), (1001, 1000, False, False), (1001, 1000, True, True), (0, 1000, False, True)],
)
def test_may_act(peer: int, owner: int, admin: bool, ok: bool) -> None:
    assert may_act(peer, owner, admin) is ok


# -- spool -----------------------------------------------------------------------------------------


class _Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def info(self, event: str, **kw: Any) -> None:
        self.lines.append((event, kw))

    warning = info


def _drop(spool: Path, name: str, text: str) -> Path:
    """Write beside, then rename into place: how a complete file arrives."""
    tmp = spool / f".{name}.tmp"
    tmp.write_text(text)
    os.rename(tmp, spool / name)
    return spool / name


def test_spool_takes_complete_files_once_and_rejects_bad_ones(tmp_path: Path) -> None:
    home = tmp_path / "home"
    store = Store.open(home)
    spool = Spool(home, settle=0.0, log=_Log())
    good = write_job(tmp_path / "src", name="spooled").read_text()
    _drop(spool.dir, "good.yaml", good)
    _drop(spool.dir, "bad.yaml", "name: x\nmodel: 3\nbogus: 1\n")
    (spool.dir / ".partial.yaml.tmp").write_text("name: half")
    (spool.dir / "notes.txt").write_text("not a job")
    taken = {i.name: i for i in spool.scan(store, home)}
    assert set(taken) == {"good.yaml", "bad.yaml"}
    assert taken["good.yaml"].outcome == "accepted" and taken["bad.yaml"].outcome == "rejected"
    assert (spool.dir / "accepted" / "good.yaml").exists()
    error = (spool.dir / "rejected" / "bad.yaml.error.txt").read_text()
    assert "bogus" in error and "model" in error
    assert [j.name for j in store.jobs()] == ["spooled"]
    assert spool.scan(store, home) == []  # nothing left to take
    assert (spool.dir / ".partial.yaml.tmp").exists()


def test_spool_crash_between_submit_and_move_does_not_duplicate(tmp_path: Path) -> None:
    home = tmp_path / "home"
    store = Store.open(home)
    spool = Spool(home, settle=0.0, log=_Log())
    path = _drop(spool.dir, "job.yaml", write_job(tmp_path / "src", name="once").read_text())
    first = spool.take(store, home, path)
    # As if the daemon died before the rename, on a file system whose inodes and mtimes do not
    # survive a remount (FUSE, NFS): the same bytes are back, as a new file.
    text = (spool.dir / "accepted" / "job.yaml").read_bytes()
    (spool.dir / "accepted" / "job.yaml").unlink()
    _drop(spool.dir, "job.yaml", text.decode())
    again = spool.scan(store, home)
    assert [i.outcome for i in again] == ["duplicate"] and again[0].job_id == first.job_id
    assert len(store.jobs()) == 1
    # Once that job has ended, the same file dropped again is a new submission.
    assert first.job_id is not None
    store.transition(first.job_id, JobState.CANCELLED, "test")
    _drop(spool.dir, "job.yaml", text.decode())
    later = spool.scan(store, home)
    assert [i.outcome for i in later] == ["accepted"] and later[0].job_id != first.job_id


def test_spool_waits_for_a_file_to_settle(tmp_path: Path) -> None:
    home = tmp_path / "home"
    spool = Spool(home, settle=3600.0, log=_Log())
    _drop(spool.dir, "fresh.yaml", "name: x\n")
    assert spool.scan(Store.open(home), home) == []


def test_spool_in_the_running_daemon(tmp_path: Path) -> None:
    d = start_daemon(tmp_path / "home", config="spool_settle_seconds: 0.2\n", FAKE_STEPS="5")
    try:
        _drop(d.home / "spool", "dropped.yaml", write_job(tmp_path / "src", name="dropped").read_text())
        jobs = wait_for("the spooled job", lambda: d.api("GET", "/v1/jobs"), 30)
        assert jobs[0]["name"] == "dropped" and jobs[0]["owner_uid"] == os.getuid()
        d.wait_state(jobs[0]["id"], "succeeded")
    finally:
        d.stop()


# -- sd_notify -------------------------------------------------------------------------------------


# -- outputs on read-only mounts (the unit's ProtectSystem / ProtectHome) --------------------------

MOUNTINFO_SAMPLE = """\
22 1 8:1 / / ro,relatime shared:1 - ext4 /dev/sda1 rw
23 22 8:1 /var/lib/ckptd /var/lib/ckptd rw,relatime shared:2 - ext4 /dev/sda1 rw
24 22 8:2 / /home ro,nosuid shared:3 - ext4 /dev/sda2 rw
25 24 8:2 /alice/ckpt /home/alice/ckpt rw,nosuid shared:4 - ext4 /dev/sda2 rw
26 22 0:5 / /mnt/my\\040disk rw shared:5 - ext4 /dev/sdb1 rw
27 22 0:6 / /data rw shared:6 - nfs srv:/x ro
"""

RO_CASES = [
    # checkpoint.dir -> problem mentions (None: no problem)
    ("/var/lib/ckptd/jobs/x/ck", None),
    ("/var/lib/ckptdx/ck", "ProtectSystem=strict"),  # a prefix of a name is not its mount
    ("/home/alice/ckpt/run1", None),  # ReadWritePaths= made it writable
    ("/home/alice/other", "ProtectHome=read-only"),
    ("/home/alice/ckpt/../other", "ProtectHome=read-only"),  # lexically normalised
    ("/mnt/my disk/ck", None),  # mountinfo's octal escapes
    ("/data/ck", "(/data)"),  # read-only at the superblock
    ("ck", None),  # relative: under the run directory
]


@pytest.mark.parametrize(("ckdir", "expect"), RO_CASES)
def test_outputs_on_read_only_mounts(tmp_path: Path, ckdir: str, expect: str | None) -> None:
    from ckptd.daemon.mounts import parse_mountinfo, read_only_outputs
    from ckptd.state.jobspec import parse_job

    job = write_job(tmp_path)
    job.write_text(job.read_text().replace("every_steps: 20,", f"dir: '{ckdir}', every_steps: 20,"))
    spec = parse_job(job.read_bytes(), str(job), job.parent, check=False)  # as the daemon does
    problems = read_only_outputs(spec, "job.yaml", parse_mountinfo(MOUNTINFO_SAMPLE), True)
    if expect is None:
        assert problems == []
    else:
        (problem,) = problems
        assert problem.startswith("job.yaml: checkpoint.dir: ") and expect in problem, problem


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root for a read-only bind mount in a private mount namespace",
)
def test_a_daemon_refuses_outputs_its_sandbox_makes_read_only(tmp_path: Path) -> None:
    """The daemon sees a read-only mount its submitter does not (the unit's sandbox, here a
    private mount namespace): the submit is a 400 naming the field and the setting."""
    ro = tmp_path / "ro"
    ro.mkdir()
    wrap = [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        f'mount --bind -o ro "{ro}" "{ro}" && exec "$@"',
        "sh",
    ]
    d = start_daemon(tmp_path / "home", wrap=wrap, INVOCATION_ID="test")
    try:
        job = write_job(tmp_path)
        text = job.read_text().replace("every_steps: 20,", f"dir: '{ro}/ck', every_steps: 20,")
        from ckptd.daemon.client import ApiRefused

        with pytest.raises(ApiRefused) as e:
            d.api("POST", "/v1/jobs", {"raw": text, "job_file": str(job)})
        (problem,) = e.value.payload["problems"]
        assert e.value.status == 400 and "checkpoint.dir" in problem, problem
        assert "read-only mount" in problem and f"ReadWritePaths={ro}/ck" in problem, problem
        assert d.api("GET", "/v1/jobs") == []
    finally:
        d.stop()


def test_sd_notify_ready_watchdog_status_stopping(tmp_path: Path) -> None:
    addr = tmp_path / "notify.sock"
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(str(addr))
    sink.settimeout(30)
    d = start_daemon(tmp_path / "home", NOTIFY_SOCKET=str(addr), WATCHDOG_USEC="400000")
    got: list[str] = []

    def until(field: str) -> None:
        while not any(m.startswith(field) for m in got):
            got.extend(sink.recv(4096).decode().splitlines())

    try:
        until("READY=1")
        until("STATUS=")
        assert "STATUS=0 running, 0 queued" in got
        got.clear()
        until("WATCHDOG=1")
        got.clear()
        until("WATCHDOG=1")  # keeps pinging from the main loop
    finally:
        d.stop()
    until("STOPPING=1")
    sink.close()


def test_the_loop_stops_pinging_when_blocked(tmp_path: Path) -> None:
    """Control for the test above: a stopped daemon (SIGSTOP) sends no WATCHDOG=1."""
    addr = tmp_path / "notify.sock"
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(str(addr))
    d = start_daemon(tmp_path / "home", NOTIFY_SOCKET=str(addr), WATCHDOG_USEC="200000")
    try:
        sink.settimeout(10)
        while b"WATCHDOG=1" not in sink.recv(4096):
            pass
        os.kill(d.proc.pid, signal.SIGSTOP)
        sink.settimeout(0.05)
        while True:  # drain what was sent before the stop
            try:
                sink.recv(4096)
            except TimeoutError:
                break
        sink.settimeout(1.0)
        with pytest.raises(TimeoutError):
            sink.recv(4096)
        os.kill(d.proc.pid, signal.SIGCONT)
    finally:
        d.stop()
        sink.close()


def test_notifier_understands_abstract_sockets_and_watchdog_pid() -> None:
    n = Notifier(
        {"NOTIFY_SOCKET": "@ckptd-test", "WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}
    )
    assert n.address == "\0ckptd-test" and n.watchdog_interval == 5.0
    assert Notifier({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert not Notifier({}).enabled


def test_workers_do_not_inherit_the_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "1")
    env = worker_env()
    assert "NOTIFY_SOCKET" not in env and "WATCHDOG_USEC" not in env


# -- socket path -----------------------------------------------------------------------------------


def test_socket_path_refuses_symlinks_files_and_live_sockets(tmp_path: Path) -> None:
    link = tmp_path / "link.sock"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SocketError, match="symlink"):
        prepare_path(link)
    plain = tmp_path / "plain.sock"
    plain.write_text("x")
    with pytest.raises(SocketError, match="not a socket"):
        prepare_path(plain)
    live = tmp_path / "live.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(live))
    server.listen()
    with pytest.raises(SocketError, match="live socket"):
        prepare_path(live)
    server.close()  # now stale: replaced
    prepare_path(live)
    assert not live.exists()
    with pytest.raises(SocketError, match="107 bytes"):
        prepare_path(tmp_path / ("x" * 120))


# -- the systemd unit ------------------------------------------------------------------------------

needs_systemd = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def _unit_copy(tmp_path: Path, which: str = "ckptd.service") -> Path:
    """The unit with ExecStart pointing at this environment's ckptd, so verify can check it."""
    exe = Path(sys.executable).parent / "ckptd"
    text = (ROOT / "systemd" / which).read_text()
    unit = tmp_path / "ckptd.service"
    unit.write_text(text.replace("/opt/ckptd/venv/bin/ckptd", str(exe)))
    return unit


@needs_systemd
def test_unit_verifies(tmp_path: Path) -> None:
    r = subprocess.run(
        ["systemd-analyze", "verify", str(_unit_copy(tmp_path))], capture_output=True, text=True, timeout=60
    )
    problems = [ln for ln in (r.stdout + r.stderr).splitlines() if "ckptd.service" in ln]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


@needs_systemd
def test_user_unit_verifies_and_asks_for_no_privilege(tmp_path: Path) -> None:
    """systemd/user/ckptd.service: a single-user box without root; every job is that user's."""
    r = subprocess.run(
        ["systemd-analyze", "verify", str(_unit_copy(tmp_path, "user/ckptd.service"))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    problems = [ln for ln in (r.stdout + r.stderr).splitlines() if "ckptd.service" in ln]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr
    text = (ROOT / "systemd" / "user" / "ckptd.service").read_text()
    settings = dict(ln.split("=", 1) for ln in text.splitlines() if "=" in ln and ln[0] != "#")
    assert "User" not in settings and "AmbientCapabilities" not in settings
    assert settings["RuntimeDirectory"] == "ckptd" and settings["Type"] == "notify"
    assert settings["WantedBy"] == "default.target"


@needs_systemd
def test_unit_security_exposure_is_low(tmp_path: Path) -> None:
    r = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(_unit_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for ckptd\.service: ([\d.]+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    # 3.3 measured: root with four capabilities (SETUID, SETGID, KILL, CHOWN) costs ~0.9 of it,
    # the price of starting each job as its submitter (README "Trust").
    assert float(m.group(1)) <= 3.3, r.stdout


def test_unit_has_the_required_settings() -> None:
    text = (ROOT / "systemd" / "ckptd.service").read_text()
    settings = dict(ln.split("=", 1) for ln in text.splitlines() if "=" in ln and ln[0] != "#")
    assert settings["Type"] == "notify" and settings["KillMode"] == "mixed"
    assert settings["OOMPolicy"] == "continue" and settings["Restart"] == "always"
    assert settings["User"] == "root" and settings["Group"] == "ckptd"
    assert settings["StateDirectory"] == "ckptd"
    caps = set(settings["CapabilityBoundingSet"].split())
    assert caps == {"CAP_SETUID", "CAP_SETGID", "CAP_KILL", "CAP_CHOWN"}  # no DAC_* override
    assert settings["RuntimeDirectory"] == "ckptd" and "PrivateDevices" not in settings
    assert int(settings["TimeoutStopSec"]) > 60  # longer than the 60 s a worker gets to save
    for hard in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp"):
        assert hard in settings
    # The memory controller is delegated and ckptd told so (ckptd.supervisor.cgroups), and the
    # cgroup tree is left writable for it.
    assert settings["Delegate"] == "memory" and "Environment=CKPTD_CGROUP_DELEGATED=1" in text
    assert settings["ProtectControlGroups"] == "no"


def test_bad_daemon_config_is_refused_with_the_field(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "daemon.yaml").write_text("max_concurrent_jobs: 0\nsocket_grup: x\n")
    r = subprocess.run(
        [sys.executable, "-m", "ckptd.daemon", "--home", str(home), "daemon"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "max_concurrent_jobs" in r.stderr and "socket_grup" in r.stderr
    assert not (home / "ckptd.sock").exists()


def test_works_for_recognises_a_warm_worker_by_its_directory(tmp_path: Path) -> None:
    """A warm worker's command line names no run (`python -m ckptd.worker --warm`): after its
    hand-over it lives in the run directory, which is how a restarted daemon knows it."""
    run, other = RunDir(tmp_path / "run"), RunDir(tmp_path / "other")
    run.root.mkdir()
    other.root.mkdir()
    code = "import sys, time; time.sleep(60)"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, "ckptd.worker", *args], cwd=cwd)
        for args, cwd in ((["--warm"], run.root), ([str(run.root), "3"], tmp_path), (["--warm"], tmp_path))
    ]
    try:
        for p in procs:  # exec'd (the fork still shows pytest's command line for a moment)
            wait_for("the exec", lambda p=p: "ckptd.worker" in psutil.Process(p.pid).cmdline(), 10)
        found = [jobs.works_for(psutil.Process(p.pid), run) for p in procs]
        assert found == [True, True, False]
        assert not jobs.works_for(psutil.Process(procs[0].pid), other)
    finally:
        for p in procs:
            p.kill()
            p.wait()

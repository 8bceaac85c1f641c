"""What the CLI says while the daemon is down: the system service's socket and `systemctl` for
whoever uses the service, `ckptd daemon` only for a user with a home of their own; and
`ckptd status --json` prints JSON on stdout even then.

The CLI runs as a real process, as nobody when the tests run as root (the service's store is
root's, unreadable to a submitter), with the service's state directory and socket moved to a
temporary directory ($CKPTD_SERVICE_HOME, $CKPTD_SERVICE_SOCKET).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckptd.state.store import Store

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534
SWITCH = os.geteuid() == 0  # as root, run the CLI as nobody: a submitter, not the store's owner
PYTHONPATH = os.pathsep.join([str(ROOT), sysconfig.get_paths()["purelib"]])


def interpreter() -> str | None:
    """An interpreter an unprivileged user may run, with ckptd and the venv's packages on
    PYTHONPATH: the venv's own may sit under root's 0700 home, then the system's of the same
    version."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"):
        try:
            if _as_submitter([candidate, "-c", "import ckptd.daemon.cli"], {}).returncode == 0:
                return candidate
        except OSError:
            continue
    return None


@pytest.fixture(scope="module")
def python() -> str:
    return interpreter() or pytest.skip("no interpreter here that nobody may run with ckptd importable")


@pytest.fixture
def box() -> Iterator[Path]:
    """A stopped service's box: its state directory with a store of root's (0640), its runtime
    directory without a socket (systemd removes it on stop). Outside pytest's 0700 tmp tree, so
    that nobody reaches it."""
    base = Path(tempfile.mkdtemp(prefix="ckptd-down-"))
    base.chmod(0o711)
    service = base / "service"
    service.mkdir(mode=0o711)
    store = Store.open(service)
    store.create_job("svc-job", "svc", "{}", "d", "job.yaml", str(service / "jobs" / "svc-job"))
    store.close()
    (service / "ckptd.db").chmod(0o640 if SWITCH else 0)  # not the submitter's to read
    (base / "run").mkdir(mode=0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base)


def _ckptd(python: str, box: Path, *args: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`ckptd ARGS` as a submitter (nobody under root) whose $HOME is `home`, no $CKPTD_HOME."""
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home or "/nonexistent"),
        "CKPTD_SERVICE_HOME": str(box / "service"),
        "CKPTD_SERVICE_SOCKET": str(box / "run" / "ckptd.sock"),
    }
    return _as_submitter([python, "-m", "ckptd.daemon", *args], env)


def _as_submitter(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd,
        cwd="/",
        env={"PYTHONPATH": PYTHONPATH, **env},
        capture_output=True,
        text=True,
        timeout=120,
        user=NOBODY if SWITCH else None,
        group=NOBODY if SWITCH else None,
        extra_groups=[] if SWITCH else None,
    )


def _one_line(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 1, r
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("ckptd: "), r.stderr
    return r.stderr


def _stale_socket(path: Path) -> None:
    """What a killed service leaves: a socket file nobody listens on, which the submitter may
    use (as its group, ckptd-users, may)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
    path.chmod(0o666)


@pytest.mark.parametrize("left", ["no socket", "stale socket"])
@pytest.mark.parametrize(
    "args", [("logs", "svc-job"), ("cancel", "svc-job"), ("export", "svc-job", "--latest", "-o", "/tmp/x.h5")]
)
def test_a_service_user_is_told_the_service_is_down(
    python: str, box: Path, left: str, args: tuple[str, ...]
) -> None:
    sock = box / "run" / "ckptd.sock"
    if left == "stale socket":
        _stale_socket(sock)
    said = _one_line(_ckptd(python, box, *args))
    assert f"the ckptd service is not answering at {sock}: is it running?" in said, said
    assert "`systemctl status ckptd`" in said
    assert "ckptd daemon" not in said and ".local/state" not in said


def test_status_names_the_service_and_its_json_says_it_is_down(python: str, box: Path) -> None:
    sock = box / "run" / "ckptd.sock"
    said = _one_line(_ckptd(python, box, "status"))
    assert f"the service is not running (no answer on {sock})" in said and "permission denied" in said
    r = _ckptd(python, box, "status", "--json")
    said = _one_line(r)
    got = json.loads(r.stdout)
    assert got["service"] == "down" and got["socket"] == str(sock), got
    assert got["error"] == said.removeprefix("ckptd: ").strip() and got["exit_code"] == 1
    r = _ckptd(python, box, "status", "svc-job", "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["service"] == "down", r


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a socket nobody may not connect to")
def test_status_json_when_the_socket_refuses_us(python: str, box: Path) -> None:
    sock = box / "run" / "ckptd.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock))
        s.listen()
        sock.chmod(0o600)  # a live service whose socket group nobody is not in
        r = _ckptd(python, box, "status", "--json")
    said = _one_line(r)
    assert "permission denied" in said
    assert json.loads(r.stdout) == {
        "error": said.removeprefix("ckptd: ").strip(),
        "exit_code": 1,
        "service": "denied",
        "socket": str(sock),
    }


def test_a_user_with_a_home_of_their_own_is_told_to_start_their_daemon(python: str, box: Path) -> None:
    """The service is installed but down, and this user works with a per-user store of their
    own (`ckptd run` made it): their daemon is the one to start."""
    user = box / "user"
    own = user / ".local" / "state" / "ckptd"
    own.mkdir(parents=True)
    for d in (user, user / ".local", user / ".local" / "state", own):
        d.chmod(0o755)
    (own / "ckptd.db").touch()
    said = _one_line(_ckptd(python, box, "logs", "some-job", home=user))
    assert f"nothing answers on {own / 'ckptd.sock'}" in said and "`ckptd daemon`" in said, said
    assert "systemctl" not in said and str(box / "run") not in said

"""`ckptd export JOB --best` by an admin on another user's job (root only: two users are made).

A member of the admin group sees every job through the daemon, but a job's files stay its
owner's (run directory 2750, owner:the daemon's group). The CLI listed the best files with the
admin's rights, found nothing it could list, and said there was no best file. It must say why
the files cannot be read, which were saved, and how to get them; root exports them.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckptd.daemon.client import Client
from ckptd.state.submissions import Owner, account_owner

from .conftest import write_job
from .daemonproc import DaemonProc, start_daemon
from .procs import as_uid
from .test_service_down import PYTHONPATH, interpreter

OWNER, ADMIN = "ckptdexpowner", "ckptdexpadmin"
SUBMITTERS, ADMINS = "ckptdexpsub", "ckptdexpadm"  # the socket's group, the admin group

pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("useradd"), reason="needs root and useradd for two users"
    ),
    pytest.mark.tf,
]


def _quiet(*cmd: str) -> int:
    return subprocess.run(cmd, capture_output=True).returncode


@pytest.fixture(scope="module")
def accounts() -> Iterator[tuple[Owner, Owner]]:
    """A submitter and an admin (who may also submit); stale ones of an aborted run go first."""
    for name in (OWNER, ADMIN):
        _quiet("userdel", name)
    for group in (SUBMITTERS, ADMINS):
        _quiet("groupdel", group)
        _quiet("groupadd", "--system", group)
    try:
        for name, groups in ((OWNER, SUBMITTERS), (ADMIN, f"{SUBMITTERS},{ADMINS}")):
            shell = ("--shell", "/usr/sbin/nologin", "--home-dir", "/nonexistent", "--no-create-home")
            if _quiet("useradd", "--system", "--user-group", *shell, "--groups", groups, name):
                pytest.skip(f"cannot create user {name}")
        yield account_owner(pwd.getpwnam(OWNER).pw_uid), account_owner(pwd.getpwnam(ADMIN).pw_uid)
    finally:
        for name in (OWNER, ADMIN):
            _quiet("userdel", name)
        for group in (SUBMITTERS, ADMINS):
            _quiet("groupdel", group)


@pytest.fixture(scope="module")
def python() -> str:
    return interpreter() or pytest.skip("no interpreter here that the test users may run")


@pytest.fixture(scope="module")
def finished(python: str, accounts: tuple[Owner, Owner]) -> Iterator[tuple[DaemonProc, str, Path]]:
    """The owner's Pima job, trained for real under a root daemon until it succeeded; its run
    directory holds the best file the worker wrote."""
    owner = accounts[0]
    base = Path(tempfile.mkdtemp(prefix="ckptd-export-admin-"))  # outside pytest's 0700 tree
    base.chmod(0o711)
    job = write_job(base / "owner", name="admin-export", epochs=2)
    for path in (job.parent, job):
        os.chown(path, owner.uid, owner.gid)
    config = f"socket_group: {SUBMITTERS}\nadmin_group: {ADMINS}\nspool: false\n"
    d = start_daemon(base / "home", fake=False, config=config, python=python, PYTHONPATH=PYTHONPATH)
    try:
        body = {"raw": job.read_text(), "job_file": str(job)}
        got = as_uid(
            owner.uid, owner.gid, lambda: Client(d.sock, 30).call("POST", "/v1/jobs", body), owner.groups
        )
        job_id = got["ok"]["job"]["id"]
        assert d.wait_state(job_id, "succeeded", "failed", timeout=600)["state"] == "succeeded", d.output()
        yield d, job_id, base
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)


def _export(
    python: str, d: DaemonProc, who: Owner | None, job_id: str, which: str, out: Path
) -> subprocess.CompletedProcess[str]:
    """`ckptd export` as `who` (None: root), into a directory of theirs."""
    out.parent.mkdir(mode=0o755)
    if who is not None:
        os.chown(out.parent, who.uid, who.gid)
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": PYTHONPATH,
        "HOME": "/nonexistent",
        "CKPTD_SOCKET": str(d.sock),
    }
    return subprocess.run(
        [python, "-m", "ckptd.daemon", "export", job_id, f"--{which}", "-o", str(out)],
        cwd="/",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        user=who.uid if who else None,
        group=who.gid if who else None,
        extra_groups=list(who.groups) if who else None,
    )


def test_an_admin_is_told_why_the_best_file_is_not_theirs_to_read(
    python: str, finished: tuple[DaemonProc, str, Path], accounts: tuple[Owner, Owner]
) -> None:
    d, job_id, base = finished
    owner, admin = accounts
    run = Path(d.job(job_id)["run_dir"])
    best = run / "weights.best.hdf5"
    assert best.stat().st_uid == owner.uid  # the worker's, as its owner
    r = _export(python, d, admin, job_id, "best", base / "admin-best" / "b.hdf5")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "no best file" not in r.stderr, r.stderr
    assert f"{run} is not readable by you (uid {admin.uid})" in r.stderr, r.stderr
    assert f"its owner (uid {owner.uid})" in r.stderr and f"the newest {best}" in r.stderr, r.stderr
    assert f"sudo ckptd export {job_id} --best -o" in r.stderr, r.stderr
    r = _export(python, d, admin, job_id, "latest", base / "admin-latest" / "l.weights.h5")
    assert r.returncode == 1 and f"{run} is not readable by you" in r.stderr, r.stderr


def test_root_exports_another_users_best_file(python: str, finished: tuple[DaemonProc, str, Path]) -> None:
    d, job_id, base = finished
    out = base / "root-best" / "b.hdf5"
    r = _export(python, d, None, job_id, "best", out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == (Path(d.job(job_id)["run_dir"]) / "weights.best.hdf5").read_bytes()

"""The trust boundary, tried as two unprivileged users created for the test (root only).

User A submits; user B is another login on the box. The daemon runs as root, as the system unit
does. Every job must run with its submitter's rights: what A cannot read, write, list or run, the
daemon does not do for A; what A's job makes is A's; B sees none of it through the daemon.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from ckptd.daemon.client import Client
from ckptd.state.submissions import Owner, account_owner

from .conftest import CSV, EXAMPLE
from .daemonproc import DaemonProc, start_daemon
from .procs import as_uid, events, final_state_hash, heartbeat_when, wait_for
from .test_memtier_run_tf import DURABLE_EVERY, tier_job

ROOT = Path(__file__).resolve().parent.parent
USERS = ("ckptdtesta", "ckptdtestb")
GROUP = "ckptdtestsub"  # may use the socket: both users are members

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("useradd"),
    reason="needs root and useradd to create the two test users",
)


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.fixture(scope="module")
def users() -> Iterator[tuple[Owner, Owner]]:
    made_group = _run("groupadd", "--system", GROUP).returncode == 0
    made = []
    for name in USERS:
        with_group = ("--groups", GROUP)
        if name in {p.pw_name for p in pwd.getpwall()}:
            continue
        r = _run(
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            *with_group,
            name,
        )
        if r.returncode != 0:
            pytest.skip(f"cannot create user {name}: {r.stderr.strip()}")
        made.append(name)
    try:
        yield tuple(account_owner(pwd.getpwnam(n).pw_uid) for n in USERS)  # type: ignore[misc]
    finally:
        for name in made:
            _run("userdel", name)
        if made_group:
            _run("groupdel", GROUP)


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    """Outside pytest's 0700 tmp tree: the test users must reach what is theirs."""
    path = Path(tempfile.mkdtemp(prefix="ckptd-trust-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _can_run(python: str, who: Owner) -> bool:
    try:
        r = subprocess.run(
            [python, "-c", "import ckptd.daemon.cli, tests.fakeworker"],
            cwd="/",
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            user=who.uid,
            group=who.gid,
            extra_groups=[],
        )
    except OSError:
        return False
    return r.returncode == 0


@pytest.fixture(scope="module")
def python(users: tuple[Owner, Owner], base: Path) -> str:
    """An interpreter the test users may run, with this environment's packages. The test venv's
    own interpreter may sit in root's home; then a venv of the system's Python of the same
    version reads the same site-packages."""
    if _can_run(sys.executable, users[0]):
        return sys.executable
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    system = shutil.which(f"python{version}", path="/usr/bin:/usr/local/bin")
    if system is None:
        pytest.skip(f"no python{version} the test users may run")
    venv = base / "py"
    subprocess.run([system, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "ckptd-tests.pth").write_text(
        f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n"
    )
    py = str(venv / "bin" / "python")
    if not _can_run(py, users[0]):
        pytest.skip("the test users cannot import ckptd with any interpreter here")
    return py


def _owned_dir(path: Path, who: Owner, mode: int = 0o700) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, who.uid, who.gid)
    path.chmod(mode)
    return path


def _owned_file(path: Path, text: str, who: Owner, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chown(path, who.uid, who.gid)
    path.chmod(mode)
    return path


def as_user(who: Owner, fn: Callable[[], Any]) -> dict[str, Any]:
    """Run `fn` in a child process with `who`'s uid, gid and groups; its result or refusal."""
    return as_uid(who.uid, who.gid, fn, who.groups)


def _api(
    d: DaemonProc, who: Owner, method: str, url: str, body: dict[str, Any] | None = None
) -> dict[str, Any]:
    return as_user(who, lambda: Client(d.sock, timeout=10).call(method, url, body))


def _submit(
    d: DaemonProc, who: Owner, job: Path, key: str | None = None, text: str | None = None
) -> dict[str, Any]:
    """The API directly (no client-side checks): what a hostile client could send."""
    body = {"raw": text if text is not None else job.read_text(), "job_file": str(job), "key": key}
    return _api(d, who, "POST", "/v1/jobs", body)


def _cli(python: str, d: DaemonProc, who: Owner, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PYTHONPATH": str(ROOT),
        "PATH": "/usr/bin:/bin",
        "CKPTD_SOCKET": str(d.sock),
        "HOME": "/nonexistent",
    }
    return subprocess.run(
        [python, "-m", "ckptd.daemon", *args],
        cwd="/",
        env=env,
        text=True,
        capture_output=True,
        user=who.uid,
        group=who.gid,
        extra_groups=list(who.groups),
        timeout=300,
    )


def _job_text(
    name: str,
    model: str = f"{EXAMPLE / 'model.py'}:build",
    extra: str = "",
    csv: str = str(CSV),
    ckpt: str = "",
) -> str:
    return (
        f"name: {name}\nmodel: {model}\nparams: {{csv: {csv}}}\n"
        "train: {epochs: 1, batch_size: 64}\n"
        f"checkpoint: {{every_steps: 5{ckpt}}}\nrestart: {{max_restarts: 0}}\n{extra}"
    )


@pytest.fixture
def faults() -> str:
    """CKPTD_FAULTS for the daemon's workers (none); a test changes it by parametrizing `faults`."""
    return ""


@pytest.fixture
def daemon(
    python: str, base: Path, users: tuple[Owner, Owner], faults: str, request: pytest.FixtureRequest
) -> Iterator[DaemonProc]:
    fake = "tf" not in request.keywords
    warm = "warm" in request.node.name
    home = base / f"home-{request.node.name[:40]}"
    d = start_daemon(
        home,
        fake=fake,
        python=python,
        config=f"socket_group: {GROUP}\nmax_concurrent_jobs: 2\nwarm_workers: {str(warm).lower()}\n",
        FAKE_WHOAMI="whoami.json",
        FAKE_STEPS="30",
        FAKE_STEP_SECONDS="0.01",
        CKPTD_FAULTS=faults,
    )
    try:
        yield d
    finally:
        d.stop()


def _wait_end(d: DaemonProc, job_id: str, timeout: float = 180) -> dict[str, Any]:
    return d.wait_state(job_id, "succeeded", "failed", "cancelled", timeout=timeout)


def test_the_worker_runs_as_its_submitter_and_its_outputs_are_theirs(
    daemon: DaemonProc, users: tuple[Owner, Owner], base: Path, python: str
) -> None:
    a, b = users
    mine = _owned_dir(base / "a-own", a)
    job = _owned_file(mine / "job.yaml", _job_text("mine"), a)
    got = _submit(daemon, a, job)
    job_id = got["ok"]["job"]["id"]
    assert _wait_end(daemon, job_id)["state"] == "succeeded", daemon.output()
    run = Path(daemon.job(job_id)["run_dir"])
    who = json.loads((run / "whoami.json").read_text())
    assert (who["uid"], who["euid"], who["gid"]) == (a.uid, a.uid, a.gid)
    assert who["groups"] == sorted(a.groups)
    assert all(int(v, 16) == 0 for v in who["caps"].values()), who["caps"]  # no capability
    for path in (
        run,
        run / "events.jsonl",
        run / "heartbeat.json",
        run / "attempts" / "0001",
        run / "attempts" / "0001" / "stderr.log",
        run / "checkpoints",
    ):
        assert path.stat().st_uid == a.uid, path
    assert run.stat().st_mode & 0o7777 == 0o2750  # setgid: the daemon's group reads, others not
    assert "best_files" not in daemon.job(job_id)["outputs"]  # the daemon lists nothing
    assert not (run / ".supervisor.lock").exists()  # the daemon's files are not in A's dir
    # A reads its outputs itself, and the CLI's views work for it.
    assert as_user(a, lambda: (run / "events.jsonl").read_text().count("\n"))["ok"] > 0
    r = _cli(python, daemon, a, "logs", job_id)
    assert r.returncode == 0 and "checkpoint.committed" in r.stdout and "worker.exited" in r.stdout
    r = _cli(python, daemon, a, "checkpoints", job_id)
    assert r.returncode == 0 and "step" in r.stdout, r.stderr
    r = _cli(python, daemon, a, "status")
    assert r.returncode == 0 and job_id in r.stdout
    # B: not through the daemon, and not through the file system.
    for method, url in (
        ("GET", f"/v1/jobs/{job_id}"),
        ("GET", f"/v1/jobs/{job_id}/events"),
        ("GET", f"/v1/jobs/{job_id}/checkpoints"),
        ("POST", f"/v1/jobs/{job_id}/cancel"),
    ):
        got = _api(daemon, b, method, url)
        assert got.get("status") == 403, (url, got)
    assert _api(daemon, b, "GET", "/v1/jobs")["ok"] == []
    assert "exc" in as_user(b, lambda: os.listdir(run))
    assert "exc" in as_user(b, lambda: (run / "events.jsonl").read_text())
    r = _cli(python, daemon, b, "export", job_id, "--latest", "-o", "/tmp/x.weights.h5")
    assert r.returncode != 0 and "may not see" in r.stderr
    # Outside the socket's group: a refusal, not an empty local store taken for the daemon's.
    nobody = Owner(65534, 65534, ())
    r = _cli(python, daemon, nobody, "status")
    assert r.returncode == 1 and "permission denied" in r.stderr, r.stdout + r.stderr


def test_idempotency_keys_are_per_owner_and_a_changed_spec_is_a_conflict(
    daemon: DaemonProc, users: tuple[Owner, Owner], base: Path
) -> None:
    a, b = users
    ja = _owned_file(_owned_dir(base / "a-keys", a) / "job.yaml", _job_text("keys"), a)
    jb = _owned_file(_owned_dir(base / "b-keys", b) / "job.yaml", _job_text("keys"), b)
    first = _submit(daemon, a, ja, key="shared-key-1")["ok"]
    assert first["created"]
    again = _submit(daemon, a, ja, key="shared-key-1")["ok"]  # a retry: the same job
    assert not again["created"] and again["job"]["id"] == first["job"]["id"]
    other = _submit(daemon, b, jb, key="shared-key-1")["ok"]  # B's key is B's
    assert other["created"] and other["job"]["id"] != first["job"]["id"]
    changed = _submit(daemon, a, ja, key="shared-key-1", text=_job_text("keys", extra="best: {}\n"))
    assert changed["status"] == 409 and "shared-key-1" in changed["error"], changed
    # What the client says it validated must be what the job file says.
    body = {
        "raw": ja.read_text(),
        "job_file": str(ja),
        "spec_json": json.dumps({"name": "other", "model": "m:build"}),
    }
    got = _api(daemon, a, "POST", "/v1/jobs", body)
    assert got["status"] == 400 and "does not match raw" in got["error"], got


def test_paths_outside_the_run_directory_are_refused_at_submit(
    daemon: DaemonProc, users: tuple[Owner, Owner], base: Path, python: str
) -> None:
    a, b = users
    mine = _owned_dir(base / "a-paths", a)
    locked = base / "root-only"
    locked.mkdir(exist_ok=True, mode=0o755)
    for ckpt, extra, field in (
        (f", dir: {locked}/ck", "", "checkpoint.dir"),
        (", dir: ../../x", "", "checkpoint.dir"),
        ("", "best: {filepath: /etc/cron.d/x.hdf5}\n", "best.filepath"),
    ):
        job = _owned_file(mine / "job.yaml", _job_text("paths", extra=extra, ckpt=ckpt), a)
        r = _cli(python, daemon, a, "submit", str(job))
        assert r.returncode == 2 and field in r.stderr, (extra, r.stderr)
    secret = _owned_dir(base / "b-secret", b)
    _owned_file(secret / "model.py", "raise SystemExit('imported')\n", b)
    job = _owned_file(mine / "job.yaml", _job_text("paths", model=f"{secret}/model.py:build"), a)
    r = _cli(python, daemon, a, "submit", str(job))
    assert r.returncode == 2 and f"{secret}/model.py" in r.stderr, r.stderr
    assert not list(locked.iterdir())


@pytest.mark.tf
def test_what_the_submitter_cannot_touch_fails_as_config_error_naming_it(
    daemon: DaemonProc, users: tuple[Owner, Owner], base: Path
) -> None:
    """Sent straight to the API (no client-side check): the worker, running as A, meets A's
    rights. The model file of B's is never imported (its marker never appears)."""
    a, b = users
    mine = _owned_dir(base / "a-real", a)
    secret = _owned_dir(base / "b-real", b)
    marker = base / "imported-marker"
    model = _owned_file(
        secret / "model.py",
        f"open({str(marker)!r}, 'w').write('x')\ndef build(params):\n    raise SystemExit(1)\n",
        b,
    )
    data = _owned_file(secret / "data.csv", CSV.read_text(), b)
    locked = base / "root-only-real"
    locked.mkdir(exist_ok=True, mode=0o755)
    cases = {
        "model": (_job_text("m", model=f"{model}:build"), str(model)),
        "data": (_job_text("d", csv=str(data)), str(data)),
        "ckpt": (_job_text("c", ckpt=f", dir: {locked}/ck"), f"{locked}/ck"),
        "best": (_job_text("b", extra=f"best: {{filepath: {locked}/b/w.hdf5}}\n"), f"{locked}/b"),
    }
    ids = {}
    for name, (text, _) in cases.items():
        job = _owned_file(mine / f"{name}.yaml", text, a)
        ids[name] = _submit(daemon, a, job)["ok"]["job"]["id"]
    for name, (_, path) in cases.items():
        end = _wait_end(daemon, ids[name], timeout=300)
        assert end["state"] == "failed", (name, end)
        attempt = end["attempt_list"][-1]
        assert attempt["class"] == "config_error", (name, attempt)
        assert path in (attempt["error"] or ""), (name, attempt)
    assert not marker.exists()
    assert not list(locked.iterdir())


def test_a_daemon_without_root_runs_only_its_own_users_jobs(
    users: tuple[Owner, Owner], base: Path, python: str
) -> None:
    a, b = users
    home = _owned_dir(base / "a-daemon", a, 0o711)
    env = {
        "PYTHONPATH": str(ROOT),
        "PATH": "/usr/bin:/bin",
        "HOME": "/nonexistent",
        "CKPTD_WORKER_MODULE": "tests.fakeworker",
        "FAKE_STEPS": "20",
        "FAKE_STEP_SECONDS": "0.01",
    }
    (home / "daemon.yaml").write_text("spool: false\n")
    with open(base / "a-daemon.log", "w") as log:
        proc = subprocess.Popen(
            [python, "-m", "ckptd.daemon", "--home", str(home), "daemon"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd="/",
            user=a.uid,
            group=a.gid,
            extra_groups=list(a.groups),
            start_new_session=True,
        )
    sock = home / "ckptd.sock"
    try:
        # Until it answers: the daemon chmods its socket after bind(), and a chmod of ours
        # in between would be undone.
        wait_for(
            "A's daemon", lambda: proc.poll() is not None or (sock.exists() and Client(sock).available()), 60
        )
        os.chmod(sock, 0o666)  # as if B could reach it: the daemon itself must refuse
        d = DaemonProc(home, proc, base / "a-daemon.log", sock)  # type: ignore[arg-type]
        jb = _owned_file(_owned_dir(base / "b-solo", b) / "job.yaml", _job_text("solo"), b)
        got = _submit(d, b, jb)
        assert got.get("status") == 403 and "other users" in got["error"], got
        ja = _owned_file(_owned_dir(base / "a-solo", a) / "job.yaml", _job_text("solo"), a)
        job_id = _submit(d, a, ja)["ok"]["job"]["id"]
        end = wait_for(
            "A's job",
            lambda: (
                (j := _api(d, a, "GET", f"/v1/jobs/{job_id}")["ok"])["state"] in ("succeeded", "failed") and j
            ),
            120,
        )
        assert end["state"] == "succeeded", (base / "a-daemon.log").read_text()
    finally:
        proc.terminate()
        proc.wait(60)


def test_the_spool_runs_a_file_as_its_owner_and_refuses_hard_links(
    daemon: DaemonProc, users: tuple[Owner, Owner], base: Path
) -> None:
    a, b = users
    spool = daemon.home / "spool"
    assert spool.stat().st_mode & 0o7777 == 0o711 and spool.stat().st_uid == 0  # no user writes here
    mine, theirs = spool / USERS[0], spool / USERS[1]
    wait_for("spool directories of the submitters", lambda: mine.is_dir() and theirs.is_dir(), 30)
    assert (mine.stat().st_uid, mine.stat().st_mode & 0o7777) == (a.uid, 0o770)
    job = as_user(a, lambda: Path(mine / "a-job.yaml").write_text(_job_text("spooled")))
    assert "ok" in job, job
    b_file = _owned_file(_owned_dir(base / "b-spool", b, 0o755) / "b.yaml", _job_text("theirs"), b, 0o644)
    os.link(b_file, mine / "linked.yaml")  # B's file, dropped by someone else
    wait_for(
        "the spool intake",
        lambda: (
            (spool / "rejected" / "linked.yaml.error.txt").exists() and not (mine / "a-job.yaml").exists()
        ),
        60,
    )
    assert "hard links" in (spool / "rejected" / "linked.yaml.error.txt").read_text()
    listed = _api(daemon, a, "GET", "/v1/jobs")["ok"]
    assert [j["name"] for j in listed] == ["spooled"] and listed[0]["owner_uid"] == a.uid


def test_a_file_moved_into_the_spool_by_another_user_never_runs_as_its_owner(
    daemon: DaemonProc, users: tuple[Owner, Owner], base: Path
) -> None:
    """Issue 25: B rewrote A's world-writable file in a shared directory and moved it into the
    spool; it ran as A and read A's 0600 secret. Where it lies and its mode now say who put it."""
    a, b = users
    spool = daemon.home / "spool"
    mine, theirs = spool / USERS[0], spool / USERS[1]
    wait_for("spool directories of the submitters", lambda: mine.is_dir() and theirs.is_dir(), 30)
    shared = _owned_dir(base / "shared", a, 0o777)  # a shared scratch directory, not sticky
    bait = _owned_file(shared / "victim.yaml", _job_text("draft"), a, 0o666)
    rewrite = as_user(b, lambda: bait.write_text(_job_text("stolen")))
    assert "ok" in rewrite, rewrite
    into_a = as_user(b, lambda: os.rename(bait, mine / "victim.yaml"))
    assert "exc" in into_a and "Permission denied" in into_a["exc"]  # A's directory is A's alone
    moved = as_user(b, lambda: os.rename(bait, theirs / "victim.yaml"))
    assert "ok" in moved, moved
    weak = _owned_file(mine / "group-writable.yaml", _job_text("weak"), a, 0o664)
    note = spool / "rejected" / "victim.yaml.error.txt"
    weak_note = spool / "rejected" / "group-writable.yaml.error.txt"
    wait_for("the spool intake", lambda: note.exists() and weak_note.exists(), 60)
    assert f"owned by uid {a.uid} but found in the spool directory of uid {b.uid}" in note.read_text()
    assert "writable by group or others" in weak_note.read_text() and weak.exists() is False
    for who in (a, b):
        assert _api(daemon, who, "GET", "/v1/jobs")["ok"] == []


def test_a_warm_worker_becomes_the_submitter_before_it_runs_the_job(
    daemon: DaemonProc, users: tuple[Owner, Owner], base: Path
) -> None:
    """Warm workers wait as the user whose job will take them, never as root with the daemon's
    capabilities (issue 25): a user's first job starts cold, the next one takes a warm worker."""
    a, _ = users
    first = _owned_file(_owned_dir(base / "a-cold", a) / "job.yaml", _job_text("cold"), a)
    assert _wait_end(daemon, _submit(daemon, a, first)["ok"]["job"]["id"])["state"] == "succeeded"
    wait_for("a warm worker", lambda: daemon.api("GET", "/v1/health")["warm_workers"] > 0, 60)
    pool = str(daemon.home / "warm")
    waiting = [
        p
        for p in psutil.process_iter(["cmdline", "uids", "cwd"])
        if "--warm" in (p.info["cmdline"] or []) and (p.info["cwd"] or "").startswith(pool)
    ]
    assert waiting and all(p.info["uids"].real == p.info["uids"].effective == a.uid for p in waiting)
    job = _owned_file(_owned_dir(base / "a-warm", a) / "job.yaml", _job_text("warm"), a)
    job_id = _submit(daemon, a, job)["ok"]["job"]["id"]
    end = _wait_end(daemon, job_id)
    assert end["state"] == "succeeded", daemon.output()
    assert "worker.warm_assigned" in daemon.output()
    run = Path(end["run_dir"])
    who = json.loads((run / "whoami.json").read_text())
    assert (who["uid"], who["euid"], who["gid"]) == (a.uid, a.uid, a.gid)
    assert who["groups"] == sorted(a.groups)
    assert all(int(v, 16) == 0 for v in who["caps"].values()), who["caps"]
    assert (run / "attempts" / "0001" / "stdout.log").stat().st_uid == a.uid


@pytest.mark.tf
def test_the_owner_exports_its_own_job_and_another_user_cannot(
    daemon: DaemonProc, users: tuple[Owner, Owner], base: Path, python: str
) -> None:
    a, b = users
    mine = _owned_dir(base / "a-export", a)
    job = _owned_file(
        mine / "job.yaml",
        _job_text("export", extra="best: {monitor: loss, filepath: 'w-{epoch:02d}.hdf5'}\n"),
        a,
    )
    r = _cli(python, daemon, a, "submit", "--wait", str(job))
    assert r.returncode == 0, r.stderr + daemon.output()
    job_id = r.stdout.split()[0]
    run = Path(daemon.job(job_id)["run_dir"])
    best = sorted(run.glob("w-*.hdf5"))
    assert best and all(p.stat().st_uid == a.uid for p in best)
    for which, out in (("--best", mine / "best.hdf5"), ("--latest", mine / "latest.weights.h5")):
        r = _cli(python, daemon, a, "export", job_id, which, "-o", str(out))
        assert r.returncode == 0 and out.stat().st_uid == a.uid, r.stderr
    r = _cli(python, daemon, b, "export", job_id, "--best", "-o", "/tmp/b-best.hdf5")
    assert r.returncode == 2 and "may not see" in r.stderr
    assert "exc" in as_user(b, lambda: best[-1].read_bytes())  # nor by reading the file


def test_a_run_directory_from_before_the_upgrade_becomes_its_owners(
    users: tuple[Owner, Owner], base: Path, python: str
) -> None:
    """A job queued by a ckptd whose run directories were its own (the service user's) runs as
    its submitter after the upgrade, in a directory that is now theirs."""
    from ckptd.daemon.backend import submit_job
    from ckptd.state.jobfile import parse_job
    from ckptd.state.store import Store

    a, _ = users
    home = base / "home-legacy"
    home.mkdir()
    job = _owned_file(_owned_dir(base / "a-legacy", a) / "job.yaml", _job_text("legacy"), a)
    store = Store.open(home)
    spec = parse_job(job.read_bytes(), str(job), job.parent, check=False)
    created = submit_job(store, home, spec, job.read_bytes(), str(job), a, 0, None)
    store.close()
    run = Path(created.run_dir)
    for path in (run, run / "job.yaml", run / "spec.json"):  # as ckptd 0.2 left it
        os.chown(path, 0, 0)
    run.chmod(0o750)
    (run / "attempts" / "0001").mkdir(parents=True)
    (run / "attempts" / "0001" / "stdout.log").write_text("from before\n")
    d = start_daemon(
        home, python=python, FAKE_WHOAMI="whoami.json", FAKE_STEPS="20", FAKE_STEP_SECONDS="0.01"
    )
    try:
        assert _wait_end(d, created.id)["state"] == "succeeded", d.output()
    finally:
        d.stop()
    assert run.stat().st_uid == a.uid and run.stat().st_mode & 0o7777 == 0o2750
    assert json.loads((run / "whoami.json").read_text())["uid"] == a.uid
    assert (run / "job.yaml").stat().st_uid == a.uid and not run.with_name(run.name + ".legacy").exists()
    assert (run / "attempts" / "0001" / "stdout.log").read_text().startswith("from before")
    assert "job.run_dir_reclaimed" in d.output()


def _tier_modes(tier: Path) -> dict[str, tuple[int, str]]:
    """Owner and `ls -l` mode of the tier and everything in it, by path relative to it; what a
    prune removes meanwhile is left out."""
    found = {}
    for top, dirs, files in os.walk(tier):
        for path in (top, *(os.path.join(top, n) for n in dirs + files)):
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(path)
                found[os.path.relpath(path, tier)] = (st.st_uid, stat.filemode(st.st_mode))
    return found


@pytest.mark.tf
@pytest.mark.parametrize("faults", ["step_delay=0.02"])
def test_a_memory_tier_is_its_submitters_alone_and_goes_with_the_job(
    daemon: DaemonProc,
    users: tuple[Owner, Owner],
    base: Path,
    tier_root: Path,
    golden: dict[str, str],
) -> None:
    """docs/memory-tier.md: the worker, as A, keeps its snapshots in a tier only A may enter; a
    SIGKILLed worker's successor resumes from it; the job's end removes it, as A."""
    a, b = users
    mine = _owned_dir(base / "a-tier", a)
    job = tier_job(mine, tier_root)
    _owned_file(job, job.read_text(), a)
    job_id = _submit(daemon, a, job)["ok"]["job"]["id"]
    run = Path(daemon.job(job_id)["run_dir"])
    tier = tier_root / job_id

    def snapshotted() -> dict[str, tuple[int, str]] | None:
        modes = _tier_modes(tier)
        return modes if any(p.endswith("values.bin") for p in modes) else None

    seen = wait_for("a snapshot in the tier", snapshotted, 180)
    root = tier_root.stat()
    assert (root.st_uid, stat.filemode(root.st_mode)) == (a.uid, "drwx------")
    assert {uid for uid, _ in seen.values()} == {a.uid}, seen
    assert {mode for _, mode in seen.values()} == {"drwx------", "-rw-------"}, seen
    values = tier / next(p for p in seen if p.endswith("values.bin"))
    assert "ok" in as_user(a, lambda: os.listdir(tier))
    for peek in (lambda: os.listdir(tier_root), lambda: os.listdir(tier), lambda: values.read_bytes()):
        got = as_user(b, peek)
        assert "PermissionError" in got.get("exc", ""), got
    hb = heartbeat_when(run, lambda h: h.attempt == 1 and h.step >= DURABLE_EVERY + 30, 180)
    os.kill(hb.pid, signal.SIGKILL)
    end = _wait_end(daemon, job_id, timeout=300)
    assert end["state"] == "succeeded", daemon.output()
    assert [x["class"] for x in end["attempt_list"]] == ["killed", "succeeded"], end["attempt_list"]
    restored = [e for e in events(run) if e["event"] == "restore.done" and e["attempt"] == 2]
    assert restored and restored[0]["source"] == "memory", restored
    assert restored[0]["step"] > DURABLE_EVERY, restored
    assert final_state_hash(run) == golden
    # Removed at the job's end, as A, just after the job is recorded as succeeded.
    wait_for("the tier's removal", lambda: not os.path.lexists(tier), 60)
    assert tier_root.is_dir()  # the root is A's: only the job's directory goes
    assert "memory.tier_remove_failed" not in (run / "events.jsonl").read_text() + daemon.output()

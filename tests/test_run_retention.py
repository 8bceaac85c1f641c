"""Retention of finished jobs' run directories (daemon.yaml `finished_retention:`): the pure
decision as a table, the config's messages, the removal as its child process does it (no symlink
followed), the loop step with a real store, and a real daemon applying the policy at its start."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import CapturingLogger
from structlog.typing import FilteringBoundLogger

from ckptd.daemon import jobs
from ckptd.daemon.backend import Registry
from ckptd.daemon.config import DaemonConfig, load_config
from ckptd.daemon.retention_runs import RunRetention, remover
from ckptd.state.jobfile import load_job_file
from ckptd.state.runremove import main as remove_main
from ckptd.state.runremove import remove
from ckptd.state.runretention import DAY, Finished, FinishedRetention, expired
from ckptd.state.runretention import describe_removal as describe
from ckptd.state.runretention import is_checkpoint_entry as is_checkpoint
from ckptd.state.states import JobState
from ckptd.state.store import Store
from ckptd.state.submissions import Owner
from ckptd.state.yamlstrict import JobFileError

from .conftest import ROOT
from .daemonproc import fake_job, start_daemon
from .procs import wait_for

S, F, C = JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED
NOW = 1000 * DAY
ME, NOBODY = Owner(0, 0, (0,)), 65534
AS_NOBODY: dict[str, Any] = {"user": NOBODY, "group": NOBODY, "extra_groups": [], "cwd": "/"}
SLOW = {"FAKE_STEPS": "400", "FAKE_STEP_SECONDS": "0.02"}  # ~8 s: still running when checked
POLICY = "finished_retention: {keep_days: 1, keep_days_failed: 10, keep_last_per_name: 1}\n"


def _job(id: str, d: float, state: JobState = S, name: str = "a", uid: int | None = 1, **kw: Any) -> Finished:
    return Finished(id, name, uid, state, NOW - d * DAY, **kw)  # `d` days before NOW


def _policy(**kw: Any) -> FinishedRetention:
    return FinishedRetention.model_validate({"keep_days": 10, "keep_last_per_name": 1, **kw})


J, P, DONE, K0 = _job, _policy, frozenset({"checkpoints"}), {"keep_last_per_name": 0}
MAY_RUN = [J(s, 50, JobState(s)) for s in ("queued", "running", "backoff", "interrupted")]
EXPIRED_CASES = [  # (case, jobs: id and days since their end, policy, what expires)
    ("old beyond the newest", [J("a1", 50), J("a2", 40)], P(), ["a1"]),
    ("young jobs stay", [J("a1", 5), J("a2", 1)], P(), []),
    ("exactly keep_days old stays", [J("a1", 10), J("a2", 1)], P(), []),
    ("an end in the future stays", [J("a1", -1), J("a2", -2)], P(**K0), []),
    ("jobs that may still run never go", MAY_RUN, P(**K0), []),
    ("cancelled is finished", [J("a1", 50, C), J("a2", 1)], P(), ["a1"]),
    ("failed: its own days", [J("f", 20, F), J("s", 20)], P(keep_days_failed=30, **K0), ["s"]),
    ("failed: keep_days by default", [J("f", 20, F), J("s", 20)], P(**K0), ["f", "s"]),
    ("failed: shorter if asked", [J("f", 5, F), J("s", 5)], P(keep_days_failed=1, **K0), ["f"]),
    ("other names", [J("x1", 50, name="x"), J("y1", 50, name="y"), J("a1", 50)], P(), []),
    ("other owners", [J("u2", 50, uid=2), J("u1", 60), J("u1b", 55)], P(), ["u1"]),
    ("ckptd run's jobs (no owner) are a group", [J("n1", 50, uid=None), J("n2", 40, uid=None)], P(), ["n1"]),
    ("only finished ones are newest", [J("r", 0, JobState.RUNNING), J("a1", 50), J("a2", 40)], P(), ["a1"]),
    ("all of them, oldest first", [J("b", 2), J("a", 3), J("c", 2)], P(keep_days=0, **K0), list("abc")),
    ("checkpoints removed: not again", [J("a1", 50, removed=DONE), J("a2", 1)], P(), []),
    ("checkpoints gone, then run dir", [J("a1", 50, removed=DONE), J("a2", 1)], P(remove="run_dir"), ["a1"]),
    ("run dir removed: nothing left", [J("a1", 50, removed=frozenset({"run_dir"})), J("a2", 1)], P(), []),
]


@pytest.mark.parametrize(
    ("case", "found", "policy", "want"), EXPIRED_CASES, ids=[c[0] for c in EXPIRED_CASES]
)
def test_expired(case: str, found: list[Finished], policy: FinishedRetention, want: list[str]) -> None:
    assert expired(found, policy, NOW) == [(j, policy.remove) for j in want]


CHECKPOINT_NAMES = ["ckpt-5.index", "ckpt-5.data-00000-of-00001", "ckpt-5.manifest.json", "ckpt-12_temp_9f3a"]
CHECKPOINT_NAMES += ["checkpoint", "checkpoint.tmp81", ".checkpoint.4411.tmp", "ckpt-5.index.tempstate123"]
CHECKPOINT_NAMES += ["quarantine", ".restoring.json", ".graph-probe"]
OTHER_NAMES = [".lock", "ckpt-best.h5", "weights.best.hdf5", "best-01.weights.h5", "checkpoints"]
NAME_CASES = [(n, True) for n in CHECKPOINT_NAMES] + [(n, False) for n in OTHER_NAMES]


@pytest.mark.parametrize(("name", "checkpoint"), NAME_CASES)
def test_what_counts_as_a_checkpoint(name: str, checkpoint: bool) -> None:
    assert is_checkpoint(name) is checkpoint


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{keep_days: -1}", "keep_days: Input should be greater than or equal to 0"),
        ("{keep_days: '30'}", "keep_days: Input should be a valid number"),
        ("{keep_days: .nan}", "keep_days: Input should be a finite number"),
        ("{}", "keep_days: Field required"),
        ("{keep_days: 30, remove: all}", "remove: Input should be 'checkpoints' or 'run_dir'"),
        ("{keep_days: 30, keep_last: 3}", "keep_last: Extra inputs are not permitted"),
        ("{keep_days: 30, keep_last_per_name: 1.5}", "keep_last_per_name: Input should be a valid integer"),
        ("{keep_days: 30, dry_run: 'yes'}", "dry_run: Input should be a valid boolean"),
    ],
)
def test_a_bad_setting_is_one_message_naming_the_field(tmp_path: Path, text: str, problem: str) -> None:
    (tmp_path / "daemon.yaml").write_text(f"finished_retention: {text}\n")
    with pytest.raises(JobFileError) as e:
        load_config(None, tmp_path)
    problems = e.value.problems
    assert len(problems) == 1 and f"finished_retention.{problem}" in problems[0], problems


def test_unconfigured_nothing_is_removed_and_defaults_are_safe(tmp_path: Path) -> None:
    assert DaemonConfig().finished_retention is None
    (tmp_path / "daemon.yaml").write_text("finished_retention: {keep_days: 30}\n")
    policy = load_config(None, tmp_path).finished_retention
    assert policy == FinishedRetention(keep_days=30, keep_last_per_name=3, remove="checkpoints")
    assert policy.days_for(F) == 30 and not policy.dry_run


def _plant(run: Path, steps: int = 1) -> None:
    """What a finished job leaves: checkpoints (with a quarantined one), outputs, logs."""
    ck = run / "checkpoints"
    (ck / "quarantine" / "ckpt-0-20260101T000000").mkdir(parents=True, exist_ok=True)
    (ck / "quarantine" / "ckpt-0-20260101T000000" / "reason.txt").write_text("damaged\n")
    for n in range(1, steps + 1):
        (ck / f"ckpt-{n}.index").write_bytes(b"i" * 10)
        (ck / f"ckpt-{n}.data-00000-of-00001").write_bytes(b"d" * 1000)
        (ck / f"ckpt-{n}.manifest.json").write_text("{}")
    (ck / "checkpoint").write_text('model_checkpoint_path: "ckpt-1"\n')
    (ck / "best.weights.h5").write_bytes(b"b")  # a best file the job keeps beside its checkpoints
    for name in ("history.csv", "weights.best.hdf5", "events.jsonl"):
        (run / name).write_text(name)


def _checkpoints_left(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if is_checkpoint(p.name))


def _outside(tmp_path: Path) -> Path:
    out = tmp_path / "outside"
    (out / "dir").mkdir(parents=True)
    (out / "secret.txt").write_text("not the job's")
    (out / "dir" / "ckpt-1.index").write_text("not the job's either")
    return out


def _booby_trap(run: Path, out: Path) -> None:
    """Names a run directory's owner might plant, pointing out of it."""
    (run / "checkpoints" / "ckpt-9.index").symlink_to(out / "secret.txt")
    (run / "checkpoints" / "ckpt-8_temp").symlink_to(out / "dir")
    (run / "checkpoints" / "quarantine" / "escape").symlink_to(out)


def _intact(out: Path) -> bool:
    return (out / "secret.txt").read_text() == "not the job's" and (out / "dir" / "ckpt-1.index").exists()


def test_checkpoints_go_outputs_stay_and_no_symlink_is_followed(tmp_path: Path) -> None:
    out, run = _outside(tmp_path), tmp_path / "jobs" / "a-1"
    _plant(run, steps=2)
    _booby_trap(run, out)
    (run / "checkpoints" / ".lock").write_text("")
    done = remove(tmp_path / "jobs", "a-1", "checkpoints", "checkpoints")
    assert _checkpoints_left(run) == [] and done.errors == [] and not done.elsewhere
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [".lock", "best.weights.h5"]
    kept = {"checkpoints", "events.jsonl", "history.csv", "weights.best.hdf5"}
    assert {p.name for p in run.iterdir()} == kept
    assert _intact(out) and sorted(os.listdir(out)) == ["dir", "secret.txt"]
    # 2 x (index, data, manifest), the state file, reason.txt, 3 symlinks; bytes of regular files
    assert (done.files, done.bytes) == (11, 2 * 1012 + len('model_checkpoint_path: "ckpt-1"\n') + 8)


def test_symlinked_dirs_are_not_followed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, run = _outside(tmp_path), tmp_path / "jobs" / "a-1"
    run.mkdir(parents=True)
    (run / "checkpoints").symlink_to(out / "dir")
    done = remove(tmp_path / "jobs", "a-1", "checkpoints", "checkpoints")
    assert done.files == 0 and done.elsewhere and "not followed" in (done.note or "") and _intact(out)
    assert remove(tmp_path / "jobs", "a-1", "checkpoints", str(out / "dir")).elsewhere and _intact(out)
    (tmp_path / "jobs" / "b-1").symlink_to(out)
    assert remove_main([str(tmp_path / "jobs"), "b-1", "run_dir"]) == 1 and _intact(out)
    assert remove_main([str(tmp_path / "jobs"), "..", "run_dir"]) == 2
    capsys.readouterr()
    assert remove_main([str(tmp_path / "jobs"), "a-1", "run_dir"]) == 0  # unlinks the symlink only
    assert json.loads(capsys.readouterr().out)["files"] == 1 and os.listdir(run) == [] and _intact(out)


def test_a_resume_in_progress_holds_the_removal_off(tmp_path: Path) -> None:
    run = tmp_path / "jobs" / "a-1"
    _plant(run)
    held = jobs.lock_job(run)  # what `ckptd run --resume` takes
    with pytest.raises(BlockingIOError):
        remove(tmp_path / "jobs", "a-1", "run_dir", "checkpoints")
    os.close(held)
    assert _checkpoints_left(run)
    assert remove(tmp_path / "jobs", "a-1", "run_dir", "checkpoints").files > 0 and os.listdir(run) == []


@pytest.mark.parametrize(
    ("run_uid", "submitter", "want"),
    [
        (0, None, ME),  # ours: our own rights
        (0, Owner(1000, 1000, (1000, 27)), ME),  # a legacy run directory, still ours
        (1000, Owner(1000, 1000, (1000, 27)), Owner(1000, 1000, (1000, 27))),  # its submitter's groups
        (4242, Owner(1000, 1000), Owner(4242, 4242)),  # neither: the directory's owner (no account)
    ],
)
def test_the_remover_is_the_run_dirs_owner(run_uid: int, submitter: Owner | None, want: Owner) -> None:
    assert remover(run_uid, submitter, ME) == want


def _log() -> tuple[FilteringBoundLogger, CapturingLogger]:
    cap = CapturingLogger()  # what a logger like the daemon's was told
    return structlog.wrap_logger(cap, processors=[], wrapper_class=FILTERING), cap


FILTERING = structlog.make_filtering_bound_logger(0)


def _said(cap: CapturingLogger, event: str) -> list[dict[str, Any]]:
    return [c.kwargs for c in cap.calls if c.kwargs["event"] == event]


def _finished(store: Store, home: Path, tmp_path: Path, age_days: float) -> str:
    """A succeeded job of name `a` that ended `age_days` ago, with two checkpoint rows."""
    spec, raw = load_job_file(fake_job(tmp_path, "a"))
    job = jobs.create_job(store, home, spec, raw, tmp_path / "a.yaml")
    store.transition(job.id, JobState.RUNNING)
    for step in (10, 20):
        store.record_checkpoint(job.id, step, 0, f"ckpt-{step // 10}", {}, "d")
    store.transition(job.id, JobState.SUCCEEDED)
    _set(store, job.id, updated_at=time.time() - age_days * DAY)
    _plant(Path(job.run_dir))
    return job.id


def _set(store: Store, job_id: str, **values: Any) -> None:
    with store.write() as db:
        for column, value in values.items():
            db.execute(f"UPDATE jobs SET {column} = ? WHERE id = ?", (value, job_id))


def _run_until_idle(rr: RunRetention, store: Store, registry: Registry) -> None:
    def idle() -> bool:
        rr.step(store, registry)
        return rr.child is None and not rr.pending

    wait_for("the removals to end", idle, 60, interval=0.05)


def test_the_loop_step_rechecks_removes_and_records(tmp_path: Path) -> None:
    home, (log, cap) = tmp_path / "home", _log()
    store = Store.open(home)
    old, changed, busy, newest = (_finished(store, home, tmp_path, d) for d in (9, 8, 7, 1))
    policy = FinishedRetention(keep_days=2, keep_last_per_name=1, remove="run_dir")
    rr, registry = RunRetention(home, policy, log), Registry()
    registry.running[busy] = None  # type: ignore[assignment]  # its supervisor still finishing
    rr.step(store, registry)  # the round: three expired; the oldest's removal starts
    assert rr.child is not None and [p[0] for p in rr.pending] == [changed, busy]
    _set(store, changed, state="interrupted", updated_at=time.time())  # resumed meanwhile
    _run_until_idle(rr, store, registry)
    assert not (home / "jobs" / old).exists()
    assert all(_checkpoints_left(home / "jobs" / kept) for kept in (changed, busy, newest))
    assert store.job(old).state == S and store.checkpoints(old) == []  # the row stays; the rows retired
    assert len(store.checkpoints(old, include_retired=True)) == 2
    assert len(store.checkpoints(newest)) == 2
    (event,) = [json.loads(e["data_json"]) for e in store.events(old) if e["kind"] == "retention.removed"]
    assert event["what"] == "run_dir" and event["files"] > 5 and event["bytes"] > 1000
    assert [kw["job_id"] for kw in _said(cap, "retention.skipped")] == [changed, busy]
    assert [kw["job_id"] for kw in _said(cap, "retention.removed")] == [old]
    rr.next_round = 0.0  # the next hour: done is done, the busy one goes now
    del registry.running[busy]
    _run_until_idle(rr, store, registry)
    assert [kw["job_id"] for kw in _said(cap, "retention.removed")] == [old, busy]
    assert (home / "jobs" / changed).exists() and (home / "jobs" / newest).exists()


def test_dry_run_only_says_what_would_go(tmp_path: Path) -> None:
    home, (log, cap) = tmp_path / "home", _log()
    store = Store.open(home)
    old, newest = _finished(store, home, tmp_path, 9), _finished(store, home, tmp_path, 1)
    rr = RunRetention(home, FinishedRetention(keep_days=0, keep_last_per_name=0, dry_run=True), log)
    _run_until_idle(rr, store, Registry())
    would = [(kw["job_id"], kw["what"]) for kw in _said(cap, "retention.would_remove")]
    assert would == [(old, "checkpoints"), (newest, "checkpoints")]
    assert _checkpoints_left(home / "jobs" / old) and _checkpoints_left(home / "jobs" / newest)
    assert not [e for e in store.events(old) if e["kind"] == "retention.removed"]


def _python_for_nobody() -> tuple[str, str] | None:
    """A Python uid 65534 may run (the venv's may be in root's home), with this checkout's path."""
    path = f"{ROOT}{os.pathsep}{sysconfig.get_paths()['purelib']}"
    system = shutil.which(f"python{sys.version_info.major}.{sys.version_info.minor}", path="/usr/bin")
    for py in filter(None, (sys.executable, system)):
        with contextlib.suppress(OSError):
            argv = [py, "-c", "import ckptd.state.runremove"]
            if subprocess.run(argv, env={"PYTHONPATH": path}, **AS_NOBODY).returncode == 0:
                return py, path
    return None


def test_the_removal_has_the_owners_rights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    found = _python_for_nobody() if os.geteuid() == 0 else None
    if found is None:
        pytest.skip("needs root, and a Python that uid 65534 may run")
    monkeypatch.setattr(sys, "executable", found[0])  # what the daemon starts the remover with
    monkeypatch.setenv("PYTHONPATH", found[1])
    base = Path(tempfile.mkdtemp(prefix="ckptd-retention-", dir="/tmp"))
    os.chmod(base, 0o711)  # the owner may pass through to the run directory, as under the unit
    try:
        home, (log, cap), policy = base / "home", _log(), FinishedRetention(keep_days=0, keep_last_per_name=0)
        store = Store.open(home)
        job_id = _finished(store, home, tmp_path, 9)
        run, rr = home / "jobs" / job_id, RunRetention(home, policy, log)
        for path in [run, *run.rglob("*")]:
            os.chown(path, NOBODY, NOBODY, follow_symlinks=False)
        os.chown(run / "checkpoints" / "quarantine", 0, 0)  # root's: root could empty it, its owner not
        _run_until_idle(rr, store, Registry())
        (failed,) = _said(cap, "retention.failed")
        assert "Permission denied" in str(failed["errors"]) and not _removed(store, job_id)
        assert (run / "checkpoints" / "quarantine" / "ckpt-0-20260101T000000").is_dir()
        os.chown(run / "checkpoints" / "quarantine", NOBODY, NOBODY)
        rr.next_round = 0.0  # the next hour: tried again, and all goes
        _run_until_idle(rr, store, Registry())
        assert _removed(store, job_id) and _checkpoints_left(run) == []
    finally:
        shutil.rmtree(base)


def _finished_jobs_then_queued(home: Path, tmp_path: Path) -> dict[str, str]:
    """Five finished jobs (names a and b), then two queued behind a drain (name a)."""
    d = start_daemon(home, FAKE_STEPS="20", FAKE_STEP_SECONDS="0.01")
    try:
        ids = {key: d.submit(fake_job(tmp_path, key[0])) for key in ("a1", "a2", "a3", "b1", "b2")}
        for job_id in ids.values():
            d.wait_state(job_id, "succeeded")
        d.api("POST", "/v1/drain", {"running": "stop"})
        ids |= {key: d.submit(fake_job(tmp_path, "a")) for key in ("r", "q")}
    finally:
        d.stop()
    (home / "drain.json").unlink()  # undrained while stopped: r starts with the next daemon
    return ids


def test_the_daemon_applies_the_policy_at_its_start(tmp_path: Path) -> None:
    home, out = tmp_path / "home", _outside(tmp_path)
    ids = _finished_jobs_then_queued(home, tmp_path)
    ended = {"a1": 5, "a2": 4, "a3": 3, "b1": 5, "b2": 20}  # days ago
    with sqlite3.connect(home / "ckptd.db") as db:
        for key, days in ended.items():
            db.execute("UPDATE jobs SET updated_at = ? WHERE id = ?", (time.time() - days * DAY, ids[key]))
        db.execute("UPDATE jobs SET state = 'cancelled' WHERE id = ?", (ids["a2"],))
        db.executemany("UPDATE jobs SET state = 'failed' WHERE id = ?", [(ids["b1"],), (ids["b2"],)])
    for job_id in ids.values():
        _plant(home / "jobs" / job_id)
    _booby_trap(home / "jobs" / ids["a1"], out)
    d = start_daemon(home, config="max_concurrent_jobs: 1\n" + POLICY, **SLOW)
    try:
        gone = [ids[k] for k in ("a1", "a2", "b2")]  # a3: the newest a; b1: failed, 5 < 10 days
        store = Store.open(home, check=False, readonly=True)
        wait_for("three removals", lambda: all(_removed(store, j) for j in gone), 60, interval=0.2)
        assert d.job(ids["r"])["state"] == "running" and d.job(ids["q"])["state"] == "queued"
        for key in ("a3", "b1", "r", "q"):
            assert len(_checkpoints_left(home / "jobs" / ids[key])) == 5, key
        for job_id in gone:
            run = home / "jobs" / job_id
            assert _checkpoints_left(run) == [] and store.checkpoints(job_id) == []
            for kept in ("history.csv", "events.jsonl", "weights.best.hdf5", "checkpoints/best.weights.h5"):
                assert (run / kept).exists(), (job_id, kept)
        assert _intact(out)
        assert store.job(ids["a1"]).state == JobState.SUCCEEDED and store.checkpoints(ids["a1"], True)
        journal = [json.loads(ln) for ln in d.output().splitlines() if ln.startswith("{")]
        logged = sorted(e["job_id"] for e in journal if e.get("event") == "retention.removed")
        assert logged == sorted(gone) and not [e for e in journal if e.get("event") == "retention.failed"]
        status = d.job(ids["a1"])
        assert status["retention"]["what"] == "checkpoints" and status["retention"]["files"] == 8
        assert describe(status["retention"]).startswith("checkpoints removed by retention at 20")
        store.close()
    finally:
        d.stop()


def _removed(store: Store, job_id: str) -> bool:
    return any(e["kind"] == "retention.removed" for e in store.events(job_id))

"""`ckptd report JOB` (ckptd.daemon.cli_report): a picture of a run.

The shaping is pure and checked point by point on made-up facts; the gathering on a real store
and events file; the drawing by parsing what it wrote. Then the command: from a local store,
from the service (fake workers: no TensorFlow), without matplotlib, and on a real killed run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from ckptd.daemon import cli_report as r
from ckptd.daemon.cli_report import AttemptRow, Facts
from ckptd.state.protocol import EVENTS_FILE, Event
from ckptd.state.states import AttemptClass
from ckptd.state.store import Store

from .conftest import ckptd_cmd, env_with, write_job
from .daemonproc import fake_job, start_daemon
from .procs import as_uid, finish, run_dir, start_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GOODPUT = {"ratio": 0.5, "wall": 14.0, "productive": 7.0, "startup": 5.0, "restart": 2.0, "other": 0.0}


def _ev(kind: str, attempt: int, ts: float, **fields: object) -> dict[str, object]:
    return {"event": str(kind), "attempt": attempt, "ts": ts, **fields}


# Attempt 1 spawned at 100, trained from 105, committed steps 10 and 20, was killed at 108 (its
# last heartbeat at step 25); attempt 2 spawned at 108.5, restored step 20, succeeded at 114.
EVENTS = (
    _ev(Event.RESTORE_FRESH, 1, 104.0, reason="no committed checkpoint"),
    _ev(Event.TRAINING_FIRST_STEP, 1, 105.0, step=1),
    _ev(Event.CHECKPOINT_COMMITTED, 1, 106.0, step=10),
    _ev(Event.CHECKPOINT_COMMITTED, 1, 107.0, step=20),
    _ev(Event.BEST_SAVED, 1, 107.5, path="w.hdf5"),  # not a step: not a point
    _ev(Event.RESTORE_DONE, 2, 110.0, step=20),
    _ev(Event.TRAINING_FIRST_STEP, 2, 111.0, step=21),
    _ev(Event.EPOCH_END, 2, 112.0, step=52),
    _ev(Event.CHECKPOINT_COMMITTED, 2, 113.0, step=52),
)
KILLED_THEN_SUCCEEDED = Facts(
    job_id="pima-1",
    state="succeeded",
    attempts=(
        AttemptRow(1, 100.0, 108.0, "killed", 25),
        AttemptRow(2, 108.5, 114.0, "succeeded", 52),
    ),
    commits=((106.0, 10), (107.0, 20), (113.0, 52)),
    events=EVENTS,
    goodput=GOODPUT,
    now=200.0,
)


def test_picture_has_a_line_per_attempt_its_end_commits_and_gaps() -> None:
    pic = r.picture(KILLED_THEN_SUCCEEDED)
    assert pic.title == "pima-1 — succeeded" and pic.origin == 100.0
    one, two = pic.lines
    assert one.points == ((4.0, 0), (5.0, 1), (6.0, 10), (7.0, 20))
    assert (one.label, one.end, one.end_step) == ("killed", 8.0, 25)  # past its last commit: heartbeats
    assert two.points == ((10.0, 20), (11.0, 21), (12.0, 52), (13.0, 52))
    assert (two.label, two.end, two.end_step) == ("succeeded", 14.0, 52)
    assert pic.commits == ((6.0, 10), (7.0, 20), (13.0, 52))
    assert pic.gaps == ((0.0, 5.0, "start-up"), (8.0, 8.5, "backoff"), (8.5, 11.0, "restart"))
    assert pic.parts == (("productive", 7.0), ("startup", 5.0), ("restart", 2.0), ("other", 0.0))
    assert pic.goodput_title.startswith("goodput 0.500: productive 7.0s of 14.0s")


def test_a_running_attempt_and_times_to_the_second() -> None:
    """The service's job report gives attempt times to the second: an end before the attempt's
    last event is moved to it. A running attempt has no end; its restart lasts until now while
    it has not trained."""
    facts = Facts(
        job_id="j",
        state="running",
        attempts=(AttemptRow(1, 100.0, 106.0, "crash", 3), AttemptRow(2, 108.0, None, None, None)),
        commits=(),
        events=EVENTS[:4],  # attempt 1's: its last, step 20 at 107
        goodput={"error": "goodput not accounted: StoreError: no job"},
        now=130.0,
    )
    pic = r.picture(facts)
    crashed, running = pic.lines
    assert (crashed.end, crashed.end_step) == (7.0, 20)
    assert (running.label, running.end, running.points) == ("running", None, ())
    assert pic.gaps == ((0.0, 5.0, "start-up"), (7.0, 8.0, "backoff"), (8.0, 30.0, "restart"))
    assert pic.goodput_title == "goodput not accounted: StoreError: no job" and pic.parts == ()


def _store_with_a_job(tmp_path: Path) -> tuple[Store, str]:
    """A store whose job had a killed attempt and a succeeded one, its run directory's events
    file with lines of every sort a worker's owner may leave there."""
    run = tmp_path / "run"
    run.mkdir()
    store = Store.open(tmp_path / "home")
    store.create_job("j-1", "pima", "{}", "d", "job.yaml", str(run))
    for n, (klass, last) in enumerate([(AttemptClass.KILLED, 25), (AttemptClass.SUCCEEDED, 52)], 1):
        assert store.start_attempt("j-1", pid=1000 + n) == n
        for step in (10, 20) if n == 1 else (52,):
            store.record_checkpoint("j-1", step, 0, f"ckpt-{step}", {}, "digest")
        store.end_attempt(
            "j-1",
            n,
            exit_code=None,
            signal=9,
            klass=klass,
            evidence="e",
            error_summary=None,
            restored_step=None if n == 1 else 20,
            last_step=last,
        )
    store.retire_checkpoints("j-1", [10])
    lines = [json.dumps(e) for e in EVENTS] + ["not json", '{"event": "epoch.end"']
    (run / EVENTS_FILE).write_text("\n".join(lines) + "\n")
    return store, "j-1"


def test_from_store_reads_rows_retired_commits_and_the_events_file(tmp_path: Path) -> None:
    store, job_id = _store_with_a_job(tmp_path)
    facts = r.from_store(store, job_id)
    assert [(a.n, a.klass, a.last_step) for a in facts.attempts] == [(1, "killed", 25), (2, "succeeded", 52)]
    assert all(a.ended is not None and a.ended >= a.started for a in facts.attempts)
    assert [s for _, s in facts.commits] == [10, 20, 52]  # the retired one too: it was committed
    assert [e["event"] for e in facts.events] == [
        str(e["event"]) for e in EVENTS if e["event"] != "best.saved"
    ]
    assert "error" in facts.goodput  # "{}" is no job spec: said, not raised


@pytest.mark.skipif(os.geteuid() != 0, reason="switches to another uid")
def test_a_run_directory_not_ours_is_refused_a_removed_one_is_not(tmp_path: Path) -> None:
    """Through the service an admin sees jobs whose files are not theirs: say so, rather than
    draw a run without steps. A run directory retention removed draws from the store alone."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    assert as_uid(65534, 65534, lambda: r._readable(private)) == {"ok": False}
    assert r._readable(private)  # its owner's
    assert r._readable(tmp_path / "removed") and r.series_events(tmp_path / "removed") == ()


def test_draw_writes_an_svg_with_its_words_and_a_png(tmp_path: Path) -> None:
    pic = r.picture(KILLED_THEN_SUCCEEDED)
    r.draw(pic, tmp_path / "a.svg")
    svg = (tmp_path / "a.svg").read_text()
    texts = ET.fromstring(svg).iter("{http://www.w3.org/2000/svg}text")  # well-formed XML, text kept
    words = "\n".join(t.text or "" for t in texts)
    for word in (
        "pima-1 — succeeded",
        "attempt 1 killed, last step 25",
        "attempt 2 succeeded",
        "goodput 0.500",
    ):
        assert word in words, word
    assert "backoff" in words and "restart" in words and "commit" in words
    r.draw(pic, tmp_path / "a.PNG")
    assert (tmp_path / "a.PNG").read_bytes().startswith(PNG_MAGIC)


def _report(home: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ckptd_cmd("report", *args), env=env_with(home), capture_output=True, text=True, timeout=120, cwd=cwd
    )


def test_the_command_on_a_local_store_and_its_refusals(tmp_path: Path) -> None:
    store, job_id = _store_with_a_job(tmp_path)
    store.close()  # the command opens its own
    home = tmp_path / "home"
    got = _report(home, job_id, cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    assert (
        got.stdout.strip() == "j-1-report.svg"
        and "attempt 1 killed" in (tmp_path / "j-1-report.svg").read_text()
    )
    bad = _report(home, job_id, "-o", str(tmp_path / "out.txt"))
    assert bad.returncode == 2 and "'-o'" in bad.stderr and "out.txt" in bad.stderr
    assert not (tmp_path / "out.txt").exists()
    unknown = _report(home, "no-such-job")
    assert unknown.returncode != 0 and unknown.stderr.splitlines() == [
        "ckptd: no job 'no-such-job' (see `ckptd status` for the list)"
    ]
    nowhere = _report(home, job_id, "-o", str(tmp_path / "missing" / "out.svg"))
    assert (
        nowhere.returncode == 1 and len(nowhere.stderr.splitlines()) == 1 and "cannot write" in nowhere.stderr
    )


def test_without_matplotlib_one_line_and_exit_2(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['matplotlib'] = None; "  # what an install without it finds
        "from ckptd.daemon.cli import cli; cli(['report', 'j-1'], prog_name='ckptd')"
    )
    got = subprocess.run(
        [sys.executable, "-c", code], env=env_with(tmp_path), capture_output=True, text=True, timeout=60
    )
    assert got.returncode == 2
    assert got.stderr.splitlines() == ["ckptd report needs matplotlib: pip install 'ckptd[report]'"]


def test_the_cli_and_the_daemon_never_import_matplotlib() -> None:
    code = (
        "import sys, ckptd.daemon.cli, ckptd.daemon.service; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))"
    )
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert got.stdout.strip() == "[]"


def test_report_of_a_service_job(tmp_path: Path) -> None:
    """Through the daemon's API (its fake workers: attempt 1 crashes at step 15), the events
    file read with our own rights."""
    d = start_daemon(tmp_path / "home", FAKE_STEPS="40", FAKE_STEP_SECONDS="0.02", FAKE_CRASH_AT="15")
    try:
        job = d.submit(fake_job(tmp_path))
        d.wait_state(job, "succeeded")
        got = _report(d.home, job, "-o", str(tmp_path / "svc.svg"))
    finally:
        d.stop()
    assert got.returncode == 0, got.stderr
    svg = (tmp_path / "svc.svg").read_text()
    ET.fromstring(svg)
    # The last step is the store's, from the last heartbeat seen: 39 or 40 as the box is loaded.
    for word in ("attempt 1 crash", "attempt 2 succeeded, last step", "goodput", "commit"):
        assert word in svg, word


@pytest.mark.tf
def test_report_of_a_real_killed_run(tmp_path: Path) -> None:
    home = tmp_path / "home"
    job = write_job(tmp_path, epochs=3, every_steps=10)
    rc, out = finish(start_run(home, str(job), faults="sigkill_at_step=25,attempt=1"))
    assert rc == 0, out
    job_id = run_dir(home).name
    svg_path, png_path = tmp_path / "out.svg", tmp_path / "out.png"
    got = _report(home, job_id, "-o", str(svg_path))
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == str(svg_path)
    svg = svg_path.read_text()
    ET.fromstring(svg)
    for word in (
        f"{job_id} — succeeded",
        "attempt 1 killed",
        "attempt 2 succeeded, last step 156",
        "goodput",
    ):
        assert word in svg, word
    got = _report(home, job_id, "-o", str(png_path))
    assert got.returncode == 0, got.stderr
    assert png_path.read_bytes().startswith(PNG_MAGIC)

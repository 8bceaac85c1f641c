"""`ckptd status` shows a running attempt live (step, last commit, silence) and calls it suspect
as soon as it is silent longer than is normal for its phase, long before the hang verdict."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from ckptd.state.jobspec import Restart
from ckptd.state.protocol import Heartbeat, Phase
from ckptd.supervisor.policy import suspect
from ckptd.worker.runtime import EXPECT_FLOOR, Beater

from .conftest import ckptd_cmd, env_with, write_job
from .daemonproc import start_daemon
from .procs import wait_for

R = Restart(heartbeat_timeout_seconds=120, startup_grace_seconds=600)


@pytest.mark.parametrize(
    "phase,silent,expect,want",
    [
        (Phase.TRAINING, 4.0, 5.0, False),  # within what the worker said is normal
        (Phase.TRAINING, 6.0, 5.0, True),
        (Phase.TRAINING, 29.0, None, False),  # no expectation: a quarter of the 120 s verdict
        (Phase.TRAINING, 31.0, None, True),
        (Phase.TRAINING, 119.0, 500.0, False),  # a slow step: the worker's own bound
        (Phase.TRAINING, 121.0, 500.0, True),  # never past the verdict's limit
        (Phase.SAVING, 140.0, None, False),  # saves get the start-up grace (600 s)
        (Phase.SAVING, 151.0, None, True),
        ("a-phase-from-a-newer-worker", 151.0, None, True),
    ],
)
def test_suspect(phase: str, silent: float, expect: float | None, want: bool) -> None:
    assert suspect(phase, silent, expect, R) is want


def test_the_heartbeat_says_what_is_normal_for_its_phase(tmp_path: Path) -> None:
    beater = Beater(tmp_path / "heartbeat.json", attempt=1, interval=0.0)
    beater.beat(Phase.TRAINING, force=True)
    assert Heartbeat.read(tmp_path / "heartbeat.json").expect_seconds is None  # type: ignore[union-attr]
    for _ in range(5):
        time.sleep(0.01)
        beater.beat(Phase.TRAINING, step=1)
    hb = Heartbeat.read(tmp_path / "heartbeat.json")
    assert hb is not None and hb.expect_seconds == EXPECT_FLOOR  # 10 x 10 ms is below the floor
    beater.beat(Phase.SAVING, force=True)  # a new phase: no basis yet
    hb = Heartbeat.read(tmp_path / "heartbeat.json")
    assert hb is not None and hb.expect_seconds is None


def _status(home: Path, job_id: str) -> dict[str, Any]:
    r = subprocess.run(
        ckptd_cmd("status", job_id, "--json"), env=env_with(home), capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def _live(home: Path, job_id: str, key: str) -> dict[str, Any] | None:
    s = _status(home, job_id)
    return s if s.get("live", {}).get(key) else None


def test_a_hung_worker_is_suspect_long_before_its_verdict(tmp_path: Path) -> None:
    job = write_job(tmp_path, name="hangs")
    job.write_text(job.read_text().replace("restart: {", "restart: {heartbeat_timeout_seconds: 40, "))
    home = tmp_path / "home"
    d = start_daemon(home, FAKE_STEPS="1000", FAKE_STEP_SECONDS="0.05", FAKE_HANG_AT="30")
    try:
        job_id = d.submit(job)
        moving = wait_for(
            "a live step", lambda: (s := _status(home, job_id)).get("live", {}).get("step") and s
        )
        live = moving["live"]
        assert live["phase"] == "training" and live["suspect"] is False and live["silent_seconds"] < 5
        assert live["hang_verdict_seconds"] == 40
        assert d.api("GET", "/v1/health")["suspect"] == []
        seen = wait_for(
            "suspect", lambda: (s := _status(home, job_id)).get("live", {}).get("suspect") and s, 60
        )
        live = seen["live"]
        # A quarter of the 40 s verdict (the fake worker gives no expectation of its own).
        assert seen["state"] == "running" and 10 <= live["silent_seconds"] < 40, live
        assert live["step"] == 29 and live["last_commit_step"] == 20, live
        assert d.api("GET", "/v1/health")["suspect"] == [job_id]
        text = subprocess.run(
            ckptd_cmd("status"), env=env_with(home), capture_output=True, text=True, timeout=60
        ).stdout
        assert "running suspect" in text, text
    finally:
        for a in _status(home, job_id)["attempt_list"]:  # hung: it would sit out the stop's grace
            if a["class"] is None:
                os.kill(a["pid"], signal.SIGKILL)
        d.stop()

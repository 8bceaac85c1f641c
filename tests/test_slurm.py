"""engine slurm on a one-host Slurm: the gang is one srun step; member 1 SIGKILLed, srun ends
the step (--kill-on-bad-exit), the supervisor names member 1 from srun's report and restarts
the gang, which ends tensor for tensor where an uninterrupted Slurm gang ends.

Slurm is installed (apt, slurm-wlm) and started here by the fixture where the tests run as
root; otherwise they are skipped with the reason. An already running Slurm is used as it is."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import ROOT
from .procs import final_state_hash, finish, run_dir, start_run, status

pytestmark = [pytest.mark.tf, pytest.mark.conformance]
PROGRAM = ROOT / "tests" / "programs" / "mirrored.py"


def _up(env: dict[str, str]) -> bool:
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and any(s in r.stdout for s in ("idle", "mixed", "allocated"))


def _install() -> str | None:
    if shutil.which("srun"):
        return None
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "install", "-y", "-qq", "slurm-wlm"], ["apt-get", "update", "-qq"]):
        if subprocess.run(cmd, env=env, capture_output=True, timeout=900).returncode == 0 and shutil.which(
            "srun"
        ):
            return None
    r = subprocess.run(
        ["apt-get", "install", "-y", "-qq", "slurm-wlm"], env=env, capture_output=True, timeout=900
    )
    return None if r.returncode == 0 else f"apt-get install slurm-wlm failed: {r.stderr.decode()[-300:]}"


def _start(tmp: Path) -> dict[str, str]:
    """A one-host Slurm of our own: config, state and pid files in `tmp`."""
    host = socket.gethostname().split(".")[0]
    for d in ("ctld", "d", "log"):
        (tmp / d).mkdir(parents=True, exist_ok=True)
    conf = tmp / "slurm.conf"
    conf.write_text(
        f"ClusterName=ckptdtest\nSlurmctldHost={host}\nAuthType=auth/munge\n"
        "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nSwitchType=switch/none\n"
        "MpiDefault=none\nSlurmUser=root\nSlurmdUser=root\nReturnToService=2\n"
        f"StateSaveLocation={tmp}/ctld\nSlurmdSpoolDir={tmp}/d\n"
        f"SlurmctldPidFile={tmp}/ctld.pid\nSlurmdPidFile={tmp}/d.pid\n"
        f"SlurmctldLogFile={tmp}/log/ctld.log\nSlurmdLogFile={tmp}/log/d.log\n"
        "SchedulerType=sched/builtin\nSelectType=select/cons_tres\nSelectTypeParameters=CR_Core\n"
        f"NodeName={host} CPUs={os.cpu_count() or 1} State=UNKNOWN\n"
        f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES\n"
    )
    env = dict(os.environ, SLURM_CONF=str(conf))
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["munged", "--force"], capture_output=True, timeout=30)
    subprocess.run(["slurmctld", "-f", str(conf)], env=env, capture_output=True, timeout=60)
    subprocess.run(["slurmd", "-f", str(conf)], env=env, capture_output=True, timeout=60)
    return env


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.skip("needs root to install and start a one-host Slurm")
    if (why := _install()) is not None:
        pytest.skip(why)
    before = os.environ.get("SLURM_CONF")
    ours = None
    if not _up(dict(os.environ)):
        ours = tmp_path_factory.mktemp("slurm")
        env = _start(ours)
        deadline = time.monotonic() + 120
        while not _up(env) and time.monotonic() < deadline:
            time.sleep(0.5)
        if not _up(env):
            pytest.skip(f"a one-host Slurm did not come up (logs in {ours / 'log'})")
        os.environ["SLURM_CONF"] = env["SLURM_CONF"]
    yield
    if ours is not None:
        for pidfile in ("d.pid", "ctld.pid"):
            pid = (ours / pidfile).read_text().strip() if (ours / pidfile).exists() else ""
            if pid:
                subprocess.run(["kill", pid], capture_output=True)
        if before is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = before


def _job(tmp: Path) -> Path:
    job = tmp / "slurm-gang.yaml"
    job.write_text(
        f"name: slurm-gang\nentrypoint: {PROGRAM}\n"
        "distribute: {strategy: multi_worker, nodes: 2, engine: slurm}\n"
        "checkpoint: {every_steps: 10}\n"
        "restart: {max_restarts: 3, backoff_initial_seconds: 0.1, backoff_max_seconds: 0.5}\n"
    )
    return job


@pytest.mark.usefixtures("slurm")
def test_a_member_sigkill_through_slurm_restarts_the_gang_bit_identical(tmp_path: Path) -> None:
    job = _job(tmp_path)
    rc, out = finish(start_run(tmp_path / "clean", str(job)))
    assert rc == 0, out
    home = tmp_path / "killed"
    rc, out = finish(start_run(home, str(job), faults="sigkill_at_step=27,attempt=1,member=1"))
    assert rc == 0, out
    killed = run_dir(home)
    attempts = status(home, killed.name)["attempt_list"]
    assert [a["class"] for a in attempts] == ["killed", "succeeded"], attempts
    assert "gang member 1" in attempts[0]["evidence"]
    assert [(m["member"], m["exit_class"], m["root_cause"]) for m in attempts[0]["members"]] == [
        (0, "peer_lost", False),
        (1, "killed", True),
    ]
    assert "task 1: Killed" in (killed / "attempts" / "0001" / "srun.log").read_text()
    assert final_state_hash(killed) == final_state_hash(run_dir(tmp_path / "clean"))

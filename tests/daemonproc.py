"""A real `ckptd daemon` process for tests, with the protocol-speaking fake worker by default."""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptd.daemon.client import Client
from ckptd.state.jobfile import load_job_file
from ckptd.state.jobspec import spec_json

from .conftest import ckptd_cmd, env_with, write_job
from .procs import wait_for

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class DaemonProc:
    home: Path
    proc: subprocess.Popen[str]
    log: Path
    sock: Path

    @property
    def client(self) -> Client:
        return Client(self.sock, timeout=10)

    def api(self, method: str, url: str, body: dict[str, Any] | None = None) -> Any:
        return self.client.call(method, url, body)

    def submit(self, job: Path, priority: int = 0, key: str | None = None) -> str:
        spec, raw = load_job_file(job)
        body = {
            "spec_json": spec_json(spec),
            "job_file": str(job),
            "raw": raw.decode(),
            "priority": priority,
            "key": key,
        }
        return str(self.api("POST", "/v1/jobs", body)["job"]["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.api("GET", f"/v1/jobs/{job_id}"))

    def wait_state(self, job_id: str, *states: str, timeout: float = 60) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            j = self.job(job_id)
            return j if j["state"] in states else None

        return wait_for(f"job {job_id} in {states}", probe, timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.log.read_text()


def daemon_env(home: Path, fake: bool = True, **extra: str) -> dict[str, str]:
    env = env_with(home)
    env.pop("NOTIFY_SOCKET", None)
    if fake:
        env["CKPTD_WORKER_MODULE"] = "tests.fakeworker"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def start_daemon(
    home: Path,
    fake: bool = True,
    config: str | None = None,
    sock: Path | None = None,
    python: str | None = None,
    wrap: list[str] | None = None,
    **extra: str,
) -> DaemonProc:
    """`python`: the interpreter (tests/test_trust.py: one every test user may run); `wrap`: a
    command that execs the daemon's command line given as its arguments."""
    home.mkdir(parents=True, exist_ok=True)
    if sock is not None:
        config = (config or "") + f"socket: {sock}\n"
    if config is not None:
        (home / "daemon.yaml").write_text(config)
    log = home / f"daemon-{len(list(home.glob('daemon-*.log')))}.log"
    with open(log, "w") as out:
        cmd = ckptd_cmd("daemon") if python is None else [python, "-m", "ckptd.daemon", "daemon"]
        cmd = (wrap or []) + cmd
        proc = subprocess.Popen(
            cmd,
            env=daemon_env(home, fake, **extra),
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    d = DaemonProc(home, proc, log, sock or home / "ckptd.sock")
    wait_for("the daemon to answer", lambda: proc.poll() is not None or d.client.available(), 60)
    assert proc.poll() is None, log.read_text()
    return d


def fake_job(directory: Path, name: str = "fake") -> Path:
    return write_job(directory, name=name, epochs=1)

"""Prometheus metrics (`--metrics-address`): the address's grammar, and real scrapes of the daemon
(with the fake worker) and of `ckptd run` (a real training), parsed with prometheus-client's own
parser, moving as the job trains."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ckptd.daemon.metrics import MetricsAddressError, parse_address

from .conftest import ckptd_cmd, env_with, write_job
from .daemonproc import fake_job, start_daemon
from .procs import start_run, wait_for


@pytest.mark.parametrize(
    "text,want",
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        (":9464", ("0.0.0.0", 9464)),
        ("[::1]:0", ("::1", 0)),
        ("localhost:65535", ("localhost", 65535)),
    ],
)
def test_addresses(text: str, want: tuple[str, int]) -> None:
    assert parse_address(text) == want


@pytest.mark.parametrize("text", ["9464", "host:", "host:port", "host:65536", "", "::1"])
def test_bad_addresses_name_the_option(text: str) -> None:
    with pytest.raises(MetricsAddressError, match="--metrics-address"):
        parse_address(text)


def _address(log: str) -> str | None:
    for line in log.splitlines():
        if '"metrics.serving"' in line:
            return str(json.loads(line)["address"])
    return None


Scrape = dict[str, list[tuple[dict[str, str], float]]]


def scrape(address: str) -> Scrape:
    """{sample name: [(labels, value)]}, through the Prometheus client's parser."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def scrape_when(what: str, address: str, ok: Callable[[Scrape], bool], timeout: float = 120) -> Scrape:
    def probe() -> Scrape | None:
        m = scrape(address)
        return m if ok(m) else None

    return wait_for(what, probe, timeout)


def _value(m: Scrape, metric: str, **labels: str) -> float | None:
    for got, value in m.get(metric, []):
        if labels.items() <= got.items():
            return value
    return None


def test_the_daemons_scrape_moves_as_a_job_trains(tmp_path: Path) -> None:
    d = start_daemon(
        tmp_path / "home", config="metrics_address: 127.0.0.1:0\n", FAKE_STEPS="400", FAKE_STEP_SECONDS="0.05"
    )
    try:
        address = wait_for("metrics.serving", lambda: _address(d.output()))
        job_id = d.submit(fake_job(tmp_path))
        first = scrape_when("a step", address, lambda m: _value(m, "ckptd_job_step", job=job_id) is not None)
        step = _value(first, "ckptd_job_step", job=job_id) or 0
        later = scrape_when(
            "the step to move", address, lambda m: (_value(m, "ckptd_job_step", job=job_id) or 0) > step
        )
        assert _value(later, "ckptd_jobs", state="running") == 1
        assert _value(later, "ckptd_job_state", job=job_id, name="fake", state="running") == 1
        assert (_value(later, "ckptd_job_heartbeat_age_seconds", job=job_id) or -1) >= 0
        assert _value(later, "ckptd_queue_length") == 0
        assert (_value(later, "process_resident_memory_bytes") or 0) > 0  # the daemon's own
        labels = {k for series in later.values() for got, _ in series for k in got}
        assert labels <= {"job", "name", "user", "state", "class", "part"}, labels  # no paths, no params
        ratio = _value(later, "ckptd_job_goodput_ratio", job=job_id)
        parts = [v for got, v in later["ckptd_job_time_seconds"] if got["job"] == job_id]
        assert ratio is not None and 0 <= ratio <= 1 and len(parts) >= 5 and sum(parts) > 0
        d.api("POST", f"/v1/jobs/{job_id}/cancel")
        d.wait_state(job_id, "cancelled")
        done = scrape(address)
        assert _value(done, "ckptd_job_step", job=job_id) is None  # only live jobs have series
        assert _value(done, "ckptd_jobs", state="cancelled") == 1
    finally:
        d.stop()


def test_a_bad_address_is_refused_before_anything_runs(tmp_path: Path) -> None:
    job = write_job(tmp_path)
    r = subprocess.run(
        ckptd_cmd("run", "--metrics-address", "nowhere", str(job)),
        env=env_with(tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "--metrics-address" in r.stderr, r.stderr
    assert not (tmp_path / "home" / "jobs").exists()


@pytest.mark.tf
def test_a_runs_scrape_follows_a_real_training(tmp_path: Path) -> None:
    home = tmp_path / "home"
    job = write_job(tmp_path, epochs=3, every_steps=10)
    proc = start_run(home, "--metrics-address", "127.0.0.1:0", str(job), faults="step_delay=0.05")
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        while (address := _address("\n".join(lines))) is None:
            lines.append(proc.stdout.readline())
            assert lines[-1], "ckptd run ended before serving metrics: " + "".join(lines)
        m = scrape_when(
            "two commits", address, lambda m: (_value(m, "ckptd_job_last_commit_step") or 0) >= 20
        )
        assert (_value(m, "ckptd_job_checkpoint_saves_total") or 0) >= 2
        assert (_value(m, "ckptd_job_checkpoint_bytes") or 0) > 0
        assert (_value(m, "ckptd_job_worker_rss_bytes") or 0) > 100 * 2**20  # TensorFlow's
        rate = wait_for("a step rate", lambda: _value(scrape(address), "ckptd_job_steps_per_second"))
        assert 0 < rate < 1000
    finally:
        proc.communicate(timeout=300)
    assert proc.returncode == 0


def test_the_daemons_settings_and_option_refuse_a_bad_address(tmp_path: Path) -> None:
    from ckptd.daemon.config import load_config
    from ckptd.state.yamlstrict import JobFileError

    (tmp_path / "daemon.yaml").write_text("metrics_address: everywhere\n")
    with pytest.raises(JobFileError) as e:
        load_config(None, tmp_path)
    assert "metrics_address" in e.value.problems[0] and "HOST:PORT" in e.value.problems[0]
    r = subprocess.run(
        ckptd_cmd("daemon", "--metrics-address", "[::1]"),
        env=env_with(tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "--metrics-address" in r.stderr, r.stderr

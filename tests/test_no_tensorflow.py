"""The daemon side never imports TensorFlow (5 s and 0.5 GB that a supervisor must not pay)."""

import subprocess
import sys

from .conftest import slow

DAEMON_SIDE = [
    "ckptd.daemon.cli",
    "ckptd.daemon.jobs",
    "ckptd.daemon.report",
    "ckptd.daemon.logs",
    "ckptd.supervisor.policy",
    "ckptd.supervisor.runner",
    "ckptd.supervisor.process",
    "ckptd.supervisor.display",
    "ckptd.state.store",
    "ckptd.state.jobspec",
    "ckptd.state.protocol",
    "ckptd.state.durable",
    "ckptd.state.retention",
    "ckptd.daemon.service",
    "ckptd.daemon.api",
    "ckptd.daemon.backend",
    "ckptd.daemon.spool",
    "ckptd.daemon.recovery",
    "ckptd.daemon.running",
    "ckptd.daemon.client",
    "ckptd.daemon.cli_service",
    "ckptd.state.submissions",
]


def test_daemon_side_does_not_import_tensorflow() -> None:
    code = (
        f"import sys\nfor m in {DAEMON_SIDE!r}: __import__(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras'))\n"
        "print(','.join(bad))\nsys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=slow(60))
    assert r.returncode == 0, f"daemon side imported: {r.stdout} {r.stderr}"


def test_worker_side_does_import_tensorflow() -> None:
    """Control: the check above can fail."""
    code = "import sys, ckptd.worker.fit.loop; sys.exit(0 if 'tensorflow' in sys.modules else 1)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=slow(120))
    assert r.returncode == 0

"""ruff and mypy (strict) over the installed packages, as part of the suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .conftest import ROOT

PACKAGES = ("daemon", "supervisor", "state", "worker")


def test_ruff() -> None:
    r = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_strict(tmp_path: Path) -> None:
    # mypy does not follow setuptools' package-dir mapping: give it the installed layout.
    ns = tmp_path / "ckptd"
    ns.mkdir()
    for name in PACKAGES:
        (ns / name).symlink_to(ROOT / name)
    r = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
                        "--namespace-packages", "--explicit-package-bases", "--cache-dir",
                        str(tmp_path / ".mypy_cache"), "-p", "ckptd"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr

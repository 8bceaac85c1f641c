"""ruff and mypy (strict) over the installed packages, as part of the suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

PACKAGES = ("daemon", "supervisor", "state", "worker")


def test_ruff() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_format() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One fresh cache for both mypy runs: bench/ imports ckptd, which the second run then reads
    from the first one's cache instead of checking it again (a cache never changes a verdict)."""
    return tmp_path_factory.mktemp("mypy") / ".mypy_cache"


def test_mypy_strict(mypy_cache: Path) -> None:
    """From the plain checkout, as an editor or CI would run it: `ckptd/` is a real package."""
    r = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(mypy_cache), "-p", "ckptd"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no issues found in" in r.stdout and int(r.stdout.split(" in ")[1].split()[0]) > 70


def test_mypy_benchmarks(mypy_cache: Path) -> None:
    """The benchmarks use the worker's public hooks; a renamed hook must fail here, not in the
    next person's benchmark run."""
    r = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(mypy_cache), "bench"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_checkout_is_the_package() -> None:
    """With nothing on the path but the checkout (no site-packages, so no install hook), the
    `ckptd.*` names resolve through `ckptd/`'s symlinks to the card's top-level folders."""
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); import ckptd.worker.faults as f, "
        "ckptd.state.states as s; print(f.__file__, s.__file__)"
    )
    r = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [
        str(ROOT / "ckptd" / "worker" / "faults.py"),
        str(ROOT / "ckptd" / "state" / "states.py"),
    ]
    for name in PACKAGES:
        assert (ROOT / "ckptd" / name).resolve() == ROOT / name

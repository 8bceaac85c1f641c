"""Every path the CLI reads, tried as an ordinary user (nobody) whose rights stop somewhere on
the way: one line naming the path and the problem, exit code 2, never a traceback (issue 25)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import CSV, EXAMPLE

NOBODY = 65534

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv to act as nobody"
)


def _as_nobody(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            sys.executable,
            "-m",
            "ckptd.daemon",
            "--home",
            str(cwd / "home"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**os.environ, "HOME": str(cwd)},
    )


def _job(path: Path, extra: str) -> Path:
    path.write_text(
        f"name: j\nmodel: {EXAMPLE / 'model.py'}:build\nparams: {{csv: {CSV}}}\ntrain: {{epochs: 1}}\n{extra}"
    )
    path.chmod(0o644)
    return path


@pytest.fixture
def place(tmp_path: Path) -> Path:
    """A world-searchable directory with a root-only one (0700) inside it."""
    tmp_path.chmod(0o755)
    for parent in tmp_path.parents:  # pytest's base directories are 0700
        if parent == Path("/tmp"):
            break
        parent.chmod(parent.stat().st_mode | 0o005)
    (tmp_path / "private").mkdir(mode=0o700)
    (tmp_path / "home").mkdir()
    (tmp_path / "home").chmod(0o777)  # nobody's state directory for `run`
    return tmp_path


@pytest.mark.parametrize(
    ("what", "expect"),
    [
        ("private/job.yaml", "cannot read: Permission denied"),
        ("private", "is a directory"),
        ("fifo.yaml", "not a regular file"),
        ("dangling.yaml", "does not exist"),
        ("ck.yaml", "checkpoint.dir: {place}/private/ck is not writable by you"),
        ("best.yaml", "best.filepath: {place}/private/x is not writable by you"),
    ],
)
@pytest.mark.parametrize("command", ["validate", "run", "submit"])
def test_an_unreachable_path_is_one_line_and_exit_2(
    place: Path, what: str, expect: str, command: str
) -> None:
    _job(place / "private" / "job.yaml", "")
    os.mkfifo(place / "fifo.yaml")
    (place / "dangling.yaml").symlink_to(place / "nowhere.yaml")
    _job(place / "ck.yaml", f"checkpoint: {{dir: {place}/private/ck}}\n")
    _job(place / "best.yaml", f"best: {{filepath: {place}/private/x/best.hdf5}}\n")
    r = _as_nobody(command, str(place / what), cwd=place)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expect.format(place=place) in lines[0], r.stderr

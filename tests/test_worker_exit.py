"""The worker's exit without the interpreter's teardown (ckptd.worker.__main__.exit_now) keeps
what a normal exit promises: the exit code, atexit handlers, flushed stdio, and a wait for a
program's own non-daemon thread."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def _run(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "prog.py"
    head = "import atexit, sys, threading, time\nfrom ckptd.worker.__main__ import exit_now\n"
    script.write_text(head + body)
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("code", [0, 3, 75])
def test_the_code_atexit_handlers_and_buffered_output_survive(tmp_path: Path, code: int) -> None:
    mark = tmp_path / "atexit-ran"
    r = _run(
        tmp_path,
        f"atexit.register(lambda: open({str(mark)!r}, 'w').write('ran'))\n"
        "sys.stdout.write('unflushed line')\n"  # no newline, no flush: still in the buffer
        f"exit_now({code})\n",
    )
    assert r.returncode == code, r.stderr
    assert mark.read_text() == "ran"
    assert r.stdout == "unflushed line"


def test_a_programs_non_daemon_thread_is_waited_for(tmp_path: Path) -> None:
    mark = tmp_path / "thread-done"
    r = _run(
        tmp_path,
        f"def work():\n    time.sleep(0.5)\n    open({str(mark)!r}, 'w').write('done')\n"
        "threading.Thread(target=work).start()\n"
        "exit_now(0)\n",
    )
    assert r.returncode == 0, r.stderr
    assert mark.read_text() == "done"  # os._exit would have cut the thread short

"""`ckptd validate --build`: set a job up in a worker process, as a run would, and report.

The worker imports the job's code, builds the model and its data, primes it on the first batch
and inspects what it found (ckptd.worker.fit.exactness), then stops before touching a checkpoint.
So a user learns before a long run whether the program runs under ckptd at all, and every reason
a resumed run of it might not be bit-identical. This process never imports TensorFlow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ckptd.state.durable import atomic_write_text
from ckptd.state.jobspec import JobSpec, spec_json
from ckptd.state.paths import RunDir
from ckptd.state.protocol import CHECK_ENV, CHECK_PREFIX, ERROR_FILE


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    inexact: list[str]  # causes, when ok
    error: str | None = None  # why the set-up failed, when not ok


def _failure(run: RunDir, r: subprocess.CompletedProcess[str]) -> str:
    try:
        record = json.loads((run.root / "attempts" / "0000" / ERROR_FILE).read_text())
        return str(record["message"])
    except (OSError, ValueError, KeyError):
        tail = (r.stderr or "").strip().splitlines()[-3:]
        return f"the worker exited with {r.returncode}: " + " | ".join(tail)


def build_check(spec: JobSpec, timeout: float = 900.0) -> CheckResult:
    with tempfile.TemporaryDirectory(prefix="ckptd-check-") as tmp:
        run = RunDir(Path(tmp))
        atomic_write_text(run.spec_file, spec_json(spec))
        env = {**os.environ, CHECK_ENV: "1"}
        try:
            r = subprocess.run(
                [sys.executable, "-m", "ckptd.worker", tmp, "0"],
                cwd=tmp,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return CheckResult(False, [], f"the set-up did not finish within {timeout:.0f} s")
        for line in r.stdout.splitlines():
            if line.startswith(CHECK_PREFIX):
                return CheckResult(True, list(json.loads(line[len(CHECK_PREFIX) :])["inexact"]))
        return CheckResult(False, [], _failure(run, r))

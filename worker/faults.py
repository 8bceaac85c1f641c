"""Test-only fault injection, read from the environment variable CKPTD_FAULTS.

Format: comma-separated `key=value`: `step_delay=SECONDS` (sleep after every step, to make a tiny
model slow enough to hit mid-interval), `sigkill_at_step=N` and `raise_at_step=N` (SIGKILL itself,
or raise RuntimeError, once step N is done), `attempt=K` (apply the kill/raise only in attempt K).
Never set it in production: it exists so every failure class is testable on a machine without a GPU.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Faults:
    step_delay: float = 0.0
    sigkill_at_step: int | None = None
    raise_at_step: int | None = None
    attempt: int | None = None

    @classmethod
    def from_env(cls) -> Faults:
        spec = os.environ.get("CKPTD_FAULTS", "")
        kw: dict[str, float | int] = {}
        for item in filter(None, spec.split(",")):
            key, _, value = item.partition("=")
            kw[key.strip()] = float(value) if key.strip() == "step_delay" else int(value)
        return cls(**kw)  # type: ignore[arg-type]

    def after_step(self, step: int, attempt: int) -> None:
        if self.step_delay:
            time.sleep(self.step_delay)
        if self.attempt is not None and attempt != self.attempt:
            return
        if step == self.sigkill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == self.raise_at_step:
            raise RuntimeError(f"injected fault at step {step}")

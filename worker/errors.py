"""The errors that end a worker, each with the exit code it ends with (ckptd.state.protocol).

A leaf module: it imports nothing from ckptd.worker and no TensorFlow, so every worker module
(and the writer process, before its TensorFlow import) can raise and catch these without an
import cycle. Whether an exit is retried is not decided here but read from
ckptd.state.protocol.NOT_RETRIED, the table the supervisor's restart policy reads as well.

Stops that are not failures (Preempted, SpareReleased, CheckDone) and NonFinite are
BaseExceptions: a user script's `except Exception` around ckptd.fit must not swallow them and
train on.
"""

from __future__ import annotations

from typing import ClassVar

from ckptd.state import protocol as p


class WorkerEnd(BaseException):
    """Ends the worker with `exit_code`. `recorded`: an error, written to the attempt's error
    file and stderr for the supervisor to classify; else a stop as asked, said by the code alone."""

    exit_code: ClassVar[int] = p.EXIT_CRASH
    recorded: ClassVar[bool] = True

    @property
    def retried(self) -> bool:
        return self.exit_code not in p.NOT_RETRIED

    @property
    def context(self) -> dict[str, int]:
        """What the error file records besides the message (the supervisor reads it)."""
        return {}


class Preempted(WorkerEnd):
    """Stopped on SIGTERM/SIGINT after saving: 0 steps lost."""

    exit_code = p.EXIT_PREEMPTED
    recorded = False


class SpareReleased(WorkerEnd):
    """A hot spare told to exit while the script waited in its fit call."""

    exit_code = p.EXIT_OK
    recorded = False


class CheckDone(WorkerEnd):
    """The set-up of a check run is complete; `causes` says what would make resume inexact."""

    exit_code = p.EXIT_OK
    recorded = False

    def __init__(self, causes: list[str]) -> None:
        super().__init__("check done")
        self.causes = causes


class NonFinite(WorkerEnd):
    """The loss or the weights became NaN/inf: never committed (it would rotate finite
    checkpoints away); the attempt ends nan_loss."""

    exit_code = p.EXIT_NONFINITE

    def __init__(self, step: int, what: str) -> None:
        super().__init__(f"{what} at step {step}; the last finite commit is kept")
        self.step = step

    @property
    def context(self) -> dict[str, int]:
        return {"step": self.step}


class ConfigError(WorkerEnd, Exception):
    """The job cannot run as configured (not retried). An Exception too: the set-up code wraps
    the program's own errors into one and re-raises it past `except Exception` handlers."""

    exit_code = p.EXIT_CONFIG


class DirLocked(WorkerEnd, Exception):
    """Another worker holds the checkpoint directory."""

    exit_code = p.EXIT_LOCKED


class NoValidCheckpoint(WorkerEnd, Exception):
    """Committed checkpoints exist but none is restorable: a restart from step 0 is refused."""

    exit_code = p.EXIT_NO_VALID_CHECKPOINT


# Not WorkerEnds: these end the attempt as crashes (exit status 1, the traceback on stderr); the
# supervisor classifies them from the error file's message (disk_full for ENOSPC, …).


class SaveFailed(Exception):
    """A checkpoint could not be committed; the previous commit is intact."""


class Fenced(Exception):
    """A newer attempt of the job has committed: this worker belongs to a stale gang (its
    supervisor was lost and a new gang started) and must not commit or go on."""

"""`ckptd drain` / `ckptd undrain`: the service's maintenance mode (an upgrade, a reboot, a disk
swap).

Drained, the daemon starts no job; submissions still queue. Running jobs either save and stop,
going back to the queue in their order, or run to their end, as the operator asked. The state is
a file in the state directory written durably, so a drained daemon restarted for an upgrade stays
drained until `ckptd undrain`.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from structlog.typing import FilteringBoundLogger

from ckptd.daemon.running import RunningJob, ask_stop
from ckptd.state.durable import atomic_write_text, fsync_dir
from ckptd.state.states import JobState
from ckptd.state.store import Store

DRAIN_FILE = "drain.json"
MODES = ("stop", "finish")  # what running jobs do: save and stop (requeued), or run to their end


@dataclass(frozen=True)
class Drain:
    since: float
    running: str  # one of MODES
    by: str


def read(home: Path) -> Drain | None:
    try:
        return Drain(**json.loads((home / DRAIN_FILE).read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):  # unreadable: drained (the safe side), stop mode
        return Drain(0.0, "stop", "an unreadable drain.json")


class Drainer:
    """The daemon's drain state: read at start, changed by the API, looked at by the main loop."""

    def __init__(self, home: Path, log: FilteringBoundLogger) -> None:
        self.home, self.log = home, log
        self.state = read(home)
        self.lock = threading.Lock()

    @property
    def active(self) -> bool:
        return self.state is not None

    def drain(self, running: str, by: str, jobs: list[RunningJob]) -> dict[str, Any]:
        """Persist first, then act: a crash in between leaves the daemon drained, never not."""
        if running not in MODES:
            raise ValueError(f"running: {running!r}; one of {', '.join(MODES)}")
        with self.lock:
            self.state = Drain(time.time(), running, by)
            atomic_write_text(self.home / DRAIN_FILE, json.dumps(asdict(self.state)), mode=0o644)
        stopping = []
        if running == "stop":
            for rj in jobs:
                if rj.end is None:
                    rj.drained = True
                    ask_stop(rj, cancel=False, by=f"drain ({by})")
                    stopping.append(rj.job_id)
        self.log.info("daemon.drained", running=running, by=by, stopping=stopping)
        return {"drain": asdict(self.state), "stopping": stopping, "running": [rj.job_id for rj in jobs]}

    def undrain(self, by: str) -> dict[str, Any]:
        with self.lock:
            was, self.state = self.state, None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.home / DRAIN_FILE)
                fsync_dir(self.home)
        self.log.info("daemon.undrained", by=by, was=asdict(was) if was else None)
        return {"drain": None, "was": asdict(was) if was else None}

    def requeue(self, store: Store, rj: RunningJob) -> None:
        """A job that drain stopped goes back to the queue (it starts again after undrain)."""
        if rj.drained and store.job(rj.job_id).state == JobState.INTERRUPTED:
            store.transition(rj.job_id, JobState.QUEUED, "drained: starts again after `ckptd undrain`")
            self.log.info("job.requeued", job_id=rj.job_id, reason="drained")

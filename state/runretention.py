"""Which finished jobs lose their checkpoints or their run directory: pure, so it is table-tested.

`finished_retention:` in daemon.yaml (ckptd.daemon.config) is the policy; the daemon applies it
(ckptd.daemon.retention_runs). Not to be confused with ckptd.state.retention, which rotates the
checkpoints of one job while it trains (`checkpoint.max_to_keep`).

A job is a candidate once it is finished: succeeded, cancelled, or failed (a daemon never resumes
a failed job on its own; `ckptd run --resume` could, from the checkpoints this removes, so failed
jobs get their own `keep_days_failed`). Queued, running, backoff and interrupted jobs may still
run and are never candidates. Its end is the store's `updated_at`: nothing changes a finished
job's row after its last transition.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ckptd.state.ckptfiles import FILE_RE, MANIFEST_RE, QUARANTINE, RESTORE_MARKER, TEMP_DIR_RE
from ckptd.state.states import TERMINAL, JobState

What = Literal["checkpoints", "run_dir"]
FINISHED: frozenset[JobState] = TERMINAL | {JobState.FAILED}
DAY = 86400.0
# What checkpointing writes in a checkpoint directory besides ckpt-N files and manifests: TF's
# state file and its temporaries, the restore marker, quarantined commits, the async writer's
# probe. Anything else there (a best file the job put beside its checkpoints) stays.
_OTHER_ENTRIES = re.compile(
    rf"^(checkpoint|checkpoint\.tmp.*|\.checkpoint\..*|.*\.tempstate.*|{re.escape(QUARANTINE)}"
    rf"|{re.escape(RESTORE_MARKER)}|\.graph-probe)$"
)


class FinishedRetention(BaseModel):
    """daemon.yaml `finished_retention:`; absent, nothing is ever removed."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    # Days after its end that a finished job keeps everything. Required: no silent default.
    keep_days: float = Field(ge=0, le=36500, allow_inf_nan=False)
    # The same for failed jobs (they are the ones someone may want to resume); default keep_days.
    keep_days_failed: float | None = Field(default=None, ge=0, le=36500, allow_inf_nan=False)
    # The newest N finished jobs of each name and owner keep everything, however old.
    keep_last_per_name: int = Field(default=3, ge=0, le=100_000)
    # checkpoints: the checkpoint files only (history.csv, events.jsonl, best weights, logs and the
    # job file stay); run_dir: the whole run directory. The store's row stays either way.
    remove: What = "checkpoints"
    # Log what would be removed, remove nothing.
    dry_run: bool = False

    def days_for(self, state: JobState) -> float:
        if state == JobState.FAILED and self.keep_days_failed is not None:
            return self.keep_days_failed
        return self.keep_days


@dataclass(frozen=True)
class Finished:
    """What the decision needs of one job (ckptd.daemon.retention_runs.finished_jobs reads it)."""

    id: str
    name: str
    owner_uid: int | None  # None: a job of `ckptd run`, not submitted to the daemon
    state: JobState
    ended_at: float
    removed: frozenset[str] = frozenset()  # what retention already removed (its events)


def expired(jobs: Iterable[Finished], policy: FinishedRetention, now: float) -> list[tuple[str, What]]:
    """(job id, what to remove), oldest end first: every finished job older than its keep_days
    that is not among the newest `keep_last_per_name` finished jobs of its name and owner, and
    whose `what` (or more) retention has not removed already."""
    groups: dict[tuple[int | None, str], list[Finished]] = {}
    for job in jobs:
        if job.state in FINISHED:
            groups.setdefault((job.owner_uid, job.name), []).append(job)
    out: list[Finished] = []
    for members in groups.values():
        members.sort(key=lambda j: (j.ended_at, j.id), reverse=True)
        for job in members[policy.keep_last_per_name :]:
            if now - job.ended_at > policy.days_for(job.state) * DAY and not _done(job, policy.remove):
                out.append(job)
    return [(j.id, policy.remove) for j in sorted(out, key=lambda j: (j.ended_at, j.id))]


def _done(job: Finished, what: What) -> bool:
    # Removing the run directory removes its checkpoints too; the reverse is not so.
    return "run_dir" in job.removed or what in job.removed


def is_checkpoint_entry(name: str) -> bool:
    """Whether `name`, in a job's checkpoint directory, is something checkpointing wrote."""
    return bool(FILE_RE.match(name) or MANIFEST_RE.match(name) or TEMP_DIR_RE.match(name)) or bool(
        _OTHER_ENTRIES.match(name)
    )


def describe_removal(event: dict[str, Any]) -> str:
    """One line of `ckptd status` for a `retention.removed` event's data (and its time)."""
    what = "run directory" if event.get("what") == "run_dir" else "checkpoints"
    note = f"; {event['note']}" if event.get("note") else ""
    return f"{what} removed by retention at {event.get('time')} ({event.get('bytes', 0) / 1e9:.2f} GB{note})"

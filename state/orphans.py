"""Run directories the store does not know, and how to take them back.

A run directory is written (and fsync-ed) before its store row: after a lost WAL, a store
restored from an old backup, or a store moved aside, `<state>/jobs/` still holds every job the
daemon ever acknowledged. The daemon reports them at start-up; `ckptd recover --adopt` puts them
back in the store as queued jobs, which then resume from their newest commit as any job does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ckptd.state.jobspec import spec_digest, spec_from_json
from ckptd.state.paths import RunDir
from ckptd.state.protocol import Event
from ckptd.state.safeopen import read_under
from ckptd.state.store import Store
from ckptd.state.submissions import account_owner, submit

# spec.json is written by ckptd, but the directory is its owner's: read a bounded amount.
MAX_SPEC = 1 << 20


@dataclass(frozen=True)
class Orphan:
    run: RunDir
    owner_uid: int
    problem: str | None  # why it cannot be adopted as it is (None: it can)

    @property
    def job_id(self) -> str:
        return self.run.root.name


def find(store: Store, state: Path) -> list[Orphan]:
    """Every directory of `<state>/jobs/` with no job row, oldest first."""
    jobs_dir = state / "jobs"
    try:
        entries = sorted(jobs_dir.iterdir(), key=lambda p: p.stat().st_mtime)
    except OSError:
        return []
    known = {row["id"] for row in store.query("SELECT id FROM jobs")}
    found = []
    for path in entries:
        if path.name in known or not path.is_dir() or path.is_symlink():
            continue
        found.append(Orphan(RunDir(path), path.stat().st_uid, _problem(RunDir(path))))
    return found


def _problem(run: RunDir) -> str | None:
    try:
        spec_from_json(read_under(run.root, run.spec_file, limit=MAX_SPEC).decode())
    except FileNotFoundError:
        return f"no {run.spec_file.name} (a run directory that was never complete)"
    except (OSError, ValueError) as e:
        return f"{run.spec_file} is unreadable: {e}"
    return None


def adopt(store: Store, orphan: Orphan) -> None:
    """Put the job back as queued, owned by its run directory's owner. Its attempts and events
    are not recovered (they lived in the lost store); its checkpoints, history and logs are in
    the run directory, and the next attempt restores from the newest commit."""
    text = read_under(orphan.run.root, orphan.run.spec_file, limit=MAX_SPEC).decode()
    spec = spec_from_json(text)
    submit(
        store,
        orphan.job_id,
        spec.name,
        text,
        spec_digest(spec),
        str(orphan.run.job_file),
        str(orphan.run.root),
        account_owner(orphan.owner_uid),
        priority=0,
        key=None,
    )
    store.add_event(
        orphan.job_id, Event.JOB_ADOPTED, {"run_dir": str(orphan.run.root), "by_uid": os.geteuid()}
    )

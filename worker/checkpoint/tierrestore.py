"""Restoring from the memory tier when it holds the newest verified state (docs/memory-tier.md,
"Choosing across tiers"): which snapshot is ckptd.state.mempolicy's decision, the files are
ckptd.state.memtier's, the values go back through ckptd.worker.checkpoint.memsnap.

The durable restore is skipped when memory wins (at GB scale it costs seconds to minutes). A
snapshot whose restore killed the worker (in a gang: any member) twice is quarantined, like a
durable commit (`.restoring.json` counts the tries); one that fails with an error is quarantined
at once and the attempt fails, so the next one starts clean: its variables may be half assigned.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import psutil

from ckptd.state import memtier as mt
from ckptd.state.ckptfiles import Manifest
from ckptd.state.durable import write_nondurable
from ckptd.state.mempolicy import Choice, DurableHead, choose, dead_branch
from ckptd.state.protocol import Event
from ckptd.worker.checkpoint import memsnap
from ckptd.worker.checkpoint.ckptstate import CheckpointState
from ckptd.worker.checkpoint.snapshot import SnapshotPlan, object_graph_now
from ckptd.worker.errors import ConfigError

MARKER = ".restoring.json"


@dataclass(frozen=True)
class TierSetup:
    """What this worker's tier needs: where it is, the plan its snapshots are laid out by, and
    whose history they continue."""

    tier: Path
    plan: SnapshotPlan
    lineage: str


def open_tier(s: CheckpointState) -> TierSetup | None:
    """The job's tier, made and checked; None (durable commits only, said in an event) if the
    tier cannot hold snapshots here. A tier that is unsafe to use is the job file's problem."""
    spec = s.spec.checkpoint.memory
    assert spec is not None
    job_id = s.run.job_id  # <state>/jobs/<job-id>: the supervisor removes the same tier
    try:
        tier = mt.open_tier(spec.dir, job_id, os.getuid())
    except mt.TierRefused as e:
        raise ConfigError(str(e)) from None
    except OSError as e:
        s.event(Event.MEMORY_UNAVAILABLE, error=f"{type(e).__name__}: {e}", hint="durable commits only")
        return None
    plan = plan_of(s)
    if plan is None:
        s.event(Event.MEMORY_UNAVAILABLE, error="this TensorFlow has no object graph before a save")
        return None
    if (why := _does_not_fit(s, plan.nbytes, spec.keep)) is not None:
        s.event(
            Event.MEMORY_UNAVAILABLE, error=why, hint="durable commits only; lower checkpoint.memory.keep"
        )
        return None
    return TierSetup(tier, plan, mt.lineage_of(job_id, s.checkpoint_dir()))


def plan_of(s: CheckpointState) -> SnapshotPlan | None:
    """The layout of this worker's snapshots (every member of a gang makes the same); None if
    this TensorFlow cannot give the object graph before a save."""
    _ = s.ckpt.save_counter  # created lazily; a durable save's object graph has it
    graph = object_graph_now(s.ckpt)
    return SnapshotPlan(s.ckpt, graph, s.weights) if graph is not None else None


def _does_not_fit(s: CheckpointState, nbytes: int, keep: int) -> str | None:
    """Why `keep` snapshots and the spare beside this worker's memory would pass
    resources.memory_limit (the tier counts against it): then the tier is better off than an
    out-of-memory kill at the first snapshots. None if they fit, or there is no limit."""
    limit = s.spec.resources.memory_limit
    if limit is None:
        return None
    rss, tier_bytes = psutil.Process().memory_info().rss, nbytes * (keep + 1)
    if rss + tier_bytes <= limit:
        return None
    return (
        f"the tier needs {tier_bytes / 2**20:.0f} MiB ({keep} snapshots and a spare)"
        f" beside this worker's {rss / 2**20:.0f} MiB: more than "
        f"resources.memory_limit ({limit / 2**20:.0f} MiB)"
    )


def _durable_head(manifest: Manifest | None) -> DurableHead | None:
    return DurableHead(manifest.step, manifest.generation) if manifest is not None else None


def _tries(tier: Path, name: str) -> int:
    """Restores of `name` begun before this one (a restore that killed the worker left it)."""
    try:
        marker = json.loads((tier / MARKER).read_text())
        return int(marker["count"]) if marker.get("name") == name else 0
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _choose(s: CheckpointState, t: TierSetup, head: Manifest | None) -> Choice:
    snaps, damaged = mt.snapshots(t.tier)
    for path, why in damaged.items():
        _quarantine(s, t.tier, path, None, why)
    verify = memsnap.verifier(t.plan)

    def checked(snap: mt.Snap) -> str | None:
        if _tries(t.tier, snap.path.name) >= 2:
            return "restoring it killed the worker twice"
        return verify(snap)

    choice = choose(_durable_head(head), snaps, t.lineage, s.attempt, checked)
    for snap, why in choice.quarantine:
        _quarantine(s, t.tier, snap.path, snap.manifest.step, why)
    if choice.ignored:
        s.event(
            Event.MEMORY_IGNORED,
            snapshots=[
                {"step": snap.manifest.step, "generation": snap.manifest.generation, "why": why}
                for snap, why in choice.ignored
            ],
        )
    return choice


def _quarantine(s: CheckpointState, tier: Path, path: Path, step: int | None, why: str) -> None:
    try:
        dest = mt.quarantine(tier, path, why)
    except OSError as e:
        why = f"{why}; not moved to quarantine: {e}"
        dest = path
    s.event(Event.MEMORY_QUARANTINED, snapshot=path.name, step=step, reason=why, to=str(dest))


def choose_snapshot(s: CheckpointState, t: TierSetup, head: Manifest | None) -> mt.Snap | None:
    """The newest verified snapshot newer than the durable `head`; None if the durable tier is
    to be restored instead. Damaged ones are quarantined on the way."""
    return _choose(s, t, head).snapshot


def restore(s: CheckpointState, t: TierSetup, snap: mt.Snap) -> None:
    """Put `snap` (chosen by `choose_snapshot`) into the live objects. The try stays counted
    until `restore_done`: in a gang, after every member has restored it too (`check_gang`), so
    a snapshot whose restore kills another member twice is quarantined as well."""
    marker = t.tier / MARKER
    write_nondurable(
        marker, json.dumps({"name": snap.path.name, "count": _tries(t.tier, snap.path.name) + 1}).encode()
    )
    try:
        s.faults.in_restore(s.attempt)  # test-only: a kill while restoring
        memsnap.restore(snap, s.ckpt, t.plan)
    except Exception as e:
        _quarantine(s, t.tier, snap.path, snap.manifest.step, f"restore failed: {type(e).__name__}: {e}")
        restore_done(t.tier)
        raise


def restore_done(tier: Path) -> None:
    """The restore `restore` counted has succeeded (in a gang: on every member)."""
    with contextlib.suppress(FileNotFoundError):
        (tier / MARKER).unlink()


def drop_dead_branch(s: CheckpointState, t: TierSetup, restored_step: int) -> None:
    """The snapshots beyond the state restored: a history that will not be continued."""
    for snap in dead_branch(mt.snapshots(t.tier)[0], restored_step):
        with contextlib.suppress(FileNotFoundError):
            mt.remove_snapshot(t.tier, snap.path)

"""A gang's members restore the same memory snapshot, or none (docs/memory-tier.md, "Gangs").

Only the chief takes snapshots; on one box every member reads the chief's tier. Before anyone
restores, the chief names the snapshot it chose (step and generation) in one all-gather, every
member looks for it in its own view of the tier and verifies it (plan digest and value digest,
read-only: no quarantine, no marker), and a second all-gather collects the answers. The gang
restores the snapshot only if every member holds it verified; otherwise every member restores
the durable commit, as without the tier. A member that cannot see the tier (another node) thus
costs the tier's gain, never a split gang training on different states.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ckptd.state import memtier as mt
from ckptd.state.mempolicy import gang_agrees, gang_proposal, gang_row
from ckptd.state.protocol import Event
from ckptd.worker.checkpoint import memsnap
from ckptd.worker.checkpoint.ckptstate import CheckpointState
from ckptd.worker.checkpoint.snapshot import SnapshotPlan
from ckptd.worker.checkpoint.tierrestore import plan_of
from ckptd.worker.distribute import gather, is_chief, job_strategy


@dataclass(frozen=True)
class Agreement:
    snapshot: mt.Snap | None  # to restore, on every member; None: the durable commit
    plan: SnapshotPlan | None = None  # a member's own plan, to restore it with (the chief has its)
    why_not: str = ""  # the chief's proposal refused by a member: why, as that member saw it


def agree(s: CheckpointState, chosen: mt.Snap | None) -> Agreement:
    """Called by every member at the same point of its restore (collectives): the chief with
    the snapshot it chose (or None), the others with None."""
    strategy = job_strategy()
    mine = (chosen.manifest.step, chosen.manifest.generation) if chosen is not None else None
    wanted = gang_proposal(gather(strategy, gang_row(is_chief(), mine)))
    if wanted is None:
        return Agreement(None)
    found = (chosen, None) if is_chief() else _find(s, *wanted)
    if isinstance(found, str):  # said here: only this member knows why
        step, generation = wanted
        s.event(Event.MEMORY_IGNORED, snapshots=[{"step": step, "generation": generation, "why": found}])
    if gang_agrees(gather(strategy, [int(not isinstance(found, str))])) and not isinstance(found, str):
        return Agreement(*found)
    why = found if isinstance(found, str) else "a member cannot read or verify it (see its events)"
    return Agreement(None, None, why)


def _find(s: CheckpointState, step: int, generation: int) -> tuple[mt.Snap, SnapshotPlan] | str:
    """The chief's snapshot as this member sees it, verified against this member's own plan;
    or why it cannot be used here."""
    spec = s.spec.checkpoint.memory
    assert spec is not None
    try:
        job_id = s.run.job_id  # a member's run directory is the job's members/<n>/
        if s.faults.unshared_tier_for():  # test-only: as on another node, no such tier
            job_id += ".on-another-node"
        tier = mt.open_tier(spec.dir, job_id, os.getuid(), create=False)
        man = mt.read_manifest(tier / mt.snapshot_name(step, generation))
    except (OSError, ValueError, TypeError, mt.TierRefused) as e:
        return f"{type(e).__name__}: {e}"
    snap = mt.Snap(tier / man.name, man)
    plan = plan_of(s)
    if plan is None:
        return "this TensorFlow has no object graph before a save"
    why = memsnap.verifier(plan)(snap)
    return (snap, plan) if why is None else why

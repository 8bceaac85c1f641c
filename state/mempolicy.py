"""Which state a restore starts from, across the two tiers: pure decisions, table-tested
(tests/test_memtier.py). The files are ckptd.state.memtier's; the reasons are in
docs/memory-tier.md ("Choosing across tiers").

A memory snapshot wins over the newest durable commit only if all of these hold:
- it is this job's (its lineage: the job id and the durable directory it builds on);
- it was written by this attempt or an earlier one (a newer attempt's means this worker is stale);
- it was written by the attempt that made the newest durable commit or a later one (an older
  attempt's is another branch of the run's history, one a later attempt did not continue);
- it is strictly newer in steps than that commit (a tie goes to the durable commit);
- its values check against its digest (`verify`, the one effect, injected); a damaged one is
  quarantined and the next candidate is considered.
Candidates are tried newest attempt first, then newest step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from ckptd.state.memtier import Snap


@dataclass(frozen=True)
class DurableHead:
    """The newest committed durable checkpoint (its manifest's step and generation)."""

    step: int
    generation: int


@dataclass(frozen=True)
class Choice:
    # "durable": restore as without the tier (the newest valid commit, or a fresh start).
    source: Literal["durable", "memory"]
    snapshot: Snap | None = None
    quarantine: tuple[tuple[Snap, str], ...] = field(default=())
    ignored: tuple[tuple[Snap, str], ...] = field(default=())


def why_not(durable: DurableHead | None, snap: Snap, lineage: str, generation: int) -> str | None:
    """Why `snap` cannot be restored in place of `durable` by attempt `generation`, or None."""
    m = snap.manifest
    if m.lineage != lineage:
        return f"another job's or directory's snapshot (lineage {m.lineage}, this one {lineage})"
    if m.generation > generation:
        return (
            f"written by attempt {m.generation}, newer than this attempt {generation}: this worker is stale"
        )
    if durable is None:
        return None
    if m.generation < durable.generation:
        return (
            f"written by attempt {m.generation}, before attempt {durable.generation} committed "
            f"step {durable.step}: another branch of the run"
        )
    if m.step <= durable.step:
        return f"step {m.step} is not newer than the durable commit's step {durable.step}"
    return None


def candidates(
    durable: DurableHead | None, snaps: Sequence[Snap], lineage: str, generation: int
) -> tuple[list[Snap], list[tuple[Snap, str]]]:
    """The snapshots worth trying, in order (newest attempt, then newest step, first), and the
    others with the reason."""
    ok: list[Snap] = []
    ignored: list[tuple[Snap, str]] = []
    for s in snaps:
        reason = why_not(durable, s, lineage, generation)
        if reason is None:
            ok.append(s)
        else:
            ignored.append((s, reason))
    return sorted(ok, key=lambda s: s.order, reverse=True), ignored


def choose(
    durable: DurableHead | None,
    snaps: Sequence[Snap],
    lineage: str,
    generation: int,
    verify: Callable[[Snap], str | None],
) -> Choice:
    """The state to restore: the first candidate that verifies, else the durable tier."""
    ok, ignored = candidates(durable, snaps, lineage, generation)
    damaged: list[tuple[Snap, str]] = []
    for snap in ok:
        reason = verify(snap)
        if reason is None:
            return Choice("memory", snap, tuple(damaged), tuple(ignored))
        damaged.append((snap, reason))
    return Choice("durable", None, tuple(damaged), tuple(ignored))


def dead_branch(snaps: Sequence[Snap], restored_step: int) -> list[Snap]:
    """After a restore to `restored_step`, the snapshots of steps beyond it: the run goes on
    from an earlier state, so they belong to a history that will not be continued; removing
    them keeps the newest snapshot on the live branch."""
    return [s for s in snaps if s.manifest.step > restored_step]


# A gang agrees on its chief's snapshot in two all-gathers (ckptd.worker.checkpoint.tiergang):
# rows of [is chief, step, generation], then one vote per member.
NO_SNAPSHOT = -1


def gang_row(chief: bool, chosen: tuple[int, int] | None) -> list[int]:
    """A member's row of the first all-gather; only the chief's names a snapshot."""
    step, generation = chosen if chief and chosen is not None else (NO_SNAPSHOT, NO_SNAPSHOT)
    return [int(chief), step, generation]


def gang_proposal(rows: Sequence[Sequence[int]]) -> tuple[int, int] | None:
    """The chief's (step, generation) from the gathered rows (one per replica, so a member with
    several devices appears several times), or None if it chose no snapshot."""
    chief = [tuple(row[1:3]) for row in rows if row[0] == 1]
    if not chief or len(set(chief)) != 1:
        raise ValueError(f"not one chief among the gang's rows: {rows}")
    step, generation = chief[0]
    return None if step == NO_SNAPSHOT else (step, generation)


def gang_agrees(votes: Sequence[Sequence[int]]) -> bool:
    """Every member holds the chief's snapshot, verified: only then does the gang restore it
    (a gang split across two states would train on silently different weights)."""
    return bool(votes) and all(v[0] == 1 for v in votes)

"""The memory tier (docs/memory-tier.md) as the supervisor sees it: its share of
`resources.memory_limit` and its removal when the job ends. The worker writes the tier; the
supervisor never reads a snapshot's contents, only the tier's size, and removes it as its owner.

Policy (pure, table-tested in tests/test_tier.py): which end states remove the tier
(`ends_tier`), what memory an attempt may use beside it (`attempt_limit`). Mechanism: `OwnedTier`
measures and removes one job's tier, with the owner's rights; `TierMeter` bounds how often the
RSS watch walks the tier's directory.

`python -m ckptd.supervisor.tier TIER`: the removal, run by the daemon (root) as the owner.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from structlog.typing import FilteringBoundLogger

from ckptd.state import memtier
from ckptd.state.jobspec import JobSpec
from ckptd.state.protocol import Event
from ckptd.state.states import JobState
from ckptd.state.submissions import Owner
from ckptd.supervisor import identity
from ckptd.supervisor.process import worker_env

# The states from which no attempt follows. A requeued job (drain, lost supervisor) is
# INTERRUPTED or QUEUED and keeps its tier: its next attempt restores from it.
END_STATES: frozenset[JobState] = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

# The least memory.max an attempt gets, however large the tier. Below this the interpreter and
# TensorFlow's import (a few hundred MB of anonymous memory) cannot even start, so a worker would
# be OOM-killed at import in a restart loop before it could restore, prune its tier or report
# that the tier does not fit. With the floor it starts, and the worst case is tier + floor above
# the limit: a bounded overshoot rather than a job that can never run again.
MIN_ATTEMPT_BYTES = 512 << 20

# The RSS watch polls every 0.25 s; measuring the tier walks its directory (a stat per file), and
# the tier grows by at most one snapshot per memory interval, so a few seconds' lag is enough.
MEASURE_SECONDS = 5.0

REMOVE_TIMEOUT_SECONDS = 120.0  # a tmpfs removal takes milliseconds; a hung child is killed


def ends_tier(state: JobState) -> bool:
    return state in END_STATES


def attempt_limit(limit: int | None, tier_bytes: int) -> int | None:
    """The attempt's memory.max: the job's limit minus what the tier already holds (those pages
    stay charged to an earlier attempt's cgroup, or its parent, not to this one), never below
    MIN_ATTEMPT_BYTES (nor above the limit itself). No limit: None."""
    if not limit:
        return None
    return max(limit - max(tier_bytes, 0), min(limit, MIN_ATTEMPT_BYTES))


class Tier(Protocol):
    """One job's tier as the runner uses it (tests give a fake)."""

    @property
    def path(self) -> Path: ...
    def bytes(self) -> int: ...
    def remove(self) -> None: ...  # raises OSError when it could not


@dataclass(frozen=True)
class OwnedTier:
    """The tier of a job whose workers run as `owner`."""

    path: Path
    owner: Owner

    def bytes(self) -> int:
        """The tmpfs blocks the tier holds; 0 if it cannot be read. Accounting is best effort:
        a tier the supervisor cannot measure must not stop the job."""
        try:
            return memtier.tier_bytes(self.path)
        except OSError:
            return 0

    def remove(self) -> None:
        """Remove the tier with the owner's rights: in-process when that is us (`ckptd run`, a
        daemon of one user), else in a child started as the owner, as run directories are
        removed (ckptd.state.runremove): the owner may have planted symlinks, and as the owner
        the worst a name can do is remove the owner's own files."""
        if not identity.needs_switch(self.owner):
            memtier.remove_tier(self.path)
            return
        try:
            done = subprocess.run(
                [sys.executable, "-m", __name__, str(self.path)],
                cwd="/",  # the owner may not enter the daemon's directory
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=REMOVE_TIMEOUT_SECONDS,
                env=worker_env() | identity.owner_env(self.owner),
                close_fds=True,
                **identity.popen_kwargs(self.owner),
            )
        except subprocess.TimeoutExpired as e:
            raise OSError(f"removing {self.path} took over {REMOVE_TIMEOUT_SECONDS:.0f} s") from e
        if done.returncode != 0:
            raise OSError(done.stderr.decode(errors="replace").strip()[-2000:] or f"exit {done.returncode}")


def for_job(spec: JobSpec, job_id: str, owner: Owner) -> OwnedTier | None:
    """The job's tier, or None for a job without `checkpoint.memory` (it has none)."""
    memory = spec.checkpoint.memory
    if memory is None:
        return None
    return OwnedTier(memtier.tier_dir(memory.dir, job_id, owner.uid), owner)


def remove_logged(tier: Tier, job_id: str, log: FilteringBoundLogger) -> None:
    """Remove a tier outside a runner (the daemon's start-up, a cancel of a queued job): a
    failure is logged, never raised, as the runner reports it. No tier there: nothing to do
    (and no child started for it)."""
    if not os.path.lexists(tier.path):
        return
    try:
        tier.remove()
    except OSError as e:
        log.warning(Event.MEMORY_TIER_REMOVE_FAILED, job_id=job_id, tier=str(tier.path), error=str(e))
    else:
        log.info("memory.tier_removed", job_id=job_id, tier=str(tier.path))


@dataclass
class TierMeter:
    """The tier's bytes, measured at most every `every` seconds of `clock`."""

    measure: Callable[[], int]
    clock: Callable[[], float]
    every: float = MEASURE_SECONDS
    _value: int = 0
    _at: float | None = field(default=None)

    def __call__(self) -> int:
        now = self.clock()
        if self._at is None or now - self._at >= self.every:
            self._value, self._at = self.measure(), now
        return self._value


def main(argv: list[str]) -> int:
    """The child's side: one absolute tier path, removed without following any symlink."""
    if len(argv) != 1 or not os.path.isabs(argv[0]) or ".." in Path(argv[0]).parts:
        print("usage: python -m ckptd.supervisor.tier /ABSOLUTE/TIER/DIR", file=sys.stderr)
        return 2
    try:
        memtier.remove_tier(Path(argv[0]))
    except OSError as e:
        print(f"{argv[0]}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

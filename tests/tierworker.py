"""The fake worker (tests/fakeworker.py) with a memory tier: before training it opens its job's
tier as the real worker will (ckptd.state.memtier.open_tier), leaves a snapshot-sized file in it
and writes the tier's path to `tier-path` in the run directory, for tests/test_tier_run.py.
Selected with CKPTD_WORKER_MODULE=tests.tierworker."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ckptd.state import memtier
from ckptd.state.durable import atomic_write_text
from ckptd.state.jobspec import spec_from_json
from ckptd.state.paths import RunDir
from tests import fakeworker

TIER_PATH_FILE = "tier-path"


def main() -> int:
    run = RunDir(Path(sys.argv[1]))
    memory = spec_from_json(run.spec_file.read_text()).checkpoint.memory
    assert memory is not None
    tier = memtier.open_tier(memory.dir, run.root.name, os.geteuid())  # the run dir's name: the job id
    snap = tier / memtier.snapshot_name(int(sys.argv[2]), int(sys.argv[2]))
    os.makedirs(snap, 0o700, exist_ok=True)
    (snap / memtier.VALUES).write_bytes(b"\1" * 64 * 1024)
    atomic_write_text(run.root / TIER_PATH_FILE, str(tier))
    return fakeworker.main()


if __name__ == "__main__":
    sys.exit(main())

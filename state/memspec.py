"""The job file's `checkpoint.memory` section: the memory tier beneath durable commits
(docs/memory-tier.md). A module of its own because ckptd.state.jobspec is at the size limit;
`Checkpoint.memory` there holds it and checks it against the durable interval."""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# tmpfs mounts a user may name: the shared one, and a login's runtime directory. The worker
# checks at start that the directory really is a tmpfs (ckptd.state.memtier).
TIER_ROOTS = re.compile(r"^(/dev/shm|/run/user/[0-9]+)/[^/]")


class Memory(BaseModel):
    # The same strictness as every other section of the job file (ckptd.state.jobspec._Strict).
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    # A snapshot into RAM every N steps; it survives the worker, not the machine.
    every_steps: int = Field(ge=1, le=10**9)
    # Snapshots kept (the oldest goes only once a newer one is complete): RAM of keep x state.
    keep: int = Field(2, ge=1, le=16)
    # Default (None): /dev/shm/ckptd-UID/JOB-ID, chosen by the worker at run time.
    dir: str | None = Field(None, max_length=4096)

    @field_validator("dir")
    @classmethod
    def _on_tmpfs(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if "\0" in v:
            raise ValueError("contains a NUL character")
        parts = PurePosixPath(v).parts
        if not TIER_ROOTS.match(v) or ".." in parts or str(PurePosixPath(v)) != v.rstrip("/"):
            raise ValueError(
                "must be a plain absolute path under /dev/shm/ or /run/user/UID/ (a tmpfs, so "
                "snapshots stay in RAM), without '..' or '//'; leave it out for the default "
                "/dev/shm/ckptd-UID/JOB-ID"
            )
        return v

    def check_against(self, mode: str, durable_every_steps: int | Literal["auto"] | None) -> None:
        """The section beside the durable one it sits under (called by jobspec.Checkpoint)."""
        # The tier reuses the asynchronous path's O(1) capture and off-loop copy; with
        # mode: sync each snapshot would stall the step loop for a full copy of the state.
        if mode != "async":
            raise ValueError(
                "checkpoint.memory: needs checkpoint.mode: async (memory snapshots reuse its "
                "off-loop copy); set mode: async or remove checkpoint.memory"
            )
        # A tier taken no more often than the durable commits would never hold anything newer
        # than a commit: RAM and copies for nothing. (`auto` or time-only durable intervals vary,
        # so they are not compared.)
        if isinstance(durable_every_steps, int) and self.every_steps >= durable_every_steps:
            raise ValueError(
                f"checkpoint.memory.every_steps: {self.every_steps} is not fewer than "
                f"checkpoint.every_steps: {durable_every_steps}, so a memory snapshot would never "
                "be newer than the durable commit; make it smaller, or remove checkpoint.memory"
            )

    def check_distribute(self, on_slurm: bool) -> None:
        """A gang on one box restores from its chief's tier (every member reads it, and they
        agree before restoring: docs/memory-tier.md, "Gangs"). On Slurm the chief's node would
        keep its tier after the job: no supervisor runs there to remove it."""
        if on_slurm:
            raise ValueError(
                "checkpoint.memory: not available with distribute.engine: slurm yet (the chief's "
                "node would keep the tier's RAM after the job); remove checkpoint.memory, or run "
                "the gang with engine: local"
            )

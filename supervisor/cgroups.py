"""A memory cgroup per worker attempt: the kernel enforces `resources.memory_limit` and counts its
OOM kills, which is the evidence that turns a bare SIGKILL into `host_oom`.

cgroup v2 is used where our cgroup already hands the memory controller to children, or where
systemd delegated our unit's cgroup to us (`Delegate=memory` with CKPTD_CGROUP_DELEGATED=1, as
in systemd/ckptd.service); else cgroup v1's memory hierarchy where we may create a child there;
else None, and the supervisor falls back to watching RSS with psutil (also with
CKPTD_MEMORY_CGROUPS=0).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
# Where the daemon moves itself inside its delegated unit cgroup (see delegated_base).
SUPERVISOR_LEAF = "supervisor"


@dataclass(frozen=True)
class MemoryCgroup:
    path: Path
    version: int  # 1 or 2
    limit: int

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(f"{pid}\n")

    @property
    def events_file(self) -> Path:
        """Where this cgroup version keeps its oom_kill counter."""
        return self.path / ("memory.events" if self.version == 2 else "memory.oom_control")

    def oom_kills(self) -> int:
        """How many processes the kernel OOM-killed in this cgroup (0 if it cannot tell)."""
        try:
            for line in self.events_file.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def remove(self) -> None:
        with contextlib.suppress(OSError):  # busy while a process lingers: leave it
            self.path.rmdir()


def _own_paths(proc_cgroup: str) -> tuple[str | None, str | None]:
    """(v2 path, v1 memory path) of this process, from /proc/self/cgroup."""
    v2 = v1 = None
    for line in proc_cgroup.splitlines():
        hid, controllers, path = [*line.split(":", 2), "", ""][:3]
        if hid == "0" and controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v2, v1


def _v2_base(path: str) -> Path | None:
    for mount in (ROOT, ROOT / "unified"):
        base = mount / path.lstrip("/")
        with contextlib.suppress(OSError):
            if "memory" in (base / "cgroup.subtree_control").read_text().split():
                return base
    return None


def delegated_base(own: str, root: Path = ROOT) -> Path | None:
    """The unit cgroup systemd delegated to us, ready for memory-limited children; None if it
    is not ours to change.

    cgroup v2 lets a cgroup hand controllers to its children only while it holds no process of
    its own: the daemon first moves itself into a `supervisor/` leaf, then enables memory for the
    unit's children. Worker cgroups become siblings of that leaf. The kernel refuses any step
    that is not permitted (OSError), which means no delegation.
    """
    unit = root / own.lstrip("/")
    if unit.name == SUPERVISOR_LEAF:  # moved there by an earlier call
        unit = unit.parent
    try:
        if "memory" in (unit / "cgroup.subtree_control").read_text().split():
            return unit
        leaf = unit / SUPERVISOR_LEAF
        leaf.mkdir(exist_ok=True)
        for pid in (unit / "cgroup.procs").read_text().split():
            (leaf / "cgroup.procs").write_text(f"{pid}\n")
        (unit / "cgroup.subtree_control").write_text("+memory\n")
    except OSError:
        return None
    return unit


def parent_cgroup() -> tuple[Path, int] | None:
    """Where this supervisor may create memory-limited children, and the cgroup version.
    CKPTD_MEMORY_CGROUPS=0 turns cgroups off (RSS watch only), e.g. where another agent owns them."""
    if os.environ.get("CKPTD_MEMORY_CGROUPS") == "0":
        return None
    try:
        v2, v1 = _own_paths(Path("/proc/self/cgroup").read_text())
    except OSError:
        return None
    if v2 is not None and os.environ.get("CKPTD_CGROUP_DELEGATED") == "1":
        base = delegated_base(v2)
        if base is not None:
            return base, 2
    if v2 is not None and (base := _v2_base(v2)) is not None:
        return base, 2
    if v1 is not None:
        base = ROOT / "memory" / v1.lstrip("/")
        if (base / "memory.limit_in_bytes").exists() and os.access(base, os.W_OK):
            return base, 1
    return None


def enforcement() -> tuple[str, str]:
    """How `resources.memory_limit` is enforced on this host, for one log line at start-up:
    ("cgroup-v2" | "cgroup-v1" | "rss", where or why)."""
    if os.environ.get("CKPTD_MEMORY_CGROUPS") == "0":
        return "rss", "CKPTD_MEMORY_CGROUPS=0: ckptd watches each worker's own memory (RssAnon+RssShmem)"
    where = parent_cgroup()
    if where is not None:
        base, version = where
        return f"cgroup-v{version}", f"each attempt gets a child memory cgroup of {base}"
    try:
        v2, v1 = _own_paths(Path("/proc/self/cgroup").read_text())
    except OSError:
        v2 = v1 = None
    if v1 is not None:
        why = (
            f"the cgroup v1 memory cgroup {ROOT / 'memory' / v1.lstrip('/')} is not writable "
            f"by uid {os.geteuid()} (not delegated)"
        )
    elif v2 is not None:
        why = f"the memory controller is not delegated to cgroup {v2}"
    else:
        why = "no memory cgroup hierarchy is mounted"
    return "rss", why + "; ckptd watches each worker's own memory (RssAnon+RssShmem) instead"


def create(name: str, limit: int, parent: tuple[Path, int] | None = None) -> MemoryCgroup | None:
    """A fresh child cgroup limited to `limit` bytes, or None where that is not permitted."""
    where = parent or parent_cgroup()
    if where is None:
        return None
    base, version = where
    path = base / name
    try:
        path.mkdir(exist_ok=True)
        if version == 2:
            (path / "memory.max").write_text(f"{limit}\n")
            with contextlib.suppress(OSError):  # no swap to hide in either
                (path / "memory.swap.max").write_text("0\n")
        else:
            (path / "memory.limit_in_bytes").write_text(f"{limit}\n")
            with contextlib.suppress(OSError):
                (path / "memory.memsw.limit_in_bytes").write_text(f"{limit}\n")
    except OSError:
        with contextlib.suppress(OSError):
            path.rmdir()
        return None
    return MemoryCgroup(path, version, limit)


def enclosing(pid: int | str = "self") -> MemoryCgroup | None:
    """The memory cgroup that `pid` lives in (a systemd unit's, a container's), whose oom_kill
    counter also counts kills of its members by the host's OOM killer; None for the root cgroup
    or where none can be read. Its `limit` is 0: ckptd did not set one."""
    try:
        v2, v1 = _own_paths(Path(f"/proc/{pid}/cgroup").read_text())
    except OSError:
        return None
    candidates = []
    if v2 not in (None, "/"):
        candidates += [(mount / v2.lstrip("/"), 2) for mount in (ROOT, ROOT / "unified")]
    if v1 not in (None, "/"):
        candidates.append((ROOT / "memory" / v1.lstrip("/"), 1))
    found = (MemoryCgroup(path, version, 0) for path, version in candidates)
    return next((cg for cg in found if cg.events_file.exists()), None)

"""A worker that could not create a thread: its evidence, and the limits that were in force.

TensorFlow aborts (SIGABRT, no error file) when a thread cannot be created:
`terminate called after throwing an instance of 'std::system_error' what(): Resource temporarily
unavailable` (a std::thread, e.g. PosixEnv::SchedClosureAfter's). Multi_worker members did this
on a busy box: a collective timeout gave every collective a thread sleeping that long (~9 per
step, held 600 s), so a member grew to thousands of threads and reached the uid's RLIMIT_NPROC
or the unit's TasksMax. ckptd.worker.distribute now sets no timeout by default and sizes the
pools to the member's CPU share (~45 threads per member), but any process can still meet a low
limit on a crowded box: class `resource_limit`, retried with backoff, never a crash loop."""

from __future__ import annotations

import contextlib
import re
import resource
from pathlib import Path

THREAD_ABORT = "ThreadCreationFailed"  # the error type read_error gives this ending
TAIL_BYTES = 8192
_ABORT = re.compile(
    # std::thread (gRPC, the collective executor): the exception's two lines
    r"std::system_error[^\n]*\n?[^\n]*Resource temporarily unavailable"
    r"|pthread_create[^\n]*Resource temporarily unavailable"
    # TensorFlow's own threads: "Check failed: ret == 0 (11 vs. 0) Thread X creation via
    # pthread_create() failed." (11: EAGAIN)
    r"|\(11 vs\. 0\) Thread \S+ creation via pthread_create\(\) failed",
)


def thread_abort(stderr_tail: str) -> str | None:
    """The line that says a thread could not be created, or None."""
    m = _ABORT.search(stderr_tail)
    if m is None:
        return None
    return " ".join(m.group(0).split())[:300]


def in_force(cgroup_pids: Path | None = None) -> str:
    """The limits a worker of ours inherits, for the evidence (read after the fact: what they
    are now, which is what the next attempt will meet)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NPROC)
    parts = [f"RLIMIT_NPROC={'unlimited' if soft == resource.RLIM_INFINITY else soft} (threads count)"]
    for name in ("pids.max", "pids.current"):
        with contextlib.suppress(OSError):
            if cgroup_pids is not None:
                parts.append(f"{name}={(cgroup_pids / name).read_text().strip()}")
    with contextlib.suppress(OSError):
        parts.append(f"kernel.threads-max={Path('/proc/sys/kernel/threads-max').read_text().strip()}")
    return ", ".join(parts)


def own_pids_cgroup() -> Path | None:
    """Where the unit's TasksMax is enforced: our cgroup's pids.max (v2, or v1's pids hierarchy)."""
    try:
        text = Path("/proc/self/cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        for base in ([Path("/sys/fs/cgroup/pids")] if "pids" in controllers.split(",") else []) + (
            [Path("/sys/fs/cgroup")] if controllers == "" else []
        ):
            candidate = base / path.lstrip("/")
            if (candidate / "pids.max").exists():
                return candidate
    return None

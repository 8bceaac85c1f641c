"""GPU inventory and the device choice for an attempt (the choice is a pure function)."""

from __future__ import annotations

import re
import shutil
import subprocess

_GPU_LINE = re.compile(r"^GPU (\d+):", re.M)


def detect_gpus(timeout: float = 10.0) -> list[int]:
    """GPU indices from `nvidia-smi -L`; none when it is missing, fails or hangs (a wedged
    driver can make nvidia-smi hang: never wait for it unbounded)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=timeout).stdout
    except (subprocess.TimeoutExpired, OSError):
        return []
    return [int(m) for m in _GPU_LINE.findall(out)]


def choose_devices(
    available: list[int], excluded: set[int], wanted: int, fewest: int | None = None
) -> list[int] | None:
    """The first `wanted` healthy devices, or as many as there are if at least `fewest` (a
    mirrored job's distribute.min_replicas; default: `wanted`); None when there are fewer."""
    healthy = [d for d in available if d not in excluded]
    enough = wanted if fewest is None else min(fewest, wanted)
    return healthy[:wanted] if len(healthy) >= enough else None


def exclude_after_fault(
    available: list[int], excluded: set[int], used: list[int], wanted: int, fewest: int | None = None
) -> set[int]:
    """After a gpu_fault on `used`: exclude those devices if enough others remain to run the job;
    otherwise keep them (a retry on the same device beats not running at all)."""
    candidate = excluded | set(used)
    return candidate if choose_devices(available, candidate, wanted, fewest) is not None else excluded

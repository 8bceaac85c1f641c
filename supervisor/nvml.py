"""GPU health from NVML, where `nvidia-ml-py` (`pip install 'ckptd[gpu]'`) and a GPU are present.

After an attempt on GPUs ends badly, the supervisor asks NVML about the devices it used: a lost
GPU, uncorrected ECC errors since the last driver load, pages waiting for retirement, or a failed
row remap make the attempt a `gpu_fault` (even a bare SIGKILL or a hang: the driver often takes
the process down with it) and exclude exactly that device from later attempts.

Device indices are nvidia-smi's (PCI bus order): the worker gets CUDA_DEVICE_ORDER=PCI_BUS_ID
so CUDA_VISIBLE_DEVICES means the same devices. A wedged driver can hang any NVML call, so the
query runs in a thread with a deadline; without an answer there is no evidence.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

QUERY_TIMEOUT_SECONDS = 10.0


def _nvml() -> Any | None:
    try:
        return importlib.import_module("pynvml")
    except ImportError:
        return None


def _is_lost(nvml: Any, e: Exception) -> bool:
    return getattr(e, "value", None) == getattr(nvml, "NVML_ERROR_GPU_IS_LOST", 15)


def _probe(nvml: Any, handle: Any) -> list[str]:
    """Each check NVML does not support on this device (NotSupported) is skipped."""
    found = []
    checks = (
        (
            "uncorrected ECC errors",
            lambda: nvml.nvmlDeviceGetTotalEccErrors(
                handle, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC
            ),
        ),
        (
            "page retirement pending (reset the GPU)",
            lambda: int(nvml.nvmlDeviceGetRetiredPagesPendingStatus(handle) == nvml.NVML_FEATURE_ENABLED),
        ),
        ("row remapping failed", lambda: int(bool(nvml.nvmlDeviceGetRemappedRows(handle)[3]))),
    )
    for what, read in checks:
        try:
            count = int(read())
        except nvml.NVMLError as e:
            if _is_lost(nvml, e):
                return ["GPU is lost"]
            continue
        if count:
            found.append(f"{what}: {count}" if "ECC" in what else what)
    return found


def _query(nvml: Any, devices: list[int]) -> dict[int, str]:
    problems: dict[int, str] = {}
    nvml.nvmlInit()
    try:
        for index in devices:
            try:
                found = _probe(nvml, nvml.nvmlDeviceGetHandleByIndex(index))
            except nvml.NVMLError as e:
                found = ["GPU is lost" if _is_lost(nvml, e) else f"NVML error: {e}"]
            if found:
                problems[index] = "; ".join(found)
    finally:
        nvml.nvmlShutdown()
    return problems


def device_problems(
    devices: list[int], nvml: Any | None = None, timeout: float = QUERY_TIMEOUT_SECONDS
) -> dict[int, str]:
    """{device index: what NVML reports wrong with it}; {} without NVML, GPUs or an answer."""
    nvml = nvml if nvml is not None else _nvml()
    if nvml is None or not devices:
        return {}
    result: dict[int, str] = {}

    def run() -> None:
        try:
            result.update(_query(nvml, devices))
        except Exception:  # NVML missing its library, driver not loaded: no evidence
            result.clear()

    thread = threading.Thread(target=run, name="ckptd-nvml", daemon=True)
    thread.start()
    thread.join(timeout)
    return dict(result) if not thread.is_alive() else {}


def describe(problems: dict[int, str]) -> str | None:
    if not problems:
        return None
    return "NVML: " + "; ".join(f"GPU {i}: {what}" for i, what in sorted(problems.items()))

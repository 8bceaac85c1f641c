"""NVML health checks against a fake pynvml (no GPU here): what each device report becomes."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from ckptd.supervisor.nvml import describe, device_problems


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


LOST, NOT_SUPPORTED = 15, 3


class FakeNvml:
    """The pynvml surface ckptd uses; `devices` maps an index to its state, where a value of
    "lost" makes the handle lookup fail and "unsupported" makes every check refuse."""

    NVMLError = NVMLError
    NVML_ERROR_GPU_IS_LOST = LOST
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED, NVML_VOLATILE_ECC, NVML_FEATURE_ENABLED = 1, 0, 1

    def __init__(self, devices: dict[int, Any], block: threading.Event | None = None) -> None:
        self.devices, self.block, self.shut = devices, block, False

    def nvmlInit(self) -> None:
        if self.block is not None:
            self.block.wait()

    def nvmlShutdown(self) -> None:
        self.shut = True

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if self.devices[index] == "lost":
            raise NVMLError(LOST)
        return index

    def _state(self, handle: int, key: str) -> Any:
        state = self.devices[handle]
        if state == "unsupported":
            raise NVMLError(NOT_SUPPORTED)
        return state.get(key, 0)

    def nvmlDeviceGetTotalEccErrors(self, handle: int, kind: int, counter: int) -> int:
        assert (kind, counter) == (1, 0)  # uncorrected, since the driver loaded
        return int(self._state(handle, "ecc"))

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: int) -> int:
        return int(self._state(handle, "pending"))

    def nvmlDeviceGetRemappedRows(self, handle: int) -> tuple[int, int, int, int]:
        return (0, 0, 0, int(self._state(handle, "remap_failed")))


CASES = [
    ({0: {}, 1: {}}, {}),
    ({0: {}, 1: {"ecc": 3}}, {1: "uncorrected ECC errors: 3"}),
    ({0: "lost"}, {0: "GPU is lost"}),
    ({0: "unsupported"}, {}),  # a consumer card without ECC reporting: no evidence, no guess
    (
        {0: {"pending": 1, "remap_failed": 1}},
        {0: "page retirement pending (reset the GPU); row remapping failed"},
    ),
]


@pytest.mark.parametrize(("devices", "expected"), CASES)
def test_device_problems(devices: dict[int, Any], expected: dict[int, str]) -> None:
    fake = FakeNvml(devices)
    assert device_problems(sorted(devices), fake) == expected
    assert fake.shut


def test_a_hanging_driver_gives_no_evidence_within_the_deadline() -> None:
    release = threading.Event()
    try:
        assert device_problems([0], FakeNvml({0: {"ecc": 1}}, block=release), timeout=0.2) == {}
    finally:
        release.set()


def test_without_pynvml_or_devices_there_is_nothing_to_ask() -> None:
    assert device_problems([], FakeNvml({})) == {}
    assert describe({}) is None
    assert describe({1: "GPU is lost", 0: "x"}) == "NVML: GPU 0: x; GPU 1: GPU is lost"

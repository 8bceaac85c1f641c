"""What the checkpoint overhead benchmark measures: its constants, the cases and units it runs,
and one run's result (shared by bench/checkpoint_overhead.py and bench/overhead_report.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SEED = 7
INTERVALS = (20, 100)
OFF_EVERY_STEPS = 10**9
OFF_EVERY_SECONDS = 604800.0
RUN_TIMEOUT_SECONDS = 1800
ASYNC_STALL_TARGET = 0.10  # async stall per save / sync stall per save
BANDWIDTH_TARGET = 0.7  # ckptd sync save throughput / disk write+fsync bandwidth
DISK_TEST_BYTES = 256 * 2**20
DISK_CHUNK_BYTES = 8 * 2**20
DISK_SAMPLES_MIN = 3
RESULT_PREFIX = "BENCH-RESULT "
# Steady state: epochs that end this long after the first step are the measured window. It leaves
# out one-time start-up costs (the first tf.function trace, the async writer's TensorFlow import
# competing with training for the CPU) that a run of hours does not feel.
WARMUP_SECONDS = 6.0
THROUGHPUT_TARGETS = {20: 0.95, 100: 0.98}  # ckptd async, steady ratio

BASELINES = ("none", "keras-none")
# ckptd-default: the job file names no checkpoint.mode (what a user who changes nothing gets).
CKPTD_METHODS = ("none", "ckptd-default", "ckptd-sync", "ckptd-async")
CHECKPOINT_METHODS = (
    "ckptd-default",
    "ckptd-sync",
    "ckptd-async",
    "keras-ModelCheckpoint",
    "keras-BackupAndRestore",
)
BASELINE_OF = {
    "ckptd-default": "none",
    "ckptd-sync": "none",
    "ckptd-async": "none",
    "keras-ModelCheckpoint": "keras-none",
    "keras-BackupAndRestore": "keras-none",
}


@dataclass(frozen=True)
class Case:
    name: str
    entry: str  # /abs/path/file.py:function
    params: dict[str, Any]
    epochs: int
    batch_size: int


@dataclass(frozen=True)
class Unit:
    case: Case
    method: str
    interval: int | None  # None for the baselines

    @property
    def key(self) -> tuple[str, str, int | None]:
        return self.case.name, self.method, self.interval

    def label(self) -> str:
        every = f"every {self.interval}" if self.interval else "no ckpt"
        return f"{self.case.name:5} {every:9} {self.method}"


@dataclass
class Result:
    steps: int
    seconds: float
    saves: int = 0  # interval saves taken (async: snapshots handed to the writer)
    due: int = 0  # interval saves that fell due (async: more than taken when coalesced)
    stall_seconds: float = 0.0
    save_seconds: list[float] = field(default_factory=list)
    ckpt_bytes: int | None = None
    steady: float | None = None  # steps/s over the epochs after WARMUP_SECONDS

    @property
    def steps_per_sec(self) -> float:
        return self.steps / self.seconds

    @property
    def commits(self) -> int:
        """Interval checkpoints committed by the end of the run (`saves` counts the ones due)."""
        return len(self.save_seconds)

    @property
    def stall_per_save(self) -> float | None:
        return self.stall_seconds / self.saves if self.saves else None


Results = dict[tuple[str, str, int | None], list[Result | None]]

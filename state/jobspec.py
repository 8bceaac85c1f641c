"""The job file schema (a strict pydantic model: no coercions, unknown keys rejected, ranges
checked) and the one door for a stored or sent spec (`spec_from_json`). Reading a job file:
ckptd.state.jobfile."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import string
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ckptd.state.distspec import Distribute, check_distribute
from ckptd.state.memspec import Memory

NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
ENTRY_RE = re.compile(r"^(?P<target>[^:\s]+):(?P<func>[A-Za-z_][A-Za-z0-9_]*)$")
FORMAT_FIELD_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::[^{}]*)?\}")
WEIGHT_SUFFIXES = (".hdf5", ".h5", ".keras")
_UNITS = {
    "": 1,
    "B": 1,
    "K": 10**3,
    "KB": 10**3,
    "M": 10**6,
    "MB": 10**6,
    "G": 10**9,
    "GB": 10**9,
    "T": 10**12,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}

# Set by the program's own fit(...) call when the job runs an entrypoint script.
FIT_OWNED = frozenset({"epochs", "batch_size", "validation_split", "shuffle"})

PosSeconds = Annotated[float, Field(gt=0, le=7 * 86400)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class Train(_Strict):
    epochs: int = Field(10, ge=1, le=1_000_000)
    batch_size: int = Field(32, ge=1, le=1_000_000)
    validation_split: float = Field(0.0, ge=0.0, lt=1.0)
    shuffle: bool = True
    shuffle_buffer: int = Field(10_000, ge=1, le=100_000_000)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    deterministic: bool = True


def _inside_run_dir(value: str) -> str:
    """A relative output path stays inside the run directory; an absolute one is checked where
    the submitter's rights apply (check_paths on the client, the worker at run time)."""
    if "\0" in value:
        raise ValueError("contains a NUL character")
    if not value.startswith("/") and ".." in Path(value).parts:
        raise ValueError(
            "a relative path must stay inside the job's run directory (no '..'); "
            "give an absolute path you can write to put it elsewhere"
        )
    return value


class Checkpoint(_Strict):
    dir: str = Field("checkpoints", min_length=1, max_length=4096)
    # A commit every N steps, exactly: a save due while the previous one is still being written
    # waits for it (saves coalesce only when the disk cannot keep up, and ckptd says so).
    # `auto` (async only): as often as async_writer_share and async_overhead_budget allow
    # (cost-based pacing, CheckFreq-style), at least every every_seconds.
    every_steps: Annotated[int, Field(ge=1, le=10**9)] | Literal["auto"] | None = 100
    every_seconds: PosSeconds | None = 60.0
    max_to_keep: int = Field(3, ge=1, le=10_000)
    keep_every_n_hours: Annotated[float, Field(gt=0, le=10**6)] | None = None
    # async (default): the step loop only takes an in-memory snapshot; a writer writes, fsyncs and
    # commits it with the same protocol while training goes on. sync: the step loop waits for the
    # whole commit (no writer, no snapshot memory).
    mode: Literal["sync", "async"] = "async"
    # every_steps: auto only: the most of wall time the writer may spend writing (see
    # ckptd.state.pacing).
    async_writer_share: float = Field(0.1, gt=0.0, le=1.0)
    # every_steps: auto only: the most of training time interval saves may cost, as the step loop measures
    # it (stall + slower steps while a save is in flight); 1.0: no limit. 1 % by default: the
    # loop sees only part of a large checkpoint's cost (~55 % of a 104 MB commit's on 2 cores;
    # the rest falls outside the save's window), and the true cost should stay within 2 %.
    async_overhead_budget: float = Field(0.01, gt=0.0, le=1.0)
    # A second, cheaper tier: snapshots in RAM that outlive the worker (docs/memory-tier.md).
    memory: Memory | None = None

    @field_validator("dir")
    @classmethod
    def _dir_inside(cls, v: str) -> str:
        return _inside_run_dir(v)

    @model_validator(mode="after")
    def _some_trigger(self) -> Checkpoint:
        if self.every_steps is None and self.every_seconds is None:
            raise ValueError(
                "set every_steps and/or every_seconds, or the run is only checkpointed at the end"
            )
        if self.every_steps == "auto" and self.mode != "async":
            raise ValueError(
                "checkpoint.every_steps: auto paces asynchronous saves by their measured cost; "
                "set mode: async, or give a number of steps"
            )
        if self.memory is not None:
            self.memory.check_against(self.mode, self.every_steps)
        return self


class Best(_Strict):
    monitor: str = Field("val_loss", min_length=1, max_length=200)
    mode: Literal["auto", "min", "max"] = "auto"
    save_best_only: bool = True
    filepath: str = Field("weights.best.hdf5", min_length=1, max_length=4096)

    @field_validator("filepath")
    @classmethod
    def _weights_file(cls, v: str) -> str:
        if not v.endswith(WEIGHT_SUFFIXES):
            raise ValueError(
                "must end in .hdf5 or .h5 (Keras-2 HDF5 weights), .weights.h5 "
                "(Keras 3 weights) or .keras (whole model)"
            )
        _check_template(v)
        return _inside_run_dir(v)


def _check_template(template: str) -> None:
    """The template formats as Keras's ModelCheckpoint would: `{epoch:02d}` gets an int, every
    other field a float. A bad spec fails here, not at the first epoch end of a long run."""
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"not a valid template ({e}); double braces {{{{ }}}} for literal ones") from e
    for _, name, spec, conversion in fields:
        if name is None:
            continue
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or conversion:
            raise ValueError(f"bad template field {{{name}}}: use {{epoch}} or a metric name")
        try:
            format(1 if name == "epoch" else 0.5, spec or "")
        except ValueError as e:
            raise ValueError(f"bad format spec {{{name}:{spec}}}: {e}") from e


class EarlyStopping(_Strict):
    monitor: str = Field("val_loss", min_length=1, max_length=200)
    mode: Literal["auto", "min", "max"] = "auto"
    patience: int = Field(0, ge=0, le=10**6)
    min_delta: float = Field(0.0, ge=0.0)
    baseline: float | None = None
    start_from_epoch: int = Field(0, ge=0, le=10**6)
    restore_best_weights: bool = False


class Restart(_Strict):
    max_restarts: int = Field(10, ge=0, le=10_000)
    backoff_initial_seconds: PosSeconds = 1.0
    backoff_max_seconds: PosSeconds = 60.0
    heartbeat_timeout_seconds: Annotated[float, Field(ge=1, le=7 * 86400)] = 120.0
    startup_grace_seconds: Annotated[float, Field(ge=1, le=7 * 86400)] = 300.0
    # Keep one worker with TensorFlow imported and the model built waiting, so recovery after a
    # failure skips both (costs that worker's memory, ~0.5 GB + the model, while it waits).
    hot_spare: bool = False
    # A loss or weights gone NaN/inf: `fail` the job, or `restart` from the last finite commit
    # with the learning rate times nan_lr_factor per such restart (within max_restarts).
    on_nan: Literal["fail", "restart"] = "fail"
    nan_lr_factor: float = Field(0.5, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> Restart:
        if self.backoff_max_seconds < self.backoff_initial_seconds:
            raise ValueError("backoff_max_seconds must be >= backoff_initial_seconds")
        return self


def parse_bytes(value: int | str) -> int:
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value)
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _UNITS:
        raise ValueError("must be a size such as 512MiB, 8GiB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[unit])


class Resources(_Strict):
    gpus: int = Field(0, ge=0, le=64)
    memory_limit: int | None = None  # bytes; the job file may say "8GiB"
    # TensorFlow's intra-/inter-op pools (and a gang member's gRPC queues) per worker: `auto` is
    # its CPU share, the CPUs it may run on divided among the gang's members on this host.
    threads: Literal["auto"] | Annotated[int, Field(ge=1, le=1024)] = "auto"

    @field_validator("memory_limit", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int | None:
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int | str):
            raise ValueError("must be a size such as 512MiB, 8GiB or a number of bytes")
        n = parse_bytes(v)
        if n < 64 * 2**20 or n > 2**50:
            raise ValueError("must be between 64MiB and 1PiB")
        return n


class JobSpec(_Strict):
    name: str = Field(pattern=NAME_RE)
    description: str | None = Field(None, max_length=4096)
    # Exactly one of: a build(params) function, or a script that calls ckptd.fit / ckptd.session.
    model: str | None = Field(None, min_length=3, max_length=4096)
    entrypoint: str | None = Field(None, min_length=4, max_length=4096)
    params: dict[str, Any] = Field(default_factory=dict)
    train: Train = Field(default_factory=Train)
    checkpoint: Checkpoint = Field(default_factory=Checkpoint)
    best: Best | None = None
    early_stopping: EarlyStopping | None = None
    restart: Restart = Field(default_factory=Restart)
    resources: Resources = Field(default_factory=Resources)
    distribute: Distribute = Field(default_factory=Distribute)
    # The job file's directory (set by the loader, never by the file): relative paths in params
    # are resolved against it by the worker, with the submitter's rights.
    base_dir: str | None = Field(None, max_length=4096)

    @field_validator("model")
    @classmethod
    def _build_function(cls, v: str | None) -> str | None:
        if v is not None and not ENTRY_RE.match(v):
            raise ValueError("must be FILE.py:function (relative to the job file) or package.module:function")
        return v

    @field_validator("entrypoint")
    @classmethod
    def _script(cls, v: str | None) -> str | None:
        if v is not None and (not v.endswith(".py") or "\n" in v):
            raise ValueError("must be a Python script, SCRIPT.py (relative to the job file)")
        return v

    @field_validator("params")
    @classmethod
    def _finite(cls, v: dict[str, Any]) -> dict[str, Any]:
        _check_plain(v, "params")
        return v

    @model_validator(mode="after")
    def _cross_fields(self, info: ValidationInfo) -> JobSpec:
        if (self.model is None) == (self.entrypoint is None):
            raise ValueError(
                "model: required field is missing (give either model: "
                "FILE.py:function or entrypoint: SCRIPT.py, not both)"
                if self.model is None
                else "model and entrypoint: give one of them, not both"
            )
        fit_owned = self.train.model_fields_set & FIT_OWNED
        # Only for a job file: a stored spec (spec_from_json) lists every field.
        if self.entrypoint is not None and fit_owned and (info.context or {}).get("job_file"):
            raise ValueError(
                f"train.{sorted(fit_owned)[0]}: with entrypoint, the script's "
                "ckptd.fit(...) call sets epochs, batch_size, validation_split and "
                "shuffle; remove it from the job file"
            )
        check_distribute(self.distribute, self.resources.gpus)
        if self.checkpoint.memory is not None:
            self.checkpoint.memory.check_distribute(self.distribute.on_slurm)
        if self.best:
            for key in FORMAT_FIELD_RE.findall(self.best.filepath):
                if key != "epoch" and not re.fullmatch(r"(val_)?[A-Za-z_][A-Za-z0-9_]*", key):
                    raise ValueError(f"best.filepath: bad template field {{{key}}}")
        return self


def replica_counts(spec: JobSpec) -> tuple[int, int]:
    """(wanted, fewest acceptable) devices of the job: GPUs when it has any."""
    d = spec.distribute
    if d.is_gang:  # per member; a gang is never degraded
        return spec.resources.gpus, spec.resources.gpus
    wanted = spec.resources.gpus or (d.replicas or 1)
    return wanted, min(wanted, d.min_replicas or wanted)


def _check_plain(value: Any, path: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{path}: NaN and infinity are not allowed")
    if isinstance(value, str) and len(value) > 65536:
        raise ValueError(f"{path}: string longer than 65536 characters")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_plain(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_plain(v, f"{path}[{i}]")


def spec_json(spec: JobSpec) -> str:
    d = spec.model_dump(mode="json")
    # A job without a memory tier keeps the text (and digest) it had before the section existed,
    # so `ckptd run` still resumes jobs created by an older ckptd.
    if d["checkpoint"].get("memory") is None:
        del d["checkpoint"]["memory"]
    return json.dumps(d, sort_keys=True, separators=(",", ":"))


def spec_digest(spec: JobSpec) -> str:
    return hashlib.sha256(spec_json(spec).encode()).hexdigest()


@functools.lru_cache(maxsize=256)
def spec_from_json(text: str) -> JobSpec:
    """The one door for a stored or sent spec: as strict as the job file (`every_steps: "100"`
    is refused here too), parsed once per distinct text (the daemon asks every tick; the spec
    is frozen, so sharing it is safe)."""
    return JobSpec.model_validate_json(text, strict=True)

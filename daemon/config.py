"""The daemon's own settings: `<state>/daemon.yaml` or `ckptd daemon --config FILE`.

Every field has a default, so a box without the file runs with: one job at a time (one per GPU
when GPUs are present), the socket in $RUNTIME_DIRECTORY or the state directory, admins = root and
the `ckptd-admin` group, spool intake on.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ckptd.daemon.metrics import parse_address
from ckptd.state.runretention import FinishedRetention
from ckptd.state.yamlstrict import JobFileError, load_mapping

MAX_CONFIG_BYTES = 64 * 1024
SOCKET_NAME = "ckptd.sock"


class DaemonConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    max_concurrent_jobs: int | None = Field(default=None, ge=1, le=1024)
    socket: str | None = None  # default: $RUNTIME_DIRECTORY/ckptd.sock, else <state>/ckptd.sock
    socket_group: str | None = None  # group that may use the API (mode 0660); default: ours
    admin_group: str = "ckptd-admin"  # members may act on every user's jobs
    spool: bool = True
    spool_settle_seconds: float = Field(default=1.0, ge=0.0, le=3600.0)
    # One idle worker per free slot with TensorFlow imported (~0.5 GB each): jobs start, and
    # failed workers restart, without the ~5 s import.
    warm_workers: bool = False
    # Prometheus metrics on HOST:PORT (ckptd.daemon.metrics); off unless set (or --metrics-address).
    metrics_address: str | None = None
    # Removal of finished jobs' checkpoints or run directories (ckptd.state.runretention, applied
    # by ckptd.daemon.retention_runs); absent, nothing is ever removed.
    finished_retention: FinishedRetention | None = None

    @field_validator("metrics_address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None:
            parse_address(value)  # its MetricsAddressError is a ValueError: one line, naming it
        return value


def load_config(path: Path | None, state: Path) -> DaemonConfig:
    """The explicit file, else `<state>/daemon.yaml` if present, else the defaults."""
    chosen = path if path is not None else state / "daemon.yaml"
    if path is None and not chosen.exists():
        return DaemonConfig()
    try:
        with open(chosen, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise JobFileError([f"{chosen}: cannot read: {e.strerror}"]) from e
    if len(data) > MAX_CONFIG_BYTES:
        raise JobFileError([f"{chosen}: larger than {MAX_CONFIG_BYTES} bytes"])
    raw = load_mapping(data, str(chosen))
    try:
        return DaemonConfig.model_validate(raw)
    except ValidationError as e:
        raise JobFileError(
            [f"{chosen}: {'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        ) from e


def socket_path(config: DaemonConfig, state: Path) -> Path:
    if config.socket:
        return Path(config.socket)
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return Path(runtime) / SOCKET_NAME if runtime else state / SOCKET_NAME

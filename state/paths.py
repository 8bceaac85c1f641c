"""Where ckptd keeps things: the state directory and each job's run directory."""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path


def state_dir() -> Path:
    """`$CKPTD_HOME`, else `$STATE_DIRECTORY` (systemd's StateDirectory=), else ~/.local/state/ckptd."""
    env = os.environ.get("CKPTD_HOME") or os.environ.get("STATE_DIRECTORY")
    if env:
        return Path(env.split(":")[0]).absolute()
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "ckptd"


SHM_DIR = Path("/dev/shm")


def async_segment_name(checkpoint_dir: Path) -> str:
    """The POSIX shared-memory name of the async saver's copy of the state (a worker's, for its
    writer process): one per checkpoint directory, so whoever holds the directory next, the next
    attempt or the supervisor at the job's end, can find a killed worker's segment and remove it."""
    return "ckptd-" + hashlib.sha256(str(checkpoint_dir.resolve()).encode()).hexdigest()[:20]


def remove_segment(checkpoint_dir: Path, uid: int) -> bool:
    """Unlink the async saver's segment of a job whose workers ran as `uid`, if one is left: a
    next attempt would remove it, but none follows a job's end. Only a regular file `uid` owns:
    the name can be guessed, and another user's file there is not this job's. No race with the
    check: in /dev/shm (sticky) no one but `uid` (and root) can replace a file of `uid`'s.
    True if one was removed."""
    path = SHM_DIR / async_segment_name(checkpoint_dir)
    try:
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode) or st.st_uid != uid:
            return False
        path.unlink()
    except FileNotFoundError:
        return False
    return True


@dataclass(frozen=True)
class RunDir:
    """The layout of `<state>/jobs/<job-id>/`. Workers and the supervisor agree on it here only."""

    root: Path

    @property
    def job_id(self) -> str:
        return self.root.name

    @property
    def job_file(self) -> Path:
        return self.root / "job.yaml"

    @property
    def spec_file(self) -> Path:
        return self.root / "spec.json"

    @property
    def history(self) -> Path:
        return self.root / "history.csv"

    @property
    def heartbeat(self) -> Path:
        return self.root / "heartbeat.json"

    @property
    def best_state(self) -> Path:
        # The best monitored value reached so far, written durably beside each best file, so a
        # restart from an older checkpoint never overwrites a better best file with a worse one.
        return self.root / "best_state.json"

    def warm_env(self, pid: int) -> Path:
        """The environment warm worker `pid` was given with this run (ckptd.supervisor.warm):
        its /proc environ still shows the one it started with, and recovery needs its GPUs."""
        return self.root / f".warm-{pid}.env.json"

    def attempt_dir(self, n: int) -> Path:
        return self.root / "attempts" / f"{n:04d}"

    def checkpoint_dir(self, configured: str) -> Path:
        p = Path(configured)
        return p if p.is_absolute() else self.root / p

    def output_path(self, configured: str) -> Path:
        p = Path(configured)
        return p if p.is_absolute() else self.root / p

    def member(self, index: int) -> RunDir:
        """What gang member `index` of a multi_worker job reads and writes: the chief (0) is the
        job itself; another member has its own heartbeat, events, history, best file and
        attempt logs under members/<index>/ (the chief's outputs are the job's), and shares
        the job's spec and checkpoints."""
        return self if index == 0 else MemberRunDir(self.root / "members" / str(index), self.root)


@dataclass(frozen=True)
class MemberRunDir(RunDir):
    job_root: Path

    @property
    def job_id(self) -> str:
        return self.job_root.name

    @property
    def spec_file(self) -> Path:
        return self.job_root / "spec.json"

    def checkpoint_dir(self, configured: str) -> Path:
        return RunDir(self.job_root).checkpoint_dir(configured)

    def output_path(self, configured: str) -> Path:
        # Even an absolute best.filepath: the chief writes the job's copy.
        return self.root / "outputs" / Path(configured).as_posix().lstrip("/")

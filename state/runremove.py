"""`python -m ckptd.state.runremove JOBS_DIR JOB_ID checkpoints|run_dir [CHECKPOINT_DIR]`: what
retention removes from a finished job's run directory (ckptd.daemon.retention_runs starts it).

It runs with the rights of the run directory's owner, never the daemon's: the directory is the
owner's, who may have planted symlinks or hard links anywhere in it, and as the owner the worst
such a name can do is remove the owner's own files. Besides, no symlink is ever followed: every
directory is opened relative to its parent without following one, a symlink found is unlinked,
and directories go through descriptors (shutil.rmtree's fd-based walk). Prints one JSON object:
files and bytes removed, a note, and the errors met (removal goes on past them).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import stat
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ckptd.state.runretention import is_checkpoint_entry

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_ERRORS = 10
SUPERVISOR_LOCK = ".supervisor.lock"  # the name ckptd.daemon.jobs.lock_job gives it


@dataclass
class Removed:
    files: int = 0
    bytes: int = 0
    note: str | None = None
    errors: list[str] = field(default_factory=list)
    # The checkpoints are not in the run directory (an absolute checkpoint.dir, or a symlink
    # there): not touched, so their rows in the store stay restorable.
    elsewhere: bool = False


def open_under(fd: int, parts: tuple[str, ...]) -> int:
    """A descriptor of the directory `parts` below `fd`, no symlink followed (ELOOP/ENOTDIR)."""
    cur = os.dup(fd)
    try:
        for name in parts:
            nxt = os.open(name, _DIR, dir_fd=cur)
            os.close(cur)
            cur = nxt
    except BaseException:
        os.close(cur)
        raise
    return cur


def remove_checkpoints(run_fd: int, checkpoint_dir: str) -> Removed:
    """What checkpointing wrote in the checkpoint directory (relative to the run directory);
    whatever else is there stays (ckptd.state.runretention.is_checkpoint_entry)."""
    out = Removed()
    parts = Path(checkpoint_dir).parts
    if Path(checkpoint_dir).is_absolute() or ".." in parts:
        out.note = f"checkpoint.dir {checkpoint_dir} is outside the run directory: not touched"
        out.elsewhere = True
        return out
    try:
        fd = open_under(run_fd, parts)
    except FileNotFoundError:
        out.note = "no checkpoint directory"
        return out
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        out.note = f"{checkpoint_dir} is a symlink or not a directory: not followed"
        out.elsewhere = True
        return out
    try:
        _remove_names(fd, [n for n in os.listdir(fd) if is_checkpoint_entry(n)], out)
    finally:
        os.close(fd)
    return out


def empty_run_dir(run_fd: int) -> Removed:
    """Everything in the run directory; the daemon removes the then empty directory itself (it
    is in `<state>/jobs/`, the daemon's)."""
    out = Removed()
    _remove_names(run_fd, os.listdir(run_fd), out)
    return out


def _remove_names(fd: int, names: list[str], out: Removed) -> None:
    for name in sorted(names):
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                files, size = _measure(fd, name)
                shutil.rmtree(name, dir_fd=fd)
            else:
                files, size = 1, st.st_size if stat.S_ISREG(st.st_mode) else 0
                os.unlink(name, dir_fd=fd)
        except FileNotFoundError:
            continue
        except OSError as e:
            if len(out.errors) < MAX_ERRORS:
                out.errors.append(f"{name}: {e.strerror or e}")
            continue
        out.files += files
        out.bytes += size
    os.fsync(fd)  # the removals are durable before the daemon records them


def _measure(fd: int, name: str) -> tuple[int, int]:
    """Files and bytes below directory `name` (symlinks counted, never followed)."""
    files = size = 0
    for _, dirs, names, dfd in os.fwalk(name, dir_fd=fd, follow_symlinks=False):
        for n in dirs + names:  # a symlink to a directory is listed with the directories
            st = os.stat(n, dir_fd=dfd, follow_symlinks=False)
            files += not stat.S_ISDIR(st.st_mode)
            size += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return files, size


def remove(jobs_dir: Path, job_id: str, what: str, checkpoint_dir: str) -> Removed:
    # `jobs_dir` is the daemon's own `<state>/jobs`; from there on nothing is followed.
    parent = os.open(jobs_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        run_fd = open_under(parent, (job_id,))
    finally:
        os.close(parent)
    try:
        lock = _hold_supervisor_lock(run_fd)
        try:
            return (
                remove_checkpoints(run_fd, checkpoint_dir) if what == "checkpoints" else empty_run_dir(run_fd)
            )
        finally:
            if lock is not None:
                os.close(lock)
    finally:
        os.close(run_fd)


def _hold_supervisor_lock(run_fd: int) -> int | None:
    """The lock a foreground `ckptd run --resume` holds (ckptd.daemon.jobs.lock_job): held, the
    job is being resumed and nothing is removed (BlockingIOError); taken, no resume starts until
    the removal is over. Absent, no supervisor ever ran in the run directory."""
    try:
        fd = os.open(SUPERVISOR_LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=run_fd)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _plain(name: str) -> bool:
    """One name inside the jobs directory (a job id), not a path out of it."""
    return bool(name) and "/" not in name and name not in (".", "..")


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4) or argv[2] not in ("checkpoints", "run_dir") or not _plain(argv[1]):
        print(
            "usage: python -m ckptd.state.runremove JOBS_DIR JOB_ID checkpoints|run_dir [DIR]",
            file=sys.stderr,
        )
        return 2
    try:
        done = remove(Path(argv[0]), argv[1], argv[2], argv[3] if len(argv) == 4 else "checkpoints")
    except OSError as e:
        print(f"{argv[1]}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(done)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

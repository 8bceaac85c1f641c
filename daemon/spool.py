"""Spool intake: a job file dropped into the spool is submitted exactly once, as its owner.

Whose job a file is must come from something its mover cannot forge, as with cron's per-user
crontabs: a daemon that runs other users' jobs gives each member of the socket group a spool
directory of their own, `spool/<name>/` (theirs, group: the daemon's, 0770): nobody else can
put a file there. A file runs as its owner only if it lies in a directory of that same owner
that no other user may write, is not writable by group or others, is a regular file with one
link. (A daemon of one user takes files from `spool/` itself, its own directory.)

Only complete files are taken: names starting with "." are ignored (write `.job.yaml.tmp`, then
rename into place), and a file must be unchanged for `settle` seconds. The submit key is derived
from the file's content, name and owner, so a daemon killed between "job created" and "file moved"
finds the job on restart instead of creating a second one. Accepted files move to
`spool/accepted/`, rejected ones to `spool/rejected/` with `NAME.error.txt` beside them. The
watchdog observer only wakes the main loop; the loop does the work.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import math
import os
import pwd
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from structlog.typing import FilteringBoundLogger

from ckptd.daemon import mounts
from ckptd.daemon.backend import submit_job
from ckptd.state import submissions
from ckptd.state.durable import atomic_write_text, fsync_dir
from ckptd.state.jobfile import parse_job
from ckptd.state.states import TERMINAL, JobState
from ckptd.state.store import Store
from ckptd.state.submissions import account_owner
from ckptd.state.yamlstrict import JobFileError
from ckptd.supervisor import identity

SUFFIXES = (".yaml", ".yml")
ENDED = TERMINAL | {JobState.FAILED}
MAX_JOB_FILE = 1024 * 1024
USER_DIRS_SECONDS = 60.0


@dataclass(frozen=True)
class Intake:
    name: str
    outcome: str  # accepted | rejected | duplicate
    job_id: str | None = None
    problems: tuple[str, ...] = ()


class _Refused(Exception):
    pass


def _read_own_file(path: Path) -> tuple[bytes, os.stat_result]:
    """The file's bytes and identity. Not a symlink, not a FIFO, and one link only: a hard link
    to somebody else's file would make them the owner of a job they never submitted."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise _Refused(
            f"cannot read: {e.strerror}; make it readable by the daemon (chmod o+r, or the daemon's group)"
        ) from e
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Refused("not a regular file")
        if st.st_nlink != 1:
            raise _Refused(f"has {st.st_nlink} hard links; drop a file of your own (cp, not ln)")
        data = f.read(MAX_JOB_FILE + 1)
    if len(data) > MAX_JOB_FILE:
        raise _Refused(f"larger than {MAX_JOB_FILE} bytes")
    return data, st


def refusal(file: os.stat_result, directory: os.stat_result, daemon_gid: int) -> str | None:
    """Why a file may not run as its owner, or None. The mover of a file keeps its owner and
    mode: only a directory that nobody but that owner (and the daemon) can write proves that the
    owner put it there; only a file nobody else can write proves the content is theirs."""
    if file.st_uid != directory.st_uid:
        return (
            f"owned by uid {file.st_uid} but found in the spool directory of uid {directory.st_uid}: "
            "drop job files in your own spool directory (spool/<your user name>/)"
        )
    if directory.st_mode & 0o002 or (directory.st_mode & 0o020 and directory.st_gid != daemon_gid):
        return (
            "its directory is writable by other users, so who put it there is unknown: drop "
            "job files in your own spool directory (spool/<your user name>/, mode 0770 or "
            "stricter, group: the daemon's)"
        )
    if file.st_mode & 0o022:
        return (
            "is writable by group or others, so anybody could have changed it: chmod go-w, then drop it again"
        )
    return None


def submitters(group: str | None) -> list[tuple[str, int]]:
    """(name, uid) of every member of the socket group: whoever may submit gets a spool directory."""
    if group is None:
        return []
    try:
        g = grp.getgrnam(group)
    except KeyError:
        return []
    names = set(g.gr_mem) | {pw.pw_name for pw in pwd.getpwall() if pw.pw_gid == g.gr_gid}
    found = []
    for name in sorted(names):
        with contextlib.suppress(KeyError):
            found.append((name, pwd.getpwnam(name).pw_uid))
    return found


def spool_key(data: bytes, name: str, owner_uid: int) -> str:
    """What survives a crash or a remount on any file system: the content, the name, the owner
    (inode, device and mtime do not on FUSE or network file systems: one file became two jobs)."""
    digest = hashlib.sha256(data).hexdigest()[:32]
    return f"spool:{owner_uid}:{hashlib.sha256(name.encode()).hexdigest()[:8]}:{digest}"


def free_key(store: Store, owner_uid: int, base: str) -> tuple[str, str | None]:
    """The key for this drop, and the job it already made if it is a re-scan after a crash (that
    job has not ended). The same file dropped again after its job ended is a new submission."""
    key, n = base, 1
    while (existing := submissions.by_key(store, owner_uid, key)) is not None:
        if store.job(existing).state not in ENDED:
            return key, existing
        n += 1
        key = f"{base}#{n}"
    return key, None


class Spool:
    def __init__(
        self, home: Path, settle: float, log: FilteringBoundLogger, group: str | None = None
    ) -> None:
        """`group`: the socket group, whose members get spool directories of their own (a daemon
        that runs other users' jobs); None: a daemon of one user, which takes `spool/` itself."""
        self.dir = home / "spool"
        self.settle, self.log, self.group = settle, log, group
        for sub in (self.dir, self.dir / "accepted", self.dir / "rejected"):
            sub.mkdir(parents=True, exist_ok=True)
        self.observer: Any = None
        self._dirs_made = -math.inf

    def make_user_dirs(self) -> None:
        """`spool/<name>/` for each submitter who has none: theirs, group the daemon's, 0770 (the
        daemon has no CAP_DAC_OVERRIDE under the unit: it reads and moves through its group)."""
        for name, uid in submitters(self.group):
            path = self.dir / name
            if name in ("accepted", "rejected") or os.path.lexists(path):
                continue
            try:
                path.mkdir(mode=0o700)
                os.chmod(path, 0o770)  # before the chown: the unit has no CAP_FOWNER
                os.chown(path, uid, os.getegid())
            except OSError as e:
                self.log.warning("spool.dir_failed", user=name, error=str(e))
                continue
            self.log.info("spool.dir_created", user=name, dir=str(path))

    def watch(self, wake: threading.Event) -> None:
        """Wake the main loop on changes (inotify through watchdog); scanning stays periodic too."""
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        class _Wake(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                wake.set()

        self.observer = Observer()
        self.observer.schedule(_Wake(), str(self.dir), recursive=True)
        self.observer.daemon = True
        self.observer.start()

    def stop(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(timeout=5)

    def _places(self) -> list[Path]:
        """spool/ and each user's directory in it (never through a symlink)."""
        places = [self.dir]
        with contextlib.suppress(OSError):
            for entry in sorted(self.dir.iterdir()):
                if entry.name not in ("accepted", "rejected") and stat.S_ISDIR(entry.lstat().st_mode):
                    places.append(entry)
        return places

    def candidates(self, now: float) -> list[Path]:
        found = []
        for place in self._places():
            with contextlib.suppress(OSError):
                for entry in sorted(place.iterdir()):
                    if entry.name.startswith(".") or not entry.name.endswith(SUFFIXES):
                        continue
                    st = entry.lstat()
                    if stat.S_ISREG(st.st_mode) and now - st.st_mtime >= self.settle:
                        found.append(entry)
        return found

    def scan(self, store: Store, home: Path) -> list[Intake]:
        if self.group is not None and time.monotonic() - self._dirs_made >= USER_DIRS_SECONDS:
            self.make_user_dirs()  # new members of the group get theirs within a minute
            self._dirs_made = time.monotonic()
        return [self.take(store, home, path) for path in self.candidates(time.time())]

    def take(self, store: Store, home: Path, path: Path) -> Intake:
        try:
            data, st = _read_own_file(path)
            why = refusal(st, path.parent.lstat(), os.getegid())
        except _Refused as e:
            why = str(e)
        except OSError as e:  # the directory went away meanwhile: its file with it
            why = f"cannot check its directory: {e.strerror}"
        if why is not None:
            return self._reject(path, [f"{path}: {why}"])
        owner = account_owner(st.st_uid)  # the file's owner: whose rights the job runs with
        key, existing = free_key(store, owner.uid, spool_key(data, path.name, owner.uid))
        if existing is not None:  # created before a crash; finish the move
            self._move(path, "accepted")
            return Intake(path.name, "duplicate", existing)
        if identity.needs_switch(owner) and not identity.can_switch_users():
            return self._reject(
                path,
                [
                    f"{path}: owned by uid {owner.uid}, but this daemon runs "
                    f"as uid {os.geteuid()} and may not start jobs as other "
                    "users"
                ],
            )
        try:
            spec = parse_job(data, str(path), self.dir, check=False)
        except JobFileError as e:
            return self._reject(path, e.problems)
        if problems := mounts.check_outputs(spec, str(path)):
            return self._reject(path, problems)
        job = submit_job(store, home, spec, data, str(self.dir / "accepted" / path.name), owner, 0, key)
        self._move(path, "accepted")
        self.log.info(
            "job.submitted", job_id=job.id, name=job.name, owner_uid=owner.uid, source="spool", file=path.name
        )
        return Intake(path.name, "accepted", job.id)

    def _reject(self, path: Path, problems: list[str]) -> Intake:
        target = self._move(path, "rejected")
        note = target.with_name(target.name + ".error.txt")
        atomic_write_text(note, "\n".join(problems) + "\n")
        with contextlib.suppress(OSError):  # the submitter's to read (by name: not listable)
            os.chmod(note, 0o600)  # before the chown: the unit has no CAP_FOWNER
            os.chown(note, target.lstat().st_uid, -1)
        self.log.warning("spool.rejected", file=path.name, problems=problems)
        return Intake(path.name, "rejected", None, tuple(problems))

    def _move(self, path: Path, where: str) -> Path:
        target = self.dir / where / path.name
        if target.exists():  # never overwrite an earlier file of the same name
            target = target.with_name(
                f"{path.stem}.{time.strftime('%Y%m%dT%H%M%S')}.{os.getpid()}{path.suffix}"
            )
        os.rename(path, target)
        fsync_dir(target.parent)
        fsync_dir(self.dir)
        return target

"""Create a job (run directory + store row) or pick the one to resume."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import stat
from collections.abc import Callable
from pathlib import Path

import psutil

from ckptd.state.durable import atomic_write_bytes, atomic_write_text, fsync_dir
from ckptd.state.jobspec import JobSpec, spec_digest, spec_from_json, spec_json
from ckptd.state.paths import RunDir
from ckptd.state.protocol import EXIT_OK, Heartbeat, Phase, read_exit_code
from ckptd.state.states import RESUMABLE, STALE, AttemptClass, JobState
from ckptd.state.store import Attempt, Job, Store, new_job_id
from ckptd.state.submissions import Owner
from ckptd.supervisor import contain, identity, ledger
from ckptd.supervisor.process import worker_module
from ckptd.supervisor.runner import STOP_GRACE_SECONDS


class JobBusy(Exception):
    pass


RUN_DIR_MODE = 0o2750  # setgid: what the worker writes keeps the daemon's group, which reads it


def create_run(
    state: Path, spec: JobSpec, raw: bytes, record: Callable[[str, RunDir], Job], owner: Owner | None = None
) -> Job:
    """Run directory first (job file, spec, fsync), then `record` writes the store row(s) in one
    transaction: a job the store acknowledges is complete; a failure leaves no directory.

    The directory is born unreachable for users (2750, ours, group: the daemon's) and handed to
    `owner` only once it is complete, so nobody can plant a symlink in it while the daemon writes
    there. From then on it is the owner's: the daemon only reads it (through its group), and
    never writes into it again."""
    job_id = new_job_id(spec.name)
    jobs_dir = state / "jobs"
    jobs_dir.mkdir(parents=True, exist_ok=True)
    run = RunDir(jobs_dir / job_id)
    _make_run_dir(run.root)
    try:
        atomic_write_bytes(run.job_file, raw)
        atomic_write_text(run.spec_file, spec_json(spec))
        _hand_over(run, owner or identity.me())
        fsync_dir(run.root)
        fsync_dir(run.root.parent)
        return record(job_id, run)
    except BaseException:
        shutil.rmtree(run.root, ignore_errors=True)
        raise


def _make_run_dir(path: Path) -> None:
    """mkdir 0750, setgid with the daemon's group. Under systemd's RestrictSUIDSGID= no mode
    with S_ISGID may be asked for: the bit and the group come from `jobs/` (2711, tmpfiles,
    ckptd.daemon.service.share_dirs), which new directories inherit."""
    old = os.umask(0o027)  # the unit's UMask=0077 would leave the daemon's group out
    try:
        path.mkdir(mode=0o750)
    finally:
        os.umask(old)
    st = path.stat()
    if not st.st_mode & stat.S_ISGID or st.st_gid != os.getegid():
        os.chown(path, -1, os.getegid())
        os.chmod(path, RUN_DIR_MODE)  # outside such a sandbox (`ckptd run`, tests): ask for it


def _hand_over(run: RunDir, owner: Owner) -> None:
    group = os.getegid()
    for path in (run.job_file, run.spec_file):
        os.chmod(path, 0o640)
        os.chown(path, owner.uid, group)
    os.chown(run.root, owner.uid, group)  # Linux keeps a directory's setgid bit through chown


def reclaim_run(run: RunDir, owner: Owner) -> bool:
    """A run directory made before runs belonged to their submitters (ckptd 0.2 and earlier: the
    service user's) becomes `owner`'s, as if created now. Its tree is rebuilt by renames into new
    directories, which inherit `jobs/`'s group and setgid bit (no chmod with S_ISGID: the unit's
    RestrictSUIDSGID= refuses it). Only the daemon could write there until now, so nothing in it
    was planted by a user. False if it already was the owner's."""
    try:
        st = run.root.lstat()
    except FileNotFoundError:  # removed by finished_retention (remove: run_dir): nothing to hand over
        return False
    if st.st_uid == owner.uid or not stat.S_ISDIR(st.st_mode):
        return False
    old = run.root.with_name(run.root.name + ".legacy")
    os.rename(run.root, old)
    _rebuild(old, run.root, owner)
    fsync_dir(run.root.parent)
    return True


def _rebuild(src: Path, dst: Path, owner: Owner) -> None:
    _make_run_dir(dst)
    for entry in os.scandir(src):
        target = dst / entry.name
        if entry.is_dir(follow_symlinks=False):
            _rebuild(Path(entry.path), target, owner)
        else:
            os.rename(entry.path, target)
            os.chown(target, owner.uid, os.getegid(), follow_symlinks=False)
    os.rmdir(src)
    os.chown(dst, owner.uid, os.getegid())


def supervision_dir(state: Path, job_id: str) -> Path:
    """The daemon's own per-job files (its events, its lock, launch output): never in the run
    directory, which belongs to the job's owner."""
    path = state / "supervision" / job_id
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def create_job(store: Store, state: Path, spec: JobSpec, raw: bytes, job_file: Path) -> Job:
    return create_run(
        state,
        spec,
        raw,
        lambda job_id, run: store.create_job(
            job_id, spec.name, spec_json(spec), spec_digest(spec), str(job_file.resolve()), str(run.root)
        ),
    )


def find_resumable(store: Store, spec: JobSpec) -> Job | None:
    """The newest job with this name, if it is resumable and its spec is identical."""
    job = store.latest_by_name(spec.name)
    if job and job.state in RESUMABLE | STALE and job.spec_digest == spec_digest(spec):
        return job
    return None


def spec_of(job: Job) -> JobSpec:
    return spec_from_json(job.spec_json)


def lock_job(where: Path) -> int:
    """One supervisor per job: `ckptd run` twice on the same job must not start two workers.
    `where`: the run directory (`ckptd run`) or the job's supervision directory (the daemon)."""
    fd = os.open(where / ".supervisor.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        os.close(fd)
        raise JobBusy(f"job in {where} is already being supervised by another ckptd") from e
    return fd


def works_for(proc: psutil.Process, run: RunDir) -> bool:
    """Whether `proc` is a worker of `run`: its command line names the run directory, or it is a
    warm worker (ckptd.supervisor.warm) or one forked by a job's fork server
    (ckptd.supervisor.zygote) that was handed this run and moved into it."""
    try:
        cmd = proc.cmdline()
        if worker_module() not in cmd:
            return False
        if str(run.root) in cmd:
            return True
        if "--warm" not in cmd and "--zygote" not in cmd:  # a worker forked by a zygote has its argv
            return False
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    try:
        return Path(proc.cwd()) == run.root.resolve()
    except psutil.AccessDenied:  # another user's process, and no CAP_SYS_PTRACE (the unit)
        return True  # callers have matched its pid and start time to the attempt they started
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False


def stop_orphan(pid: int, run: RunDir, timeout: float = STOP_GRACE_SECONDS) -> str:
    """A worker of a lost supervisor may still run (own session): ask it to save, then kill."""
    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return "worker gone"
    if not works_for(proc, run):
        return "worker gone (pid reused)"
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
        return "orphan worker stopped with SIGTERM (saved on the way out)"
    except psutil.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        return "orphan worker killed with SIGKILL"


def end_tree(a: Attempt) -> str:
    """Whatever a lost attempt's worker left running in its cgroup (a setsid child that
    outlived it): killed, the cgroup removed (ckptd.supervisor.contain)."""
    if a.pid is None:
        return ""
    tree = contain.instance().of(a.pid, a.pid_started)
    killed = tree.kill()
    tree.remove()
    return f"; {killed} leftover process(es) of the attempt killed" if killed else ""


def stop_gang(chief: int | None, run: RunDir) -> str:
    """A multi_worker gang of a lost supervisor: never adopted (its members would need a
    supervisor that watches them all). The chief saves and leaves; the other members, blocked
    in a collective without it, are killed."""
    what = stop_orphan(chief, run) if chief else "no chief"
    killed = 0
    for proc in psutil.process_iter():
        if proc.pid != chief and works_for(proc, run) and "--warm" not in _cmdline(proc):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
                killed += 1
    return f"gang: {what}; {killed} other member(s) killed"


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def unsupervised_end(exit_code: int | None, done_beat: bool) -> AttemptClass:
    """How an attempt whose supervisor was gone (frozen, killed) ended, from its own records:
    the worker's exit_code file, and whether its last heartbeat said DONE (the final commit is
    durable: nothing of the job was at stake any more). Anything else is `lost`."""
    if exit_code == EXIT_OK or (exit_code is None and done_beat):
        return AttemptClass.SUCCEEDED
    return AttemptClass.LOST


def finished_unsupervised(run: RunDir, a: Attempt) -> tuple[AttemptClass, int | None]:
    """(class, exit code) of a dead attempt, read from the files its worker left."""
    code = read_exit_code(run.attempt_dir(a.n), run.root)
    beat = Heartbeat.read(run.heartbeat, run.root)
    done = beat is not None and beat.attempt == a.n and beat.phase == Phase.DONE
    return unsupervised_end(code, done), code


def end_lost(store: Store, job_id: str, a: Attempt, evidence: str, run: RunDir | None = None) -> AttemptClass:
    """Close an attempt whose supervisor disappeared: `lost`, unless (given its run directory)
    its worker's own records say it finished; what was found as evidence."""
    klass, code = finished_unsupervised(run, a) if run is not None else (AttemptClass.LOST, None)
    if klass == AttemptClass.SUCCEEDED:
        evidence += f"; it had finished (exit code {code}, last heartbeat phase done)"
    store.end_attempt(
        job_id,
        a.n,
        exit_code=code,
        signal=None,
        klass=klass,
        evidence=evidence,
        error_summary=None,
        restored_step=a.restored_step,
        last_step=a.last_step,
    )
    return klass


def reconcile_lost(store: Store, job: Job) -> Job:
    """With the job lock held: a job the store says is running, but that no supervisor holds, lost
    its supervisor (crash, SIGKILL, power cut). Close its open attempts as `lost`."""
    if job.state not in STALE:
        return job
    run = RunDir(Path(job.run_dir))
    gang = spec_of(job).distribute.is_gang
    finished = False
    for a in store.attempts(job.id):
        if a.ended_at is None:
            what = stop_gang(a.pid, run) if gang else stop_orphan(a.pid, run) if a.pid else "no worker"
            what += end_tree(a)
            klass = end_lost(store, job.id, a, f"supervisor lost; {what}", None if gang else run)
            finished = klass == AttemptClass.SUCCEEDED
    ledger.catch_up(store, job.id, run.root)  # its commits since the lost supervisor's last read
    if finished and job.state == JobState.RUNNING:
        return store.transition(job.id, JobState.SUCCEEDED, "finished while its supervisor was lost")
    return store.transition(job.id, JobState.INTERRUPTED, "supervisor was lost")

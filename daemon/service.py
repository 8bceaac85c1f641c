"""`ckptd daemon`: one per state directory. Lock → store → recovery → API → READY=1 → main loop.

The main loop only observes (signals recorded by handlers, finished job threads, the queue, the
spool) → decides (ckptd.daemon.schedule) → acts (start threads, ask them to stop). Every loop
iteration pings the systemd watchdog, so a blocked loop gets the service restarted.
"""

from __future__ import annotations

import fcntl
import grp
import os
import signal
import sqlite3
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

from structlog.typing import FilteringBoundLogger

from ckptd.daemon import jobs, metrics
from ckptd.daemon.api import ApiServer
from ckptd.daemon.backend import ApiBackend, Registry
from ckptd.daemon.config import DaemonConfig, socket_path
from ckptd.daemon.drain import Drainer
from ckptd.daemon.notify import Notifier
from ckptd.daemon.recovery import recover, remove_ended_tiers
from ckptd.daemon.retention_runs import RunRetention
from ckptd.daemon.running import RunningJob, ask_stop, start_job
from ckptd.daemon.schedule import Queued, pick_jobs, slot_count, warm_wanted
from ckptd.daemon.sockets import bound
from ckptd.daemon.spool import Spool
from ckptd.state import orphans
from ckptd.state import protocol as p
from ckptd.state.paths import RunDir
from ckptd.state.states import RESUMABLE, STALE, JobState
from ckptd.state.store import Store, StoreError
from ckptd.state.submissions import Owner, managed_jobs, owner_of, recent_owners, submission
from ckptd.supervisor import cgroups, contain
from ckptd.supervisor.gpus import detect_gpus
from ckptd.supervisor.identity import can_switch_users, me
from ckptd.supervisor.warm import WarmPool

LOOP_SECONDS = 0.5
SUBMITTERS_GROUP = "ckptd-users"
SPOOL_SCAN_SECONDS = 2.0


class AlreadyRunning(Exception):
    pass


def lock_instance(home: Path) -> int:
    fd = os.open(home / "daemon.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise AlreadyRunning(
            f"another ckptd daemon (pid {holder}) already serves {home}; stop it first (systemctl stop ckptd)"
        ) from e
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def share_dirs(home: Path) -> None:
    """A daemon that runs users' jobs as those users: each can reach their own run directory
    (`<state>/jobs/ID`, theirs) by name, but list nothing; the store and the daemon's own files
    stay private (ckptd.state.store); members of the socket's group drop job files in spool
    directories of their own (ckptd.daemon.spool). Under the unit,
    systemd-tmpfiles made these already (RestrictSUIDSGID= would refuse the setgid chmod)."""
    gid = os.getegid()
    _ensure(home, 0o711, None)
    _ensure(home / "jobs", 0o2711, gid)  # run directories inherit the group and the bit
    # Not writable by users: each submitter drops files in spool/<name>/, theirs (daemon/spool.py).
    _ensure(home / "spool", 0o711, gid)
    for sub in ("accepted", "rejected"):  # a submitter reads its own file's error by name
        _ensure(home / "spool" / sub, 0o711, None)


def _ensure(path: Path, mode: int, gid: int | None) -> None:
    path.mkdir(exist_ok=True)
    st = path.stat()
    if gid is not None and st.st_gid != gid:
        os.chown(path, -1, gid)
    if stat.S_IMODE(st.st_mode) != mode or (gid is not None and st.st_gid != gid):
        try:
            os.chmod(path, mode)
        except PermissionError as e:
            raise OSError(
                e.errno,
                f"cannot set mode {mode:o} on {path} ({e.strerror}); create it "
                "as systemd/ckptd.tmpfiles says: systemd-tmpfiles --create",
            ) from e


def default_socket_group(config: DaemonConfig) -> str | None:
    """The configured group; else, for a daemon that runs other users' jobs, `ckptd-users` if it
    exists (systemd/ckptd.sysusers makes it): with neither, only the daemon's own group could
    submit, and under the unit it has no members."""
    if config.socket_group or not can_switch_users():
        return config.socket_group
    try:
        grp.getgrnam(SUBMITTERS_GROUP)
    except KeyError:
        return None
    return SUBMITTERS_GROUP


class Daemon:
    def __init__(
        self, home: Path, config: DaemonConfig, log: FilteringBoundLogger, notifier: Notifier | None = None
    ) -> None:
        self.home, self.config, self.log = home, config, log
        self.notifier = notifier or Notifier()
        self.registry = Registry()
        self.wake = threading.Event()
        self.signals: list[int] = []
        self.gpus = detect_gpus()
        self.slots = slot_count(config.max_concurrent_jobs, self.gpus)
        self.warm = WarmPool(home, log)
        self.drainer = Drainer(home, log)
        self.queued = 0
        self._status = ""
        self.retention = RunRetention(home, config.finished_retention, log)

    def _record_signal(self, signum: int, _frame: FrameType | None) -> None:
        # Only record; the main loop acts within LOOP_SECONDS. Not wake.set(): the handler runs in
        # the main thread, which may be inside wake.wait() holding the Event's lock, and set()
        # would wait for that lock forever (seen once in CI: SIGTERM never handled).
        self.signals.append(signum)

    def serve(self) -> int:
        lock = lock_instance(self.home)
        store = Store.open(self.home)
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, self._record_signal)
        try:
            group = default_socket_group(self.config)
            if can_switch_users():
                share_dirs(self.home)
            self._recover(store)
            sock = socket_path(self.config, self.home)
            backend = ApiBackend(
                self.home,
                self.registry,
                self.config.admin_group,
                self.wake,
                self.health,
                self.log,
                self.drainer,
            )
            server = bound(sock, lambda: ApiServer(str(sock), backend), group)
            threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="api", daemon=True
            ).start()
            spool = self._start_spool()
            self.log.info(
                "daemon.ready",
                pid=os.getpid(),
                socket=str(sock),
                slots=self.slots,
                gpus=self.gpus,
                state_dir=str(self.home),
            )
            how, detail = cgroups.enforcement()  # before any job asks for memory_limit
            self.log.info("memory.enforcement", how=how, detail=detail)
            held = contain.instance().choice  # how every attempt's processes end with it
            self.log.info("containment", how=held.kind, detail=held.why)
            if self.config.metrics_address:
                bound_to = metrics.serve(self.config.metrics_address, self.home)
                self.log.info("metrics.serving", address=bound_to, path="/metrics")
            self.notifier.send("READY=1", f"MAINPID={os.getpid()}")
            self._loop(store, spool)
            self._shutdown(server, spool, sock)
            backend.close()
            # A clean stop leaves nothing in the WAL: ckptd.db alone is then a full backup.
            store.checkpoint_wal()
            return 0
        finally:
            store.close()
            os.close(lock)

    def _recover(self, store: Store) -> None:
        if can_switch_users():
            self._reclaim_legacy_runs(store)
        found = recover(store)
        for job, adopted, devices in found.adopted:
            self.log.info(p.Event.WORKER_ADOPTED, job_id=job.id, attempt=adopted.n, pid=adopted.pid)
            self.registry.running[job.id] = start_job(
                self.home,
                job.id,
                jobs.spec_of(job),
                Path(job.run_dir),
                devices,
                self.log,
                self._owner(store, job.id),
                adopted,
                self.warm,
            )
        for job_id, n, evidence in found.lost:  # as the supervisor would have, had it lived
            self.log.warning(
                p.Event.WORKER_EXITED, job_id=job_id, attempt=n, exit_class="lost", evidence=evidence
            )
            p.append_event(
                jobs.supervision_dir(self.home, job_id) / p.EVENTS_FILE,
                p.Event.WORKER_EXITED,
                attempt=n,
                exit_class="lost",
                evidence=evidence,
            )
        for job_id in found.requeued:
            self.log.info("job.requeued", job_id=job_id, reason="daemon restarted")
        remove_ended_tiers(store, self.log)
        self._report_orphans(store)

    def _report_orphans(self, store: Store) -> None:
        """Run directories the store does not know (a lost WAL, a store restored from an old
        backup): never silently forgotten; `ckptd recover --adopt` puts them back."""
        lost = orphans.find(store, self.home)
        if lost:
            self.log.warning(
                p.Event.STORE_ORPHANS,
                count=len(lost),
                run_dirs=[str(o.run.root) for o in lost[:20]],
                advice=f"ckptd --home {self.home} recover lists them; recover --adopt queues them again",
            )

    def _reclaim_legacy_runs(self, store: Store) -> None:
        """Jobs still to run that were queued by a ckptd whose run directories were its own."""
        for job, sub in managed_jobs(store, RESUMABLE | STALE | {JobState.QUEUED}):
            run = RunDir(Path(job.run_dir))
            try:
                if jobs.reclaim_run(run, owner_of(sub)):
                    self.log.info("job.run_dir_reclaimed", job_id=job.id, owner_uid=sub.owner_uid)
            except OSError as e:
                self.log.error("job.run_dir_reclaim_failed", job_id=job.id, error=str(e))

    def _start_spool(self) -> Spool | None:
        if not self.config.spool:
            return None
        group = default_socket_group(self.config) if can_switch_users() else None
        spool = Spool(self.home, self.config.spool_settle_seconds, self.log, group)
        spool.watch(self.wake)
        return spool

    def health(self) -> dict[str, Any]:
        with self.registry.lock:
            running = sorted(self.registry.running)
        return {
            "pid": os.getpid(),
            "state_dir": str(self.home),
            "slots": self.slots,
            "gpus": self.gpus,
            "running": running,
            "queued": self.queued,
            "warm_workers": self.warm.size(),
            "stopping": bool(self.signals),
            "drain": asdict(self.drainer.state) if self.drainer.state else None,
        }

    def _loop(self, store: Store, spool: Spool | None) -> None:
        last_scan = 0.0
        while not self.signals:
            now = time.monotonic()
            self.notifier.watchdog(now)
            self._guarded("reap", lambda: self._reap(store))
            woken = self.wake.is_set()
            self.wake.clear()
            if spool is not None and (woken or now - last_scan >= SPOOL_SCAN_SECONDS):
                self._guarded("spool", lambda: spool.scan(store, self.home))
                last_scan = now
            self._guarded("schedule", lambda: self._schedule(store))
            self._guarded("warm", lambda: self._keep_warm(store))
            self._guarded("retention", lambda: self.retention.step(store, self.registry))
            self._report_status()
            self.wake.wait(LOOP_SECONDS)

    def _guarded(self, what: str, step: Callable[[], object]) -> None:
        """A full disk or a busy store fails one iteration, not the daemon: the next one retries."""
        try:
            step()
        except (OSError, sqlite3.Error, StoreError) as e:
            self.log.error("daemon.loop_error", step=what, error=f"{type(e).__name__}: {e}")
            self.wake.wait(LOOP_SECONDS)

    def _reap(self, store: Store) -> None:
        with self.registry.lock:
            for job_id, rj in list(self.registry.running.items()):
                if rj.thread is not None and not rj.thread.is_alive():
                    self.drainer.requeue(store, rj)
                    del self.registry.running[job_id]

    def _schedule(self, store: Store) -> None:
        queue = managed_jobs(store, frozenset({JobState.QUEUED}))
        self.queued = len(queue)
        if self.drainer.active:  # ckptd drain: nothing starts until undrain
            return
        with self.registry.lock:
            running = self.registry.running
            busy = {d for rj in running.values() for d in rj.devices}
            free = [g for g in self.gpus if g not in busy]
            wanted = [Queued(job.id, jobs.spec_of(job).resources.gpus) for job, _ in queue]
            for job_id, devices in pick_jobs(wanted, len(running), self.slots, free):
                self._start(store, job_id, devices)

    def _start(self, store: Store, job_id: str, devices: list[int]) -> None:
        try:
            job = store.transition(
                job_id, JobState.RUNNING, "started by the daemon", expect=frozenset({JobState.QUEUED})
            )
        except Exception as e:  # cancelled a moment ago: the table said no
            self.log.info("job.not_started", job_id=job_id, reason=str(e))
            return
        self.log.info(
            "job.started", job_id=job_id, devices=devices, last_committed_step=job.last_committed_step
        )
        owner = self._owner(store, job_id)
        self.registry.running[job_id] = start_job(
            self.home,
            job_id,
            jobs.spec_of(job),
            Path(job.run_dir),
            devices,
            self.log,
            owner,
            warm=self.warm,
            first=self.warm.take(owner),
        )

    @staticmethod
    def _owner(store: Store, job_id: str) -> Owner:
        sub = submission(store, job_id)
        if sub is None:  # pragma: no cover - daemon jobs always have one (managed_jobs joins it)
            raise StoreError(f"job {job_id} has no submission row")
        return owner_of(sub)

    def _keep_warm(self, store: Store) -> None:
        if not self.config.warm_workers:
            self.warm.reconcile([])
            return
        with self.registry.lock:
            running = list(self.registry.running)
        likely = [owner_of(sub) for _, sub in managed_jobs(store, frozenset({JobState.QUEUED}))]
        likely += [self._owner(store, job_id) for job_id in running]
        likely += recent_owners(store, self.slots)
        if not can_switch_users():
            likely = [me()]  # a daemon of one user runs only its own user's jobs
        self.warm.reconcile(warm_wanted(True, self.slots, len(running), list(dict.fromkeys(likely))))

    def _report_status(self) -> None:
        status = f"STATUS={len(self.registry.running)} running, {self.queued} queued"
        if status != self._status:
            self._status = status
            self.notifier.send(status)

    def _shutdown(self, server: ApiServer, spool: Spool | None, sock: Path) -> None:
        """Stop taking work, let every worker save (0 steps lost), then exit."""
        self.notifier.send("STOPPING=1", "STATUS=stopping: workers are saving")
        self.log.info(
            "daemon.stopping",
            signal=signal.Signals(self.signals[0]).name,
            running=sorted(self.registry.running),
        )
        self.warm.stop()
        server.shutdown()
        server.server_close()
        if spool is not None:
            spool.stop()
        asked = 0
        while True:
            with self.registry.lock:
                live: list[RunningJob] = [
                    rj
                    for rj in self.registry.running.values()
                    if rj.thread is not None and rj.thread.is_alive()
                ]
                if len(self.signals) > asked:  # every further signal escalates: save, then kill
                    asked = len(self.signals)
                    for rj in live:
                        ask_stop(rj, cancel=False)
            if not live:
                break
            self.notifier.watchdog(time.monotonic())
            self.wake.wait(0.1)
            self.wake.clear()
        if sock.is_socket():
            sock.unlink()
        self.log.info("daemon.stopped")

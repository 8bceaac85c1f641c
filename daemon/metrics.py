"""Prometheus metrics for operators: `ckptd daemon|run --metrics-address HOST:PORT` (off unless
given), served by prometheus-client (its exposition format, HTTP server and process metrics
rather than our own).

Everything is read at scrape time from what ckptd keeps anyway: the store (states, attempts,
commits), each live job's heartbeat file, and its events file followed from where the last scrape
stopped. The training loop sends nothing extra and the supervisor loops are untouched, so metrics
cost training nothing. Per-job series carry the job's id, name and owner's user name only, never
parameters, paths or error texts: whoever can reach the address reads them.
"""

from __future__ import annotations

import os
import pwd
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from ckptd.daemon import drain
from ckptd.state import goodput
from ckptd.state import protocol as p
from ckptd.state.paths import RunDir
from ckptd.state.states import JobState
from ckptd.state.store import Job, Store
from ckptd.state.submissions import submission

LIVE = frozenset({JobState.QUEUED, JobState.RUNNING, JobState.BACKOFF})
JOB_LABELS = ["job", "name", "user"]


class MetricsAddressError(ValueError):
    pass


def check_address(_ctx: object, _param: object, value: str | None) -> str | None:
    """A click callback: a malformed --metrics-address is a usage error (exit 2) naming it."""
    if value is not None:
        try:
            parse_address(value)
        except MetricsAddressError as e:
            import click

            raise click.BadParameter(str(e)) from None
    return value


def parse_address(text: str) -> tuple[str, int]:
    """`HOST:PORT`, `[v6]:PORT` or `:PORT` (all addresses) -> (host, port); pure."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise MetricsAddressError(f"--metrics-address {text!r}: give HOST:PORT, e.g. 127.0.0.1:9464")
    bracketed = host.startswith("[") and host.endswith("]")
    if ":" in host and not bracketed:
        raise MetricsAddressError(f"--metrics-address {text!r}: write an IPv6 address as [ADDRESS]:PORT")
    host = host[1:-1] if bracketed else host
    return host or "0.0.0.0", int(port)


@dataclass
class Follow:
    """What one live job's events and heartbeats said so far."""

    tail: p.EventTail
    saves: int = 0
    save_seconds: float = 0.0
    last_save_seconds: float = 0.0
    coalesced: int = 0
    newest: str = ""  # the newest commit's path prefix
    seen: tuple[float, int] | None = None  # (heartbeat time, step) at the previous look
    rate: float | None = None

    def read_events(self) -> None:
        for ev in self.tail.read():
            kind = ev.get("event")
            if kind == p.Event.CHECKPOINT_COMMITTED:
                self.saves += 1
                self.last_save_seconds = float(ev.get("seconds") or 0.0)
                self.save_seconds += self.last_save_seconds
                self.newest = str(ev.get("path") or "")
            elif kind == p.Event.CHECKPOINT_COALESCED:
                self.coalesced += int(ev.get("coalesced") or 1)

    def observe(self, hb: p.Heartbeat) -> None:
        """Steps per second between two heartbeats that moved (any route: fit, a custom loop)."""
        if self.seen is not None and hb.time > self.seen[0] and hb.step >= self.seen[1]:
            self.rate = (hb.step - self.seen[1]) / (hb.time - self.seen[0])
        if self.seen is None or hb.time > self.seen[0]:
            self.seen = (hb.time, hb.step)


def commit_bytes(prefix: str) -> int:
    """The newest commit's size on disk (its index, data shards and manifest)."""
    if not prefix:
        return 0
    path = Path(prefix)
    try:
        return sum(os.lstat(f).st_size for f in path.parent.glob(path.name + ".*"))
    except OSError:  # retired while we looked
        return 0


@dataclass
class Families:
    """The per-job metric families of one scrape: `labels` are the job's values, then those of
    `more` (extra label names)."""

    metrics: dict[str, GaugeMetricFamily | CounterMetricFamily] = field(default_factory=dict)

    def gauge(self, name: str, doc: str, labels: list[str], value: float, more: tuple[str, ...] = ()) -> None:
        fam = self.metrics.setdefault(name, GaugeMetricFamily(name, doc, labels=[*JOB_LABELS, *more]))
        fam.add_metric(labels, value)

    def counter(
        self, name: str, doc: str, labels: list[str], value: float, more: tuple[str, ...] = ()
    ) -> None:
        fam = self.metrics.setdefault(name, CounterMetricFamily(name, doc, labels=[*JOB_LABELS, *more]))
        fam.add_metric(labels, value)


class JobsCollector(Collector):
    """Collected at each scrape; one lock, as scrapes may come on several server threads."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.follows: dict[str, Follow] = {}
        self.users: dict[int, str] = {}
        self.lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            store = Store.open(self.home, readonly=True)
            try:
                yield from self._collect(store)
            finally:
                store.close()

    def _collect(self, store: Store) -> Iterator[Metric]:
        # Counted by SQLite: a store of thousands of finished jobs is never loaded whole.
        counts = {
            r["state"]: r["n"] for r in store.query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        }
        by_state = GaugeMetricFamily("ckptd_jobs", "Jobs in the store, by state.", labels=["state"])
        for state in JobState:
            by_state.add_metric([str(state)], counts.get(str(state), 0))
        yield by_state
        yield GaugeMetricFamily(
            "ckptd_queue_length", "Jobs waiting for a slot.", value=counts.get(str(JobState.QUEUED), 0)
        )
        yield self._attempt_classes(store)
        drained = int(drain.read(self.home) is not None)
        yield GaugeMetricFamily("ckptd_drained", "1 while `ckptd drain` holds: no job starts.", value=drained)
        marks = ",".join("?" * len(LIVE))
        ids = store.query(f"SELECT id FROM jobs WHERE state IN ({marks})", tuple(str(s) for s in LIVE))
        live = [store.job(r["id"]) for r in ids]
        for gone in set(self.follows) - {j.id for j in live}:
            del self.follows[gone]
        fams = Families()
        for job in live:
            self._job(store, job, fams)
        yield from fams.metrics.values()

    def _attempt_classes(self, store: Store) -> CounterMetricFamily:
        fam = CounterMetricFamily(
            "ckptd_attempts", "Ended worker attempts of every job in the store, by class.", labels=["class"]
        )
        for row in store.query(
            "SELECT class, COUNT(*) AS n FROM attempts WHERE class IS NOT NULL GROUP BY class"
        ):
            fam.add_metric([row["class"]], row["n"])
        return fam

    def _user(self, store: Store, job: Job) -> str:
        sub = submission(store, job.id)
        uid = sub.owner_uid if sub is not None else os.getuid()  # `ckptd run`: this user's
        if uid not in self.users:
            try:
                self.users[uid] = pwd.getpwuid(uid).pw_name
            except KeyError:
                self.users[uid] = str(uid)
        return self.users[uid]

    def _job(self, store: Store, job: Job, fams: Families) -> None:
        labels = [job.id, job.name, self._user(store, job)]
        attempts = store.attempts(job.id)
        classes: dict[str, int] = {}
        for a in attempts:
            if a.klass is not None:
                classes[str(a.klass)] = classes.get(str(a.klass), 0) + 1
        fams.gauge("ckptd_job_state", "A live job's state (1).", [*labels, str(job.state)], 1, ("state",))
        for klass, n in classes.items():
            fams.counter(
                "ckptd_job_attempts",
                "Ended attempts of a live job, by class.",
                [*labels, klass],
                n,
                ("class",),
            )
        fams.gauge("ckptd_job_restarts", "Attempts after the first.", labels, max(0, len(attempts) - 1))
        self._commits(store, job, labels, fams)
        self._progress(job, labels, fams)
        self._goodput(store, job, labels, fams)

    def _goodput(self, store: Store, job: Job, labels: list[str], fams: Families) -> None:
        gp = goodput.summary(store, job.id)
        if "error" in gp:  # reported by `ckptd status`; a scrape goes on without it
            return
        fams.gauge("ckptd_job_goodput_ratio", "Productive training time / wall time.", labels, gp["ratio"])
        for part in goodput.PARTS:
            fams.gauge(
                "ckptd_job_time_seconds",
                "The job's wall time by part (goodput).",
                [*labels, part],
                gp[part],
                ("part",),
            )

    def _commits(self, store: Store, job: Job, labels: list[str], fams: Families) -> None:
        rows = store.checkpoints(job.id)
        if rows:
            newest = rows[-1]
            fams.gauge("ckptd_job_last_commit_step", "Step of the newest commit.", labels, newest["step"])
            fams.gauge(
                "ckptd_job_last_commit_age_seconds",
                "Seconds since the newest commit.",
                labels,
                max(0.0, time.time() - newest["committed_at"]),
            )

    def _progress(self, job: Job, labels: list[str], fams: Families) -> None:
        root = Path(job.run_dir)
        f = self.follows.setdefault(job.id, Follow(p.EventTail(root / p.EVENTS_FILE, root=root)))
        f.read_events()
        fams.counter("ckptd_job_checkpoint_saves", "Commits made.", labels, f.saves)
        fams.counter(
            "ckptd_job_checkpoint_save_seconds", "Seconds spent making commits.", labels, f.save_seconds
        )
        fams.gauge(
            "ckptd_job_checkpoint_last_save_seconds", "The newest commit's save.", labels, f.last_save_seconds
        )
        fams.gauge(
            "ckptd_job_checkpoint_bytes", "The newest commit's size on disk.", labels, commit_bytes(f.newest)
        )
        fams.counter(
            "ckptd_job_checkpoint_coalesced", "Due saves merged into a later one.", labels, f.coalesced
        )
        hb = p.Heartbeat.read(RunDir(root).heartbeat, root=root)
        if hb is None or job.state != JobState.RUNNING:
            return
        f.observe(hb)
        fams.gauge("ckptd_job_step", "The worker's step, from its heartbeat.", labels, hb.step)
        fams.gauge(
            "ckptd_job_heartbeat_age_seconds",
            "Seconds since the last heartbeat.",
            labels,
            time.time() - hb.time,
        )
        if f.rate is not None:
            fams.gauge("ckptd_job_steps_per_second", "Between the last two heartbeats seen.", labels, f.rate)
        if hb.rss_bytes is not None:
            fams.gauge("ckptd_job_worker_rss_bytes", "The worker's resident memory.", labels, hb.rss_bytes)


def serve(address: str, home: Path) -> str:
    """Start serving /metrics on a daemon thread; returns the address bound (port 0: any)."""
    host, port = parse_address(address)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobsCollector(home))
    ProcessCollector(registry=registry)  # this process's CPU and memory: the daemon's footprint
    server, _ = start_http_server(port, host, registry=registry)
    bound_host, bound_port = server.server_address[:2]
    name = bound_host.decode() if isinstance(bound_host, bytes) else bound_host
    return f"[{name}]:{bound_port}" if ":" in name else f"{name}:{bound_port}"

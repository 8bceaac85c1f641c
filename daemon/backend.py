"""What the API's requests do: submit, cancel and the read-only views, with access control."""

from __future__ import annotations

import errno
import grp
import json
import os
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from structlog.typing import FilteringBoundLogger

from ckptd.daemon import mounts
from ckptd.daemon.api import ApiError, Peer, iter_lines
from ckptd.daemon.drain import MODES, Drainer
from ckptd.daemon.jobs import create_run, supervision_dir
from ckptd.daemon.report import job_report, live
from ckptd.daemon.running import RunningJob, ask_stop
from ckptd.daemon.schedule import may_act
from ckptd.state import submissions
from ckptd.state.jobfile import parse_job
from ckptd.state.jobspec import JobSpec, spec_digest, spec_from_json, spec_json
from ckptd.state.protocol import EVENTS_FILE
from ckptd.state.safeopen import read_under
from ckptd.state.states import TERMINAL, JobState
from ckptd.state.store import Job, Store, StoreError
from ckptd.state.submissions import Owner
from ckptd.state.yamlstrict import JobFileError
from ckptd.supervisor import identity, tier

CANCEL_DIRECTLY = frozenset({JobState.QUEUED, JobState.INTERRUPTED, JobState.FAILED})
MAX_EVENTS_CHUNK = 256 * 1024


class Registry:
    """Running jobs, shared by the main loop and API threads under one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: dict[str, RunningJob] = {}


class ApiBackend:
    def __init__(
        self,
        home: Path,
        registry: Registry,
        admin_group: str,
        wake: threading.Event,
        health: Callable[[], dict[str, Any]],
        log: FilteringBoundLogger,
        drainer: Drainer,
    ) -> None:
        self.home, self.registry, self.admin_group = home, registry, admin_group
        self.wake, self._health, self.log, self.drainer = wake, health, log, drainer
        self._pool: queue.SimpleQueue[Store] = queue.SimpleQueue()

    @contextmanager
    def store(self) -> Iterator[Store]:
        try:
            s = self._pool.get_nowait()
        except queue.Empty:
            s = Store.open(self.home, check=False, threads=True)
        try:
            yield s
        finally:
            self._pool.put(s)

    def close(self) -> None:
        """Close the pooled connections (the API has stopped answering)."""
        while True:
            try:
                self._pool.get_nowait().close()
            except queue.Empty:
                return

    def health(self) -> dict[str, Any]:
        out = self._health()
        with self.store() as store:  # running but silent longer than normal (ckptd status)
            out["suspect"] = [j for j in out["running"] if _suspect(store, j)]
        return out

    # -- reads ----------------------------------------------------------------------------------

    def _job(self, store: Store, job_id: str) -> Job:
        try:
            return store.job(job_id)
        except StoreError as e:
            raise ApiError(404, str(e)) from e

    def _visible(self, store: Store, peer: Peer, job_id: str) -> Job:
        """The job, if `peer` may see it: its owner, root, or a member of the admin group."""
        job = self._job(store, job_id)
        sub = submissions.submission(store, job_id)
        owner = sub.owner_uid if sub else -1
        if not may_act(peer.uid, owner, self._is_admin(peer)):
            raise ApiError(
                403,
                f"uid {peer.uid} may not see job {job_id} (owner uid {owner}); "
                f"only its owner, root and group {self.admin_group} may",
            )
        return job

    def job(self, store: Store, peer: Peer, job_id: str, detail: bool) -> dict[str, Any]:
        return self._report(store, self._visible(store, peer, job_id), detail)

    def _report(self, store: Store, job: Job, detail: bool) -> dict[str, Any]:
        report = job_report(store, job, detail)
        sub = submissions.submission(store, job.id)
        if sub is not None:
            report.update(owner_uid=sub.owner_uid, priority=sub.priority)
        return report

    def jobs(self, store: Store, peer: Peer) -> list[dict[str, Any]]:
        """The caller's own jobs; every job for root and the admin group."""
        admin = self._is_admin(peer)
        out = []
        for j in store.jobs():
            sub = submissions.submission(store, j.id)
            if may_act(peer.uid, sub.owner_uid if sub else -1, admin):
                out.append(self._report(store, j, detail=False))
        return out

    def checkpoints(
        self, store: Store, peer: Peer, job_id: str, include_retired: bool
    ) -> list[dict[str, Any]]:
        self._visible(store, peer, job_id)
        rows = store.checkpoints(job_id, include_retired)
        for r in rows:
            r["metrics"] = json.loads(r.pop("metrics_json") or "{}")
        return rows

    def events(self, store: Store, peer: Peer, job_id: str, cursor: str) -> dict[str, Any]:
        """The worker's events (its run directory, read through the daemon's group) merged with
        the supervisor's (the daemon's own file); `cursor` is `WORKER:SUPERVISOR` byte offsets."""
        job = self._visible(store, peer, job_id)
        offsets = [int(x) for x in cursor.split(":")] + [0]
        worker, w_end = read_events(Path(job.run_dir), EVENTS_FILE, offsets[0])
        superv, s_end = read_events(supervision_dir(self.home, job.id), EVENTS_FILE, offsets[1])
        events = sorted(worker + superv, key=lambda ev: float(ev.get("ts") or 0))
        return {
            "events": events,
            "offset": f"{w_end}:{s_end}",
            "state": str(job.state),
            "terminal": job.state in TERMINAL | {JobState.FAILED},
        }

    # -- writes ---------------------------------------------------------------------------------

    def submit(self, store: Store, peer: Peer, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        owner = Owner(peer.uid, peer.gid, peer.groups)
        refuse_foreign(owner)
        spec, raw, job_file = _spec_from(body)
        key, priority = body.get("key"), body.get("priority", 0)
        if key is not None and (not isinstance(key, str) or not 8 <= len(key) <= 200):
            raise ApiError(400, "key: a string of 8 to 200 characters")
        if not isinstance(priority, int) or isinstance(priority, bool) or not -100 <= priority <= 100:
            raise ApiError(400, "priority: an integer from -100 to 100")
        if key is not None and (found := submissions.by_key(store, owner.uid, key)) is not None:
            return self._same_key(store, key, found, spec)
        try:
            job = submit_job(store, self.home, spec, raw, job_file, owner, priority, key)
        except submissions.DuplicateKey as e:  # the same retry raced in on another connection
            return self._same_key(store, str(key), e.job_id, spec)
        except OSError as e:  # nothing was recorded: the submit can simply be retried
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            raise ApiError(
                507 if full else 500,
                f"cannot create the job's run directory under {self.home}/jobs: "
                f"{e.strerror or e}; "
                + ("free space there and submit again" if full else "see the daemon's log"),
            ) from e
        self.log.info("job.submitted", job_id=job.id, name=job.name, owner_uid=peer.uid, priority=priority)
        self.wake.set()
        return 201, {"created": True, "job": self._report(store, job, detail=False)}

    def _same_key(self, store: Store, key: str, job_id: str, spec: JobSpec) -> tuple[int, dict[str, Any]]:
        """A retry (same spec) gets the job it created; a different spec under the key is a
        mistake that must not silently run the first one instead."""
        if store.job(job_id).spec_digest != spec_digest(spec):
            raise ApiError(
                409,
                f"key {key!r} was already used for job {job_id} with a different "
                "job spec; submit with a new key",
                job_id=job_id,
            )
        return 200, {"created": False, "job": self._report(store, store.job(job_id), detail=False)}

    def cancel(self, store: Store, peer: Peer, job_id: str) -> tuple[int, dict[str, Any]]:
        job = self._job(store, job_id)
        sub = submissions.submission(store, job_id)
        owner = sub.owner_uid if sub else -1
        if not may_act(peer.uid, owner, self._is_admin(peer)):
            raise ApiError(
                403,
                f"uid {peer.uid} may not cancel job {job_id} (owner uid {owner}); "
                f"ask its owner, root or a member of group {self.admin_group}",
            )
        with self.registry.lock:  # the main loop starts jobs under the same lock
            rj = self.registry.running.get(job_id)
            if rj is not None and rj.end is None and job.state not in TERMINAL:
                ask_stop(rj, cancel=True, by=f"uid {peer.uid} through the API")
                self.log.info("job.cancelling", job_id=job_id, by_uid=peer.uid)
                return 202, {"job_id": job_id, "state": "cancelling"}
            try:
                job = store.transition(
                    job_id,
                    JobState.CANCELLED,
                    f"cancelled by uid {peer.uid} through the API",
                    expect=CANCEL_DIRECTLY,
                )
            except Exception as e:
                raise ApiError(
                    409,
                    f"job {job_id} is {store.job(job_id).state}; nothing to cancel",
                    state=str(store.job(job_id).state),
                ) from e
        self.log.info("job.cancelled", job_id=job_id, by_uid=peer.uid)
        # No supervisor will remove its memory tier (left by an attempt before a drain or a
        # daemon restart requeued it): removed here, as the job's owner.
        owner_of = submissions.owner_of(sub) if sub is not None else None
        if owner_of is not None and (t := tier.for_job(spec_from_json(job.spec_json), job_id, owner_of)):
            tier.remove_logged(t, job_id, self.log)
        return 200, {"job_id": job_id, "state": str(job.state)}

    def drain(self, peer: Peer, body: dict[str, Any]) -> dict[str, Any]:
        """Admins only: no job starts; running ones save and stop (back to the queue) or finish."""
        self._admin_only(peer, "drain")
        running = body.get("running", "stop")
        if running not in MODES:
            raise ApiError(400, f"running: {running!r}; one of {', '.join(MODES)}")
        with self.registry.lock:  # the main loop starts jobs under the same lock
            out = self.drainer.drain(running, f"uid {peer.uid}", list(self.registry.running.values()))
        self.wake.set()
        return out

    def undrain(self, peer: Peer) -> dict[str, Any]:
        self._admin_only(peer, "undrain")
        out = self.drainer.undrain(f"uid {peer.uid}")
        self.wake.set()
        return out

    def _admin_only(self, peer: Peer, what: str) -> None:
        if not self._is_admin(peer) and peer.uid != 0:
            raise ApiError(
                403, f"uid {peer.uid} may not {what} the service; root or group {self.admin_group} may"
            )

    def _is_admin(self, peer: Peer) -> bool:
        try:
            gid = grp.getgrnam(self.admin_group).gr_gid
        except KeyError:
            return False
        return peer.gid == gid or gid in peer.groups  # as the kernel said at connect()


def read_events(directory: Path, name: str, offset: int) -> tuple[list[dict[str, Any]], int]:
    """Complete JSON lines of `directory/name` from byte `offset`, and the offset after them,
    read as everything in a job owner's directory is (ckptd.state.safeopen)."""
    try:
        data = read_under(directory, directory / name, offset, MAX_EVENTS_CHUNK)
    except OSError:
        return [], offset
    complete = data[: data.rfind(b"\n") + 1]  # a line being appended waits for next time
    return list(iter_lines(complete)), offset + len(complete)


def refuse_foreign(owner: Owner) -> None:
    """A daemon that cannot switch users runs only its own user's jobs."""
    if identity.needs_switch(owner) and not identity.can_switch_users():
        raise ApiError(
            403,
            f"this ckptd daemon runs as uid {os.geteuid()} without the right to "
            f"start jobs as other users; uid {owner.uid} can run its own daemon "
            "(`ckptd daemon`, or the systemd user unit) or use `ckptd run`",
        )


def _spec_from(body: dict[str, Any]) -> tuple[JobSpec, bytes, str]:
    """The spec that runs is derived here from the job file's text, with no filesystem access;
    the client's `spec_json` (what it validated) must agree with it."""
    raw, job_file, text = body.get("raw"), body.get("job_file"), body.get("spec_json")
    if not isinstance(raw, str) or not raw:
        raise ApiError(400, "raw: the job file's text (use `ckptd submit`)")
    if not isinstance(job_file, str) or not job_file.startswith("/"):
        raise ApiError(
            400,
            "job_file: the job file's absolute path (relative paths in it are "
            "resolved against its directory)",
        )
    data = raw.encode()
    try:
        spec = parse_job(data, job_file, Path(job_file).parent, check=False)
    except JobFileError as e:
        raise ApiError(400, "invalid job spec", problems=e.problems) from e
    if problems := mounts.check_outputs(spec, job_file):
        raise ApiError(400, "invalid job spec", problems=problems)
    if text is not None:
        if not isinstance(text, str):
            raise ApiError(400, "spec_json: the validated job spec as a JSON string")
        try:
            given = spec_from_json(text)
        except ValidationError as e:
            raise ApiError(
                400,
                "invalid job spec",
                problems=[f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()],
            ) from e
        if spec_digest(given) != spec_digest(spec):
            raise ApiError(
                400,
                f"spec_json does not match raw: the job file {job_file} as sent "
                "is what runs; send the spec parsed from it (`ckptd submit` does)",
            )
    return spec, data, job_file


def submit_job(
    store: Store,
    home: Path,
    spec: JobSpec,
    raw: bytes,
    job_file: str,
    owner: Owner,
    priority: int,
    key: str | None,
) -> Job:
    return create_run(
        home,
        spec,
        raw,
        lambda job_id, run: submissions.submit(
            store,
            job_id,
            spec.name,
            spec_json(spec),
            spec_digest(spec),
            job_file,
            str(run.root),
            owner,
            priority,
            key,
        ),
        owner,
    )


def _suspect(store: Store, job_id: str) -> bool:
    try:
        job, attempts = store.job(job_id), store.attempts(job_id)
        return bool(attempts) and bool(live(store, job, attempts[-1])["suspect"])
    except (StoreError, OSError, ValueError):  # gone or unreadable meanwhile: not news here
        return False

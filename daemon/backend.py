"""What the API's requests do: submit, cancel and the read-only views, with access control."""

from __future__ import annotations

import grp
import json
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ckptd.daemon.api import ApiError, Peer, iter_lines
from ckptd.daemon.jobs import create_run
from ckptd.daemon.report import job_report
from ckptd.daemon.running import RunningJob, ask_stop
from ckptd.daemon.schedule import may_act
from ckptd.state import submissions
from ckptd.state.jobspec import JobSpec, spec_digest, spec_json
from ckptd.state.protocol import EVENTS_FILE
from ckptd.state.states import TERMINAL, JobState
from ckptd.state.store import Job, Store, StoreError
from pydantic import ValidationError

CANCEL_DIRECTLY = frozenset({JobState.QUEUED, JobState.INTERRUPTED, JobState.FAILED})
MAX_EVENTS_CHUNK = 256 * 1024


class Registry:
    """Running jobs, shared by the main loop and API threads under one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: dict[str, RunningJob] = {}


class ApiBackend:
    def __init__(self, home: Path, registry: Registry, admin_group: str,
                 wake: threading.Event, health: Callable[[], dict[str, Any]], log: Any) -> None:
        self.home, self.registry, self.admin_group = home, registry, admin_group
        self.wake, self._health, self.log = wake, health, log
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

    def health(self) -> dict[str, Any]:
        return self._health()

    # -- reads ----------------------------------------------------------------------------------

    def _job(self, store: Store, job_id: str) -> Job:
        try:
            return store.job(job_id)
        except StoreError as e:
            raise ApiError(404, str(e)) from e

    def job(self, store: Store, job_id: str, detail: bool) -> dict[str, Any]:
        job = self._job(store, job_id)
        report = job_report(store, job, detail)
        sub = submissions.submission(store, job.id)
        if sub is not None:
            report.update(owner_uid=sub.owner_uid, priority=sub.priority)
        return report

    def jobs(self, store: Store) -> list[dict[str, Any]]:
        return [self.job(store, j.id, detail=False) for j in store.jobs()]

    def checkpoints(self, store: Store, job_id: str, include_retired: bool) -> list[dict[str, Any]]:
        self._job(store, job_id)
        rows = store.checkpoints(job_id, include_retired)
        for r in rows:
            r["metrics"] = json.loads(r.pop("metrics_json") or "{}")
        return rows

    def events(self, store: Store, job_id: str, offset: int) -> dict[str, Any]:
        job = self._job(store, job_id)
        path = Path(job.run_dir) / EVENTS_FILE
        data = b""
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(MAX_EVENTS_CHUNK)
        except FileNotFoundError:
            pass
        complete = data[:data.rfind(b"\n") + 1]  # a line being appended waits for next time
        return {"events": list(iter_lines(complete)), "offset": offset + len(complete),
                "state": str(job.state), "terminal": job.state in TERMINAL | {JobState.FAILED}}

    # -- writes ---------------------------------------------------------------------------------

    def submit(self, store: Store, peer: Peer, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        spec = _spec_from(body)
        key, priority = body.get("key"), body.get("priority", 0)
        if key is not None and (not isinstance(key, str) or not 8 <= len(key) <= 200):
            raise ApiError(400, "key: a string of 8 to 200 characters")
        if not isinstance(priority, int) or isinstance(priority, bool) or not -100 <= priority <= 100:
            raise ApiError(400, "priority: an integer from -100 to 100")
        if key is not None and (found := submissions.by_key(store, key)) is not None:
            return 200, {"created": False, "job": self.job(store, found, detail=False)}
        try:
            job = submit_job(store, self.home, spec, str(body.get("raw", "")).encode(),
                             str(body.get("job_file", "")), peer.uid, priority, key)
        except submissions.DuplicateKey as e:  # the same retry raced in on another connection
            return 200, {"created": False, "job": self.job(store, e.job_id, detail=False)}
        except OSError as e:  # nothing was recorded: the submit can simply be retried
            raise ApiError(507, f"cannot create the job's run directory under {self.home}/jobs: "
                           f"{e.strerror or e}; free space there and submit again") from e
        self.log.info("job.submitted", job_id=job.id, name=job.name, owner_uid=peer.uid,
                      priority=priority)
        self.wake.set()
        return 201, {"created": True, "job": self.job(store, job.id, detail=False)}

    def cancel(self, store: Store, peer: Peer, job_id: str) -> tuple[int, dict[str, Any]]:
        job = self._job(store, job_id)
        sub = submissions.submission(store, job_id)
        owner = sub.owner_uid if sub else -1
        if not may_act(peer.uid, owner, self._is_admin(peer)):
            raise ApiError(403, f"uid {peer.uid} may not cancel job {job_id} (owner uid {owner}); "
                           f"ask its owner, root or a member of group {self.admin_group}")
        with self.registry.lock:  # the main loop starts jobs under the same lock
            rj = self.registry.running.get(job_id)
            if rj is not None and rj.end is None and job.state not in TERMINAL:
                ask_stop(rj, cancel=True)
                self.log.info("job.cancelling", job_id=job_id, by_uid=peer.uid)
                return 202, {"job_id": job_id, "state": "cancelling"}
            try:
                job = store.transition(job_id, JobState.CANCELLED, f"cancelled by uid {peer.uid}",
                                       expect=CANCEL_DIRECTLY)
            except Exception as e:
                raise ApiError(409, f"job {job_id} is {store.job(job_id).state}; nothing to cancel",
                               state=str(store.job(job_id).state)) from e
        self.log.info("job.cancelled", job_id=job_id, by_uid=peer.uid)
        return 200, {"job_id": job_id, "state": str(job.state)}

    def _is_admin(self, peer: Peer) -> bool:
        try:
            gid = grp.getgrnam(self.admin_group).gr_gid
        except KeyError:
            return False
        return peer.gid == gid or gid in _groups_of(peer.pid)


def _groups_of(pid: int) -> set[int]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


def _spec_from(body: dict[str, Any]) -> JobSpec:
    text = body.get("spec_json")
    if not isinstance(text, str):
        raise ApiError(400, "spec_json: the validated job spec as a JSON string (use `ckptd submit`)")
    try:
        return JobSpec.model_validate_json(text, strict=False)
    except ValidationError as e:
        raise ApiError(400, "invalid job spec", problems=[
            f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]) from e


def submit_job(store: Store, home: Path, spec: JobSpec, raw: bytes, job_file: str, owner: int,
               priority: int, key: str | None) -> Job:
    return create_run(home, spec, raw, lambda job_id, run: submissions.submit(
        store, job_id, spec.name, spec_json(spec), spec_digest(spec), job_file, str(run.root),
        owner, priority, key))

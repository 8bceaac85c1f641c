"""One attempt of a multi_worker job: spawn the gang (engine local or slurm), watch it as one
(ckptd.supervisor.gang), judge each member's end, record them, end the attempt."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckptd.state import protocol as p
from ckptd.state.states import AttemptClass
from ckptd.supervisor import gang, slurm
from ckptd.supervisor.evidence import error_summary, file_size, read_error
from ckptd.supervisor.gpus import choose_devices
from ckptd.supervisor.policy import AttemptOutcome
from ckptd.supervisor.process import worker_argv

if TYPE_CHECKING:
    from ckptd.supervisor.runner import JobRunner


def gang_attempt(self: JobRunner) -> AttemptOutcome:
    """A multi_worker attempt: every member started, ended together, judged as one."""
    from ckptd.supervisor.runner import POLL_SECONDS, Watch

    n = len(self.store.attempts(self.job_id)) + 1
    self.events.offset = file_size(self.run.root / p.EVENTS_FILE)
    count, argv = self.spec.distribute.nodes or 2, worker_argv(self.run.root, n)
    launch: gang.Launch
    if self.spec.distribute.engine == "slurm":
        name = f"ckptd-{self.job_id}-{n}"
        members, launch = slurm.spawn(
            self.ops, self.run, n, count, argv, self.spec.distribute.slurm_args, name
        )
    else:
        members, launch = gang.spawn_local(self.ops, self.run, n, count, argv, _gang_devices(self, count))
    for m in members:
        self.record_event(p.Event.WORKER_SPAWNED, attempt=n, pid=m.pid, member=m.index, host=m.host)
    chief = members[0]
    self.store.start_attempt(self.job_id, chief.pid, self.ops.start_time(chief.pid))
    self.display.attempt_started(n, chief.pid)
    w = Watch(n=n, pid=chief.pid, started=chief.last_change, last_change=chief.last_change)
    watch = gang.GangWatch(self.ops, self.spec.restart, members, launch, lambda: len(self.stops.signals), n)
    watch.run(lambda: self.drain_events(w), POLL_SECONDS)
    errors = {m.index: read_error(m.run.root, m.run.attempt_dir(n) / p.ERROR_FILE) for m in members}
    verdict = gang.judge(watch, errors, n)
    for m in members:
        klass, evidence = verdict.classes[m.index]
        ended = {
            "attempt": n,
            "member": m.index,
            "host": m.host,
            "pid": m.pid,
            "exit_class": str(klass),
            "evidence": evidence,
            "root_cause": m.index == verdict.root and verdict.attempt[0] != AttemptClass.SUCCEEDED,
        }
        self.record_event(p.Event.GANG_MEMBER_ENDED, **ended)
        self.store.add_event(self.job_id, p.Event.GANG_MEMBER_ENDED, ended)  # for `ckptd status`
    self.drain_events(w)
    w.last_step = chief.last_step
    assert chief.status is not None
    klass, evidence = verdict.attempt
    return self.end_attempt(n, w, chief.status, klass, evidence, error_summary(errors[verdict.root]), {})


def _gang_devices(self: JobRunner, count: int) -> list[int]:
    """A local gang's GPUs: resources.gpus for each of its members, all healthy."""
    from ckptd.supervisor.runner import NoDevices

    wanted = self.spec.resources.gpus * count
    if wanted == 0:
        return []
    chosen = choose_devices(self.gpus, self.excluded_gpus, wanted)
    if chosen is None:
        raise NoDevices(
            f"resources.gpus={self.spec.resources.gpus} for each of {count} members, but only "
            f"{len(self.gpus) - len(self.excluded_gpus)} healthy GPU(s) here"
        )
    self.devices = chosen
    return chosen

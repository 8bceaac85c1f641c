"""One attempt of a multi_worker job: start the gang (ckptd.supervisor.launch), watch it as one
group (the loop every attempt has, ckptd.supervisor.attempt), judge each member's end
(ckptd.supervisor.gang), record them, end the attempt."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckptd.state import protocol as p
from ckptd.state.states import AttemptClass
from ckptd.supervisor import gang
from ckptd.supervisor.attempt import Member, Progress
from ckptd.supervisor.evidence import error_summary, read_error
from ckptd.supervisor.policy import AttemptOutcome

if TYPE_CHECKING:  # the runner calls in here; only its type is needed
    from ckptd.supervisor.runner import JobRunner


def gang_attempt(runner: JobRunner) -> AttemptOutcome:
    """A multi_worker attempt: every member started, ended together, judged as one."""
    n = runner.begin_attempt()
    members, group = runner.launcher.gang(n, runner.job_id)
    for m in members:
        runner.record_event(p.Event.WORKER_SPAWNED, attempt=n, pid=m.pid, member=m.index, host=m.host)
    chief = members[0]
    runner.store.start_attempt(runner.job_id, chief.pid, runner.ops.start_time(chief.pid))
    runner.display.attempt_started(n, chief.pid)
    w = Progress(n)
    watch = runner.watch(w, members, group, solo=False)
    errors = {m.index: read_error(m.run.root, m.run.attempt_dir(n) / p.ERROR_FILE) for m in members}
    verdict = gang.judge(watch, errors, n)
    for m in members:
        _record_member(runner, n, m, verdict)
    runner.drain_events(w)
    w.last_step = chief.last_step
    assert chief.status is not None
    klass, evidence = verdict.attempt
    return runner.end_attempt(w, chief.status, klass, evidence, error_summary(errors[verdict.root]), {})


def _record_member(runner: JobRunner, n: int, m: Member, verdict: gang.Verdict) -> None:
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
    runner.record_event(p.Event.GANG_MEMBER_ENDED, **ended)
    runner.store.add_event(runner.job_id, p.Event.GANG_MEMBER_ENDED, ended)  # for `ckptd status`

"""A multi_worker job's attempt: a gang of member workers that train in step through
TensorFlow's collectives, supervised as one.

TensorFlow cannot re-admit one restarted member, so the unit of restart is the whole gang: the
first member to fail gives the attempt its class, the others died of the aborted collective
(`peer_lost`, which spends no restart budget: the gang's attempt is one attempt). A stuck
member freezes every other one inside a collective, so all heartbeats stop together; the root
cause is the member that is stopped, else the one with the lowest step, else the one silent
longest. Decisions here are pure functions; the gang is watched by the one loop of every
attempt (ckptd.supervisor.attempt) and started by ckptd.supervisor.launch or .slurm.
"""

from __future__ import annotations

import json
import re
import socket
from dataclasses import dataclass
from typing import Any

from ckptd.state import protocol as p
from ckptd.state.states import AttemptClass
from ckptd.supervisor.attempt import AttemptWatch
from ckptd.supervisor.policy import ExitObservation, classify_exit

# What a member says when a peer is gone: the collective was aborted or timed out, or the
# coordination service lost a task. Such a member did not cause the attempt's end.
_PEER_ERROR = re.compile(
    r"Collective ops is aborted|collective.*(abort|cancel|timed out|timeout)|"
    r"UnavailableError|DeadlineExceeded|coordination service|heartbeat timeout|"
    r"failed to connect|Socket closed|Connection reset|peer",
    re.I,
)


def peer_error(error_type: str | None, message: str | None) -> bool:
    return bool(_PEER_ERROR.search(f"{error_type or ''}: {message or ''}"))


@dataclass(frozen=True)
class MemberEnd:
    """What is known of one member when the gang's attempt is over."""

    index: int
    exit_order: int | None  # 0 for the first to exit on its own; None if the supervisor ended it
    peer_error: bool = False  # its error names a lost peer or an aborted collective
    stopped: bool = False  # SIGSTOPped (or traced) when the gang was found silent
    last_step: int | None = None
    silent_seconds: float = 0.0


def gang_root(ends: list[MemberEnd]) -> int:
    """The member whose ending is the attempt's: the first that ended of its own cause; if all
    were still there (a silent gang), the stopped one, the furthest behind, the silent longest."""
    own = [e for e in ends if e.exit_order is not None and not e.peer_error]
    if own:
        return min(own, key=lambda e: e.exit_order or 0).index
    exited = [e for e in ends if e.exit_order is not None]
    if exited and len(exited) == len(ends):  # every one blamed a peer: the first to go
        return min(exited, key=lambda e: e.exit_order or 0).index

    def behind(e: MemberEnd) -> tuple[int, int, float, int]:
        step = e.last_step if e.last_step is not None else -1
        return (0 if e.stopped else 1, step, -e.silent_seconds, e.index)

    return min(ends, key=behind).index


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` ports free right now on `host` (the local engine's cluster): bound together so that
    they differ, then released for TensorFlow's servers to take."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def tf_config(hosts: list[str], index: int) -> str:
    return json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}})


def member_class(root: int, index: int, own: AttemptClass) -> AttemptClass:
    """A member's class in the gang's record: its own for the root cause and for a clean end,
    peer_lost for the members that died because the root did."""
    if index == root or own in (AttemptClass.SUCCEEDED, AttemptClass.CONFIG_ERROR):
        return own
    return AttemptClass.PEER_LOST


@dataclass(frozen=True)
class Verdict:
    root: int
    classes: dict[int, tuple[AttemptClass, str]]  # each member's class and evidence
    attempt: tuple[AttemptClass, str]  # the gang attempt's


def judge(watch: AttemptWatch, errors: dict[int, dict[str, Any]], n: int) -> Verdict:
    """Each member's class from what it left behind; the attempt's: the chief's if it finished
    (its final commit is durable), else the root cause's, named."""
    peers = {i: peer_error(e.get("type"), e.get("message")) for i, e in errors.items()}
    root = gang_root(
        [
            MemberEnd(m.index, m.exit_order, peers.get(m.index, False), m.stopped, m.last_step, m.silent)
            for m in watch.members
        ]
    )
    classes = {}
    for m in watch.members:
        assert m.status is not None
        last = p.Heartbeat.read(m.run.heartbeat, m.run.root)
        obs = ExitObservation(
            m.status.exit_code,
            m.status.signal,
            errors[m.index].get("type"),
            errors[m.index].get("message"),
            hang=watch.hang if m.index == root else None,
            finished=last is not None and last.attempt == n and last.phase == p.Phase.DONE,
        )
        klass, evidence = classify_exit(obs)
        classes[m.index] = (member_class(root, m.index, klass), evidence)
    if classes[0][0] == AttemptClass.SUCCEEDED or root == 0:
        return Verdict(root, classes, classes[0])
    klass, evidence = classes[root]
    return Verdict(root, classes, (klass, f"gang member {root}: {evidence}"))

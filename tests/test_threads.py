"""How many threads a worker's TensorFlow may start (issue 25: gang members aborted when no
thread could be created). Pure decisions, table-driven; the gang test that counts a real
member's threads is in test_gang_tf.py."""

from __future__ import annotations

from typing import Any, Literal

import pytest

from ckptd.state.jobspec import JobSpec
from ckptd.worker.runtime import ThreadPlan, members_here, thread_plan


def _spec(**sections: Any) -> JobSpec:
    return JobSpec.model_validate({"name": "j", "model": "m.py:build", **sections})


@pytest.mark.parametrize(
    ("setting", "cpus", "members", "n"),
    [
        ("auto", 2, 1, 2),  # one worker: the whole box, TensorFlow's own default
        ("auto", 2, 2, 1),  # a gang of 2 on 2 CPUs: one each
        ("auto", 2, 3, 1),  # more members than CPUs: never 0
        ("auto", 16, 3, 5),  # the share rounds down
        ("auto", 1, 1, 1),
        (4, 2, 2, 4),  # the job file's number wins over the share
        (1, 64, 1, 1),
    ],
)
def test_thread_plan(setting: int | Literal["auto"], cpus: int, members: int, n: int) -> None:
    want = ThreadPlan(intra_op=n, inter_op=n, grpc_queues=n, grpc_threads=n)
    assert thread_plan(setting, cpus, members) == want


@pytest.mark.parametrize(
    ("distribute", "members"),
    [
        ({}, 1),
        ({"strategy": "mirrored", "replicas": 2}, 1),  # one process over several devices
        ({"strategy": "multi_worker", "nodes": 3}, 3),  # engine local: every member on this host
        ({"strategy": "multi_worker", "nodes": 4, "engine": "slurm"}, 1),  # srun's affinity is the share
    ],
)
def test_members_here(distribute: dict[str, Any], members: int) -> None:
    assert members_here(_spec(distribute=distribute)) == members


@pytest.mark.parametrize(
    ("resources", "want"),
    [({}, "auto"), ({"threads": "auto"}, "auto"), ({"threads": 3}, 3)],
)
def test_resources_threads_in_the_job_file(resources: dict[str, Any], want: int | str) -> None:
    assert _spec(resources=resources).resources.threads == want


@pytest.mark.parametrize("bad", [0, 1025, "3", "many", True, 2.5])
def test_resources_threads_refuses_anything_but_auto_or_a_count(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"resources\.threads"):
        JobSpec.model_validate(
            {"name": "j", "model": "m.py:build", "resources": {"threads": bad}}, context={"job_file": True}
        )


def test_collectives_have_no_timeout_unless_the_job_sets_one() -> None:
    """Each collective with a timeout costs TensorFlow a thread sleeping that long: off by
    default, a backstop the job may still ask for."""
    multi = {"strategy": "multi_worker", "nodes": 2}
    assert _spec(distribute=multi).distribute.collective_timeout_seconds is None
    timed = _spec(distribute={**multi, "collective_timeout_seconds": 900})
    assert timed.distribute.collective_timeout_seconds == 900

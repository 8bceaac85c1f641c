"""Kernel-log OOM evidence: parsing /dev/kmsg records (table) and matching them to a worker."""

from __future__ import annotations

import pytest

from ckptd.supervisor.kmsg import OomKill, evidence_for, parse_record

# Real record formats (kernel 6.x, 5.x and the pre-5.0 two-line form), and lines that mention
# a pid or memory but are not kills.
PARSE = [
    (
        "3,901,27997619276,-;Memory cgroup out of memory: Killed process 13712 (python) "
        "total-vm:3219304kB, anon-rss:1537656kB, file-rss:425040kB, shmem-rss:0kB, UID:0",
        OomKill(
            13712,
            27997.619276,
            "Memory cgroup out of memory: Killed process 13712 (python) "
            "total-vm:3219304kB, anon-rss:1537656kB, file-rss:425040kB, shmem-rss:0kB, UID:0",
        ),
    ),
    (
        "3,2044,5123000000,-;Out of memory: Killed process 4242 (python3) total-vm:9000kB, "
        "anon-rss:8000kB, file-rss:0kB, shmem-rss:0kB, UID:1000 pgtables:40kB oom_score_adj:0",
        OomKill(
            4242,
            5123.0,
            "Out of memory: Killed process 4242 (python3) total-vm:9000kB, "
            "anon-rss:8000kB, file-rss:0kB, shmem-rss:0kB, UID:1000 pgtables:40kB "
            "oom_score_adj:0",
        ),
    ),
    (
        "3,77,1000000,-;Out of memory: Kill process 99 (java) score 912 or sacrifice child",
        OomKill(99, 1.0, "Out of memory: Kill process 99 (java) score 912 or sacrifice child"),
    ),
    ("6,902,27997619300,-;oom_reaper: reaped process 13712 (python), now anon-rss:0kB", None),
    ("4,903,27997619000,-;python invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0", None),
    ("6,904,1,-;Killed process 5 (bash) by an operator's note", None),  # no "out of memory"
    ("garbage without a header", None),
    ("3,905,notanumber,-;Out of memory: Killed process 7 (x) total-vm:1kB", None),
]


@pytest.mark.parametrize(("record", "expected"), PARSE)
def test_parse_record(record: str, expected: OomKill | None) -> None:
    assert parse_record(record) == expected


KILLS = [
    OomKill(100, 50.0, "Out of memory: Killed process 100 (python) old"),
    OomKill(100, 500.0, "Out of memory: Killed process 100 (python) new"),
    OomKill(200, 499.5, "Memory cgroup out of memory: Killed process 200 (python)"),
]

EVIDENCE = [
    (100, 400.0, "kernel log: Out of memory: Killed process 100 (python) new"),
    (100, 600.0, None),  # both kills predate this process: the pid was reused
    (200, 500.0, "kernel log: Memory cgroup out of memory: Killed process 200 (python)"),  # slack
    (300, 0.0, None),
]


@pytest.mark.parametrize(("pid", "since", "expected"), EVIDENCE)
def test_evidence_for(pid: int, since: float, expected: str | None) -> None:
    assert evidence_for(KILLS, pid, since) == expected

"""ckptd.daemon.mounts: outputs on mounts the service's sandbox makes read-only are refused at submit."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from .conftest import write_job
from .daemonproc import start_daemon

ROOT = Path(__file__).resolve().parent.parent


# -- outputs on read-only mounts (the unit's ProtectSystem / ProtectHome) --------------------------

MOUNTINFO_SAMPLE = """\
22 1 8:1 / / ro,relatime shared:1 - ext4 /dev/sda1 rw
23 22 8:1 /var/lib/ckptd /var/lib/ckptd rw,relatime shared:2 - ext4 /dev/sda1 rw
24 22 8:2 / /home ro,nosuid shared:3 - ext4 /dev/sda2 rw
25 24 8:2 /alice/ckpt /home/alice/ckpt rw,nosuid shared:4 - ext4 /dev/sda2 rw
26 22 0:5 / /mnt/my\\040disk rw shared:5 - ext4 /dev/sdb1 rw
27 22 0:6 / /data rw shared:6 - nfs srv:/x ro
"""

RO_CASES = [
    # checkpoint.dir -> problem mentions (None: no problem)
    ("/var/lib/ckptd/jobs/x/ck", None),
    ("/var/lib/ckptdx/ck", "ProtectSystem=strict"),  # a prefix of a name is not its mount
    ("/home/alice/ckpt/run1", None),  # ReadWritePaths= made it writable
    ("/home/alice/other", "ProtectHome=read-only"),
    ("/home/alice/ckpt/../other", "ProtectHome=read-only"),  # lexically normalised
    ("/mnt/my disk/ck", None),  # mountinfo's octal escapes
    ("/data/ck", "(/data)"),  # read-only at the superblock
    ("ck", None),  # relative: under the run directory
]


@pytest.mark.parametrize(("ckdir", "expect"), RO_CASES)
def test_outputs_on_read_only_mounts(tmp_path: Path, ckdir: str, expect: str | None) -> None:
    from ckptd.daemon.mounts import parse_mountinfo, read_only_outputs
    from ckptd.state.jobfile import parse_job

    job = write_job(tmp_path)
    job.write_text(job.read_text().replace("every_steps: 20,", f"dir: '{ckdir}', every_steps: 20,"))
    spec = parse_job(job.read_bytes(), str(job), job.parent, check=False)  # as the daemon does
    problems = read_only_outputs(spec, "job.yaml", parse_mountinfo(MOUNTINFO_SAMPLE), True)
    if expect is None:
        assert problems == []
    else:
        (problem,) = problems
        assert problem.startswith("job.yaml: checkpoint.dir: ") and expect in problem, problem


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root for a read-only bind mount in a private mount namespace",
)
def test_a_daemon_refuses_outputs_its_sandbox_makes_read_only(tmp_path: Path) -> None:
    """The daemon sees a read-only mount its submitter does not (the unit's sandbox, here a
    private mount namespace): the submit is a 400 naming the field and the setting."""
    ro = tmp_path / "ro"
    ro.mkdir()
    wrap = [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        f'mount --bind -o ro "{ro}" "{ro}" && exec "$@"',
        "sh",
    ]
    d = start_daemon(tmp_path / "home", wrap=wrap, INVOCATION_ID="test")
    try:
        job = write_job(tmp_path)
        text = job.read_text().replace("every_steps: 20,", f"dir: '{ro}/ck', every_steps: 20,")
        from ckptd.daemon.client import ApiRefused

        with pytest.raises(ApiRefused) as e:
            d.api("POST", "/v1/jobs", {"raw": text, "job_file": str(job)})
        (problem,) = e.value.payload["problems"]
        assert e.value.status == 400 and "checkpoint.dir" in problem, problem
        assert "read-only mount" in problem and f"ReadWritePaths={ro}/ck" in problem, problem
        assert d.api("GET", "/v1/jobs") == []
    finally:
        d.stop()

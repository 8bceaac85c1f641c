"""Memory cgroups: parsing /proc/self/cgroup, the OOM-kill counters, creating a limited child."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptd.supervisor import cgroups
from ckptd.supervisor.cgroups import MemoryCgroup


@pytest.mark.parametrize(
    ("text", "v2", "v1"),
    [
        ("0::/system.slice/ckptd.service\n", "/system.slice/ckptd.service", None),
        ("4:memory:/process_api/abc\n0::/\n", "/", "/process_api/abc"),
        ("5:cpu,memory:/x\n", None, "/x"),
        ("1:name=systemd:/\n", None, None),
    ],
)
def test_own_paths(text: str, v2: str | None, v1: str | None) -> None:
    assert cgroups._own_paths(text) == (v2, v1)


@pytest.mark.parametrize(
    ("version", "name", "content", "kills"),
    [
        (2, "memory.events", "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\n", 1),
        (1, "memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n", 3),
        (2, "memory.events", "low 0\n", 0),
        (1, "missing", "", 0),
    ],
)
def test_oom_kills(tmp_path: Path, version: int, name: str, content: str, kills: int) -> None:
    (tmp_path / name).write_text(content)
    assert MemoryCgroup(tmp_path, version, 1).oom_kills() == kills


@pytest.mark.parametrize(("version", "limit_file"), [(2, "memory.max"), (1, "memory.limit_in_bytes")])
def test_create_writes_the_limit(tmp_path: Path, version: int, limit_file: str) -> None:
    cg = cgroups.create("ckptd-worker-1", 1 << 30, parent=(tmp_path, version))
    assert cg is not None and (cg.path / limit_file).read_text() == f"{1 << 30}\n"
    for f in cg.path.iterdir():  # a real cgroup directory is emptied by the kernel
        f.unlink()
    cg.remove()
    assert not cg.path.exists()


def test_no_cgroup_when_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPTD_MEMORY_CGROUPS", "0")
    assert cgroups.parent_cgroup() is None and cgroups.create("x", 1) is None


def test_a_delegated_unit_cgroup_gets_a_supervisor_leaf_and_memory_for_its_children(tmp_path: Path) -> None:
    """systemd Delegate=memory: move every process of the unit's cgroup into `supervisor/` (v2's
    no-internal-processes rule), enable memory for the children, create workers beside it.
    (Plain files stand in for cgroupfs: the kernel would also refuse steps not permitted.)"""
    unit = tmp_path / "system.slice" / "ckptd.service"
    unit.mkdir(parents=True)
    (unit / "cgroup.procs").write_text("4242\n")
    (unit / "cgroup.subtree_control").write_text("")
    assert cgroups.delegated_base("/system.slice/ckptd.service", root=tmp_path) == unit
    assert (unit / "supervisor" / "cgroup.procs").read_text() == "4242\n"
    assert (unit / "cgroup.subtree_control").read_text() == "+memory\n"
    # Later calls, from inside the leaf, find memory enabled and move nothing.
    (unit / "cgroup.subtree_control").write_text("memory\n")
    (unit / "supervisor" / "cgroup.procs").unlink()
    assert cgroups.delegated_base("/system.slice/ckptd.service/supervisor", root=tmp_path) == unit
    assert not (unit / "supervisor" / "cgroup.procs").exists()


def test_no_delegation_where_the_unit_cgroup_is_not_ours(tmp_path: Path) -> None:
    assert cgroups.delegated_base("/system.slice/other.service", root=tmp_path) is None

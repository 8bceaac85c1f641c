"""Checkpoint files without TensorFlow: manifests, verification, quarantine, GC, symlink safety."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptd.state import ckptfiles as cf


def _fake_ckpt(d: Path, n: int, step: int) -> cf.Manifest:
    (d / f"ckpt-{n}.index").write_bytes(b"index" * 10 + bytes([n]))
    (d / f"ckpt-{n}.data-00000-of-00001").write_bytes(b"data" * 100 + bytes([n]))
    m = cf.build_manifest(d, n, step, 0, step, {"loss": 1.0})
    (d / f"ckpt-{n}.manifest.json").write_text(m.to_json())
    return m


@pytest.fixture
def ckdir(tmp_path: Path) -> Path:
    d = tmp_path / "checkpoints"
    d.mkdir()
    for n in (1, 2, 3):
        _fake_ckpt(d, n, n * 20)
    return d


DAMAGE = {
    "index truncated": lambda d: (d / "ckpt-3.index").write_bytes(b"index"),
    "index empty": lambda d: (d / "ckpt-3.index").write_bytes(b""),
    "index bit flip": lambda d: (d / "ckpt-3.index").write_bytes(b"indez" + b"index" * 9 + bytes([3])),
    "data missing": lambda d: (d / "ckpt-3.data-00000-of-00001").unlink(),
    "data is a symlink": lambda d: (
        (d / "ckpt-3.data-00000-of-00001").unlink(),
        (d / "ckpt-3.data-00000-of-00001").symlink_to("/etc/hostname"),
    ),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_verify_detects_damage(ckdir: Path, kind: str) -> None:
    good, bad = cf.read_manifests(ckdir)
    assert [m.number for m in good] == [1, 2, 3] and not bad
    DAMAGE[kind](ckdir)
    assert cf.verify_files(ckdir, good[-1]) is not None
    assert cf.verify_files(ckdir, good[-2]) is None


def test_data_files_are_covered_by_the_index_digest_not_their_own(ckdir: Path) -> None:
    """A data file's bit flip passes this check by design: the index (hashed) holds every
    tensor's CRC32C, which TF checks when the restore reads each tensor (tests/test_resume_faults)."""
    man = cf.read_manifests(ckdir)[0][-1]
    assert set(man.files["ckpt-3.index"]) == {"size", "sha256"}
    assert set(man.files["ckpt-3.data-00000-of-00001"]) == {"size"}
    (ckdir / "ckpt-3.data-00000-of-00001").write_bytes(b"dbta" + b"data" * 99 + bytes([3]))
    assert cf.verify_files(ckdir, man) is None


def test_older_manifests_with_data_digests_are_still_checked(ckdir: Path) -> None:
    man = cf.read_manifests(ckdir)[0][-1]
    data = ckdir / "ckpt-3.data-00000-of-00001"
    man.files[data.name]["sha256"] = cf.sha256_file(data)
    assert cf.verify_files(ckdir, man) is None
    data.write_bytes(b"dbta" + b"data" * 99 + bytes([3]))
    assert "SHA-256" in (cf.verify_files(ckdir, man) or "")


def test_garbage_manifest_is_reported(ckdir: Path) -> None:
    (ckdir / "ckpt-3.manifest.json").write_text("{not json")
    good, bad = cf.read_manifests(ckdir)
    assert [m.number for m in good] == [1, 2] and list(bad) == [3]


def test_quarantine_moves_never_deletes(ckdir: Path) -> None:
    before = {p.name: p.read_bytes() for p in ckdir.glob("ckpt-3*")}
    dest = cf.quarantine(ckdir, 3, "bit flip")
    assert not list(ckdir.glob("ckpt-3*"))
    assert {p.name: p.read_bytes() for p in dest.glob("ckpt-3*")} == before
    assert (dest / "reason.txt").read_text() == "bit flip\n"
    assert [m.number for m in cf.read_manifests(ckdir)[0]] == [1, 2]


def test_gc_removes_debris_only_and_never_follows_symlinks(ckdir: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    victim_dir = tmp_path / "victim_dir"
    victim_dir.mkdir()
    (victim_dir / "f").write_text("precious")
    (ckdir / "ckpt-9.index").symlink_to(victim)
    (ckdir / "ckpt-7_temp").symlink_to(victim_dir)
    (ckdir / "ckpt-4.data-00000-of-00001").write_bytes(b"x")  # .data without .index
    (ckdir / "ckpt-5_temp_abc").mkdir()
    (ckdir / "ckpt-5_temp_abc" / "part").write_bytes(b"x")
    (ckdir / "checkpoint.tmp1234").write_text("x")
    (ckdir / "ckpt-6.index.tempstate123").write_text("x")
    (ckdir / "notes.txt").write_text("user file")
    removed = cf.collect_garbage(ckdir, {1, 2, 3})
    assert sorted(removed) == sorted(
        [
            "ckpt-9.index",
            "ckpt-7_temp",
            "ckpt-4.data-00000-of-00001",
            "ckpt-5_temp_abc",
            "checkpoint.tmp1234",
            "ckpt-6.index.tempstate123",
        ]
    )
    assert victim.read_text() == "precious" and (victim_dir / "f").read_text() == "precious"
    assert (ckdir / "notes.txt").exists()
    assert [m.number for m in cf.read_manifests(ckdir)[0]] == [1, 2, 3]


def test_state_file_matches_commits(ckdir: Path) -> None:
    cf.write_state_file(ckdir, cf.read_manifests(ckdir)[0])
    text = (ckdir / "checkpoint").read_text()
    assert text.startswith('model_checkpoint_path: "ckpt-3"')
    assert text.count("all_model_checkpoint_paths") == 3


def test_restore_marker_round_trip(ckdir: Path) -> None:
    assert cf.read_restore_marker(ckdir) == {}
    cf.write_restore_marker(ckdir, 3, 2)
    assert cf.read_restore_marker(ckdir) == {"number": 3, "count": 2}
    cf.clear_restore_marker(ckdir)
    assert cf.read_restore_marker(ckdir) == {}


def _victim_dir(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A directory outside the job, holding names that GC, rotation and quarantine act on."""
    victim = tmp_path / "victim" / "checkpoints"
    victim.mkdir(parents=True)
    for name in ("ckpt-9.index", "ckpt-3.manifest.json", "ckpt-3.index", "checkpoint.tmp1"):
        (victim / name).write_bytes(b"precious " + name.encode())
    return victim, {p.name: p.read_bytes() for p in victim.iterdir()}


@pytest.mark.parametrize("swap", ["directory", "parent"])
def test_a_symlink_swapped_in_after_start_redirects_nothing(ckdir: Path, tmp_path: Path, swap: str) -> None:
    """The job resolved its checkpoint directory when it started; then the directory (or a
    parent) is replaced by a symlink to a victim. GC, rotation and quarantine refuse and the
    victim keeps every file."""
    pinned = cf.real_dir(ckdir)
    victim, before = _victim_dir(tmp_path)
    moved = tmp_path / "moved-away"
    if swap == "directory":
        ckdir.rename(moved)
        ckdir.symlink_to(victim)
    else:  # p/checkpoints was the job's; p becomes a symlink, p/checkpoints names the victim
        parent = ckdir.parent / "p"
        parent.mkdir()
        ckdir.rename(parent / "checkpoints")
        pinned = cf.real_dir(parent / "checkpoints")
        parent.rename(moved)
        parent.symlink_to(victim.parent)
        assert (pinned / "ckpt-9.index").read_bytes() == before["ckpt-9.index"]
    for act in (
        lambda: cf.collect_garbage(pinned, set()),
        lambda: cf.unlink_in(pinned, "ckpt-3.manifest.json"),
        lambda: cf.quarantine(pinned, 3, "x"),
    ):
        with pytest.raises(cf.DirectoryMoved):
            act()
    assert {p.name: p.read_bytes() for p in victim.iterdir()} == before


def test_a_quarantine_symlink_is_not_followed(ckdir: Path, tmp_path: Path) -> None:
    victim, before = _victim_dir(tmp_path)
    (ckdir / cf.QUARANTINE).symlink_to(victim)
    with pytest.raises(OSError):
        cf.quarantine(ckdir, 3, "bit flip")
    assert {p.name: p.read_bytes() for p in victim.iterdir()} == before
    assert [m.number for m in cf.read_manifests(ckdir)[0]] == [1, 2, 3]  # nothing moved

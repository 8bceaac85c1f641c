"""The async saver's shared-memory segment at a job's end (ckptd.state.paths.remove_segment): the
job's own is removed, nothing else under its guessable name is."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckptd.state.paths import SHM_DIR, async_segment_name, remove_segment


@pytest.fixture
def segment(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A checkpoint directory of the test's own and the segment path its name gives."""
    ckdir = tmp_path / "checkpoints"
    ckdir.mkdir()
    path = SHM_DIR / async_segment_name(ckdir)
    yield ckdir, path
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        path.rmdir()


def test_the_owners_segment_is_removed(segment: tuple[Path, Path]) -> None:
    ckdir, path = segment
    path.write_bytes(b"\0" * 4096)
    assert remove_segment(ckdir, os.getuid()) is True
    assert not path.exists()
    assert remove_segment(ckdir, os.getuid()) is False  # nothing left: nothing to do


def test_the_name_follows_the_directory_not_a_symlink_to_it(segment: tuple[Path, Path]) -> None:
    ckdir, _ = segment
    link = ckdir.parent / "via-link"
    link.symlink_to(ckdir)
    assert async_segment_name(link) == async_segment_name(ckdir)  # what the worker resolved


def test_another_users_file_under_the_name_stays(segment: tuple[Path, Path]) -> None:
    ckdir, path = segment
    path.write_bytes(b"theirs")
    assert remove_segment(ckdir, os.getuid() + 1) is False
    assert path.read_bytes() == b"theirs"


@pytest.mark.parametrize("kind", ["symlink", "directory"])
def test_only_a_regular_file_is_removed(segment: tuple[Path, Path], tmp_path: Path, kind: str) -> None:
    ckdir, path = segment
    target = tmp_path / "target"
    target.write_text("keep")
    if kind == "symlink":
        path.symlink_to(target)
    else:
        path.mkdir()
    assert remove_segment(ckdir, os.getuid()) is False
    assert os.path.lexists(path) and target.read_text() == "keep"

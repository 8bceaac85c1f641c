"""ckptd.state.durable: atomic writes that survive a power cut (temp, fsync, rename, fsync dir)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ckptd.state import durable


def test_atomic_write_fsyncs_file_then_renames_then_fsyncs_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append("fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-file")
        real_fsync(fd)

    def replace(a: str, b: str) -> None:
        calls.append("rename")
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    durable.atomic_write_text(tmp_path / "f.json", "{}")
    assert calls == ["fsync-file", "rename", "fsync-dir"]
    assert (tmp_path / "f.json").read_text() == "{}"


def test_atomic_write_keeps_old_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "w.h5"
    target.write_text("old")

    def boom(path: Path) -> None:
        path.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        durable.atomic_write_with(target, boom)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.h5"]  # no temp left behind


def test_fsync_error_is_raised_not_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def eio(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(OSError, match="Input/output"):
        durable.atomic_write_text(tmp_path / "x", "data")
    assert not (tmp_path / "x").exists()

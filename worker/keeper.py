"""Checkpoint commit protocol on top of tf.train.CheckpointManager.

save:    TF writes ckpt-N (atomic against a process kill, never fsynced) → ckptd fsyncs every file
         of N and the directory → writes the manifest ckpt-N.manifest.json durably (sizes, SHA-256,
         step, epoch, metrics). The manifest is the commit record: without it, N does not exist.
         Only then are older checkpoints deleted (manifest first, then files).
restore: newest committed checkpoint whose files match its manifest; a damaged one falls back to
         the previous. TF's `checkpoint` state file is never trusted (tensorflow#35148).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tensorflow as tf
from ckptd.state.durable import atomic_write_text, fsync_dir, fsync_file
from ckptd.state.retention import Committed, to_delete

PREFIX = "ckpt"
_MANIFEST_RE = re.compile(rf"^{PREFIX}-(\d+)\.manifest\.json$")
_FILE_RE = re.compile(rf"^{PREFIX}-(\d+)\.(index|data-\d+-of-\d+)$")


@dataclass
class Manifest:
    number: int
    step: int
    epoch: int
    step_in_epoch: int
    wall_time: float
    files: dict[str, dict[str, Any]]
    metrics: dict[str, float]
    digest: str

    @property
    def prefix(self) -> str:
        return f"{PREFIX}-{self.number}"


class NoValidCheckpoint(Exception):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _files_of(directory: Path, number: int) -> list[Path]:
    return sorted(p for p in directory.iterdir()
                  if (m := _FILE_RE.match(p.name)) and int(m.group(1)) == number)


class Keeper:
    def __init__(self, directory: Path, ckpt: tf.train.Checkpoint, max_to_keep: int,
                 keep_every_n_hours: float | None) -> None:
        self.dir = directory
        self.ckpt = ckpt
        self.max_to_keep = max_to_keep
        self.keep_every_n_hours = keep_every_n_hours
        self.retired: list[Manifest] = []
        # max_to_keep=None: TF must never delete anything; retention happens after our commit.
        self.manager = tf.train.CheckpointManager(ckpt, str(directory), max_to_keep=None,
                                                  checkpoint_name=PREFIX)

    # -- reading --------------------------------------------------------------------------

    def committed(self) -> list[Manifest]:
        out = []
        for p in self.dir.iterdir():
            if _MANIFEST_RE.match(p.name):
                try:
                    out.append(Manifest(**json.loads(p.read_text())))
                except (OSError, ValueError, TypeError):
                    continue  # unreadable manifest: not a commit record we can trust
        return sorted(out, key=lambda m: m.number)

    def _intact(self, m: Manifest) -> str | None:
        """Why `m` cannot be restored, or None. Cheap check: every file present with its size."""
        for name, meta in m.files.items():
            p = self.dir / name
            try:
                size = p.stat().st_size
            except FileNotFoundError:
                return f"{name} is missing"
            if size != meta["size"]:
                return f"{name} is {size} bytes, manifest says {meta['size']}"
        return None

    def collect_garbage(self) -> list[str]:
        """Remove leftovers of interrupted saves: uncommitted ckpt-N files, *_temp dirs,
        checkpoint.tmp* files. Only names ckptd or TF create, only inside this directory."""
        committed = {m.number for m in self.committed()}
        removed = []
        for p in self.dir.iterdir():
            m = _FILE_RE.match(p.name)
            stray = (m and int(m.group(1)) not in committed) or p.name.startswith("checkpoint.tmp")
            temp_dir = p.name.startswith(f"{PREFIX}-") and p.name.endswith("_temp")
            if p.is_symlink():
                if stray or temp_dir:
                    p.unlink()
                    removed.append(p.name)
            elif temp_dir and p.is_dir():
                shutil.rmtree(p)
                removed.append(p.name)
            elif stray and p.is_file():
                p.unlink()
                removed.append(p.name)
        if removed:
            fsync_dir(self.dir)
        return removed

    def restore(self, log: Any) -> Manifest | None:
        """Restore the newest intact committed checkpoint; None if there never was one."""
        committed = self.committed()
        for m in reversed(committed):
            problem = self._intact(m)
            if problem is None:
                try:
                    self.ckpt.restore(str(self.dir / m.prefix)).assert_existing_objects_matched()
                    return m
                except Exception as e:  # TF raises OpError, IndexError, ValueError, ...
                    problem = f"restore failed: {type(e).__name__}: {e}"
            log("checkpoint.unusable", number=m.number, step=m.step, reason=problem)
        if committed:
            raise NoValidCheckpoint(f"{len(committed)} committed checkpoint(s) in {self.dir}, "
                                    "none restorable")
        return None

    # -- writing --------------------------------------------------------------------------

    def save(self, step: int, epoch: int, step_in_epoch: int,
             metrics: dict[str, float]) -> Manifest:
        path = Path(self.manager.save())
        number = int(path.name.rsplit("-", 1)[1])
        files = _files_of(self.dir, number)
        for f in files:
            fsync_file(f)
        fsync_dir(self.dir)
        digest = hashlib.sha256()
        meta: dict[str, dict[str, Any]] = {}
        for f in files:
            sha = _sha256(f)
            meta[f.name] = {"size": f.stat().st_size, "sha256": sha}
            digest.update(f"{f.name}:{sha}\n".encode())
        manifest = Manifest(number=number, step=step, epoch=epoch, step_in_epoch=step_in_epoch,
                            wall_time=time.time(), files=meta, metrics=metrics,
                            digest=digest.hexdigest())
        atomic_write_text(self.dir / f"{manifest.prefix}.manifest.json",
                          json.dumps(manifest.__dict__, sort_keys=True))
        self.retired = self._rotate()
        return manifest

    def _rotate(self) -> list[Manifest]:
        """Apply retention after a commit; returns the manifests of deleted checkpoints."""
        committed = self.committed()
        doomed = to_delete([Committed(m.number, m.wall_time) for m in committed],
                           self.max_to_keep, self.keep_every_n_hours)
        for number in doomed:
            # Manifest first: a crash midway leaves uncommitted files, which GC removes.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.dir / f"{PREFIX}-{number}.manifest.json")
        if doomed:
            fsync_dir(self.dir)
            self.collect_garbage()
        return [m for m in committed if m.number in doomed]

"""The on-disk side of committed checkpoints, without TensorFlow: manifests (the commit records),
verification against them, quarantine, garbage collection and TF's `checkpoint` state file.

A checkpoint `ckpt-N` exists only once `ckpt-N.manifest.json` does. Nothing here deletes or moves
anything outside the checkpoint directory, and symlinks are never followed.
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

from ckptd.state.durable import atomic_write_text, fsync_dir, write_nondurable

PREFIX = "ckpt"
QUARANTINE = "quarantine"
RESTORE_MARKER = ".restoring.json"
MANIFEST_RE = re.compile(rf"^{PREFIX}-(\d+)\.manifest\.json$")
FILE_RE = re.compile(rf"^{PREFIX}-(\d+)\.(index|data-\d+-of-\d+)$")
TEMP_DIR_RE = re.compile(rf"^{PREFIX}-\d+_temp.*$")


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

    def to_dict(self) -> dict[str, Any]:
        # Shallow on purpose: dataclasses.asdict deep-copies every file entry, a record that is
        # pickled or serialised right away (it stood out in a cProfile of the writer).
        return dict(vars(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def files_of(directory: Path, number: int) -> list[Path]:
    return sorted(p for p in directory.iterdir()
                  if (m := FILE_RE.match(p.name)) and int(m.group(1)) == number)


def build_manifest(directory: Path, number: int, step: int, epoch: int, step_in_epoch: int,
                   metrics: dict[str, float]) -> Manifest:
    """The commit record of ckpt-N: every file's size, and the SHA-256 of its `.index`.

    The index records each tensor's shard, offset, size and CRC32C, and TF checks that CRC32C on
    every read (a flipped bit is a DataLossError), so hashing the index covers the data files'
    content as well; hashing the data files too cost the writer 60 ms of CPU per 100 MB commit,
    taken from training on a 2-core box. Restores read every tensor (ckptd.worker.keeper)."""
    files: dict[str, dict[str, Any]] = {}
    total = hashlib.sha256()
    for f in files_of(directory, number):
        entry: dict[str, Any] = {"size": f.stat().st_size}
        if f.name.endswith(".index"):
            entry["sha256"] = sha256_file(f)
        files[f.name] = entry
        total.update(f"{f.name}:{entry.get('sha256', entry['size'])}\n".encode())
    if not any(name.endswith(".index") for name in files):
        raise OSError(f"{PREFIX}-{number}: no .index file was written")
    return Manifest(number, step, epoch, step_in_epoch, time.time(), files, metrics,
                    total.hexdigest())


def read_manifests(directory: Path) -> tuple[list[Manifest], dict[int, str]]:
    """Committed manifests (oldest first), and the numbers of unreadable ones with the reason."""
    good: list[Manifest] = []
    bad: dict[int, str] = {}
    for p in directory.iterdir():
        m = MANIFEST_RE.match(p.name)
        if not m or p.is_symlink():
            continue
        try:
            man = Manifest(**json.loads(p.read_text()))
            if man.number != int(m.group(1)):
                raise ValueError("number does not match the file name")
            good.append(man)
        except (OSError, ValueError, TypeError) as e:
            bad[int(m.group(1))] = f"manifest unreadable: {type(e).__name__}: {e}"
    return sorted(good, key=lambda x: x.number), bad


def verify_files(directory: Path, man: Manifest, digests: bool = True) -> str | None:
    """Why the files of `man` do not match it (missing, wrong size, wrong SHA-256), or None.
    Data files carry no SHA-256 of their own (see build_manifest): reading their tensors checks
    them."""
    for name, meta in sorted(man.files.items()):
        p = directory / name
        if p.is_symlink() or not p.is_file():
            return f"{name} is missing"
        size = p.stat().st_size
        if size != meta["size"]:
            return f"{name} is {size} bytes, the manifest says {meta['size']}"
        if digests and "sha256" in meta and sha256_file(p) != meta["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest (bit rot or tampering)"
    return None


def quarantine(directory: Path, number: int, reason: str) -> Path:
    """Move ckpt-N (files and manifest) into quarantine/ with the reason; never delete it."""
    dest = directory / QUARANTINE / f"{PREFIX}-{number}-{time.strftime('%Y%m%dT%H%M%S')}"
    dest.mkdir(parents=True, exist_ok=True)
    names = [p for p in directory.iterdir()
             if (m := FILE_RE.match(p.name) or MANIFEST_RE.match(p.name))
             and int(m.group(1)) == number]
    atomic_write_text(dest / "reason.txt", reason + "\n")
    # The manifest moves first: from then on N is not committed, whatever else happens.
    for p in sorted(names, key=lambda p: not p.name.endswith(".manifest.json")):
        os.replace(p, dest / p.name)
    fsync_dir(dest)
    fsync_dir(directory)
    return dest


def collect_garbage(directory: Path, committed: set[int]) -> list[str]:
    """Remove leftovers of interrupted saves: uncommitted ckpt-N files, `ckpt-N_temp*` dirs,
    `checkpoint.tmp*`, `.checkpoint.*.tmp` and `*.tempstate*` files. Symlinks are unlinked, never
    followed. The removals are not fsynced: files that reappear after a power cut are still
    uncommitted, and the next collection removes them again."""
    removed = []
    for p in directory.iterdir():
        m = FILE_RE.match(p.name)
        stray = bool(m and int(m.group(1)) not in committed) or p.name.startswith(
            ("checkpoint.tmp", ".checkpoint.")) or ".tempstate" in p.name
        temp_dir = bool(TEMP_DIR_RE.match(p.name))
        if not (stray or temp_dir):
            continue
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)
        removed.append(p.name)
    return removed


def write_state_file(directory: Path, committed: list[Manifest]) -> None:
    """Rewrite TF's `checkpoint` state file to match what is committed, so tools that read it
    (`tf.train.latest_checkpoint`) agree with ckptd. Atomic but not fsynced: ckptd never trusts
    this file and rewrites it at every restore, so two fsyncs per commit would buy nothing."""
    target = directory / "checkpoint"
    if not committed:
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
        return
    lines = [f'model_checkpoint_path: "{committed[-1].prefix}"']
    lines += [f'all_model_checkpoint_paths: "{m.prefix}"' for m in committed]
    write_nondurable(target, ("\n".join(lines) + "\n").encode())


def read_restore_marker(directory: Path) -> dict[str, int]:
    try:
        data = json.loads((directory / RESTORE_MARKER).read_text())
        return {"number": int(data["number"]), "count": int(data["count"])}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def write_restore_marker(directory: Path, number: int, count: int) -> None:
    """Durable count of restores of ckpt-N begun and not finished: if restoring N kills the
    worker (segfault, hang, OOM) twice, N is quarantined instead of crash-looping."""
    atomic_write_text(directory / RESTORE_MARKER, json.dumps({"number": number, "count": count}))


def clear_restore_marker(directory: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (directory / RESTORE_MARKER).unlink()

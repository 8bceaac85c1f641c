"""The on-disk side of committed checkpoints, without TensorFlow: manifests (the commit records),
verification against them, quarantine, garbage collection and TF's `checkpoint` state file.

A checkpoint `ckpt-N` exists only once `ckpt-N.manifest.json` does. Nothing here deletes or moves
anything outside the checkpoint directory, and symlinks are never followed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptd.state.durable import atomic_write_text, write_nondurable

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
    # Who committed it: the attempt (a gang's generation: a stale gang's chief finds a newer
    # one and stops instead of committing), the gang's members and replicas. Defaults: a
    # manifest written before they were recorded.
    generation: int = 0
    world_size: int = 1
    replicas: int = 1

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
    return sorted(
        p for p in directory.iterdir() if (m := FILE_RE.match(p.name)) and int(m.group(1)) == number
    )


def build_manifest(
    directory: Path,
    number: int,
    step: int,
    epoch: int,
    step_in_epoch: int,
    metrics: dict[str, float],
    who: tuple[int, int, int] = (0, 1, 1),
) -> Manifest:
    """The commit record of ckpt-N: every file's size, and the SHA-256 of its `.index`.

    The index records each tensor's shard, offset, size and CRC32C, and TF checks that CRC32C on
    every read (a flipped bit is a DataLossError), so hashing the index covers the data files'
    content as well; hashing the data files too cost the writer 60 ms of CPU per 100 MB commit,
    taken from training on a 2-core box. Restores read every tensor (ckptd.worker.checkpoint.keeper)."""
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
    return Manifest(number, step, epoch, step_in_epoch, time.time(), files, metrics, total.hexdigest(), *who)


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


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class DirectoryMoved(OSError):
    """A component of a checkpoint directory's path became a symlink after the job started."""


@contextlib.contextmanager
def pinned(directory: Path) -> Iterator[int]:
    """A descriptor of `directory` (a real path, resolved when the job started), opened one
    component at a time from / without following any symlink. Deleting, rotating and
    quarantining go through it, so a symlink swapped in later cannot redirect them outside."""
    # O_PATH for the way down: a traversable (x-only) parent need not be readable.
    fd = os.open("/", _PATH_FLAGS)
    try:
        parts = directory.parts[1:]
        for i, name in enumerate(parts):
            try:
                nxt = os.open(name, _DIR_FLAGS if i == len(parts) - 1 else _PATH_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise DirectoryMoved(
                        e.errno,
                        f"{name} in the checkpoint directory's path "
                        "is now a symlink; nothing outside it is touched",
                        str(directory),
                    ) from e
                raise
            os.close(fd)
            fd = nxt
        yield fd
    finally:
        os.close(fd)


def real_dir(directory: Path) -> Path:
    """Resolve once, at the start: later operations follow no symlink at all."""
    return Path(os.path.realpath(directory))


def unlink_in(directory: Path, name: str) -> None:
    with pinned(directory) as fd, contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=fd)


def quarantine(directory: Path, number: int, reason: str) -> Path:
    """Move ckpt-N (files and manifest) into quarantine/ with the reason; never delete it."""
    stamp = f"{PREFIX}-{number}-{time.strftime('%Y%m%dT%H%M%S')}"
    with pinned(directory) as fd:
        with contextlib.suppress(FileExistsError):
            os.mkdir(QUARANTINE, 0o750, dir_fd=fd)
        qfd = os.open(QUARANTINE, _DIR_FLAGS, dir_fd=fd)
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(stamp, 0o750, dir_fd=qfd)
            dfd = os.open(stamp, _DIR_FLAGS, dir_fd=qfd)
        finally:
            os.close(qfd)
        try:
            names = [
                n
                for n in os.listdir(fd)
                if (m := FILE_RE.match(n) or MANIFEST_RE.match(n)) and int(m.group(1)) == number
            ]
            rfd = os.open(
                "reason.txt",
                os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o640,
                dir_fd=dfd,
            )
            with os.fdopen(rfd, "w") as f:
                f.write(reason + "\n")
                f.flush()
                os.fsync(f.fileno())
            # The manifest moves first: from then on N is not committed, whatever else happens.
            for n in sorted(names, key=lambda n: not n.endswith(".manifest.json")):
                os.replace(n, n, src_dir_fd=fd, dst_dir_fd=dfd)
            os.fsync(dfd)
            os.fsync(fd)
        finally:
            os.close(dfd)
    return directory / QUARANTINE / stamp


def collect_garbage(directory: Path, committed: set[int]) -> list[str]:
    """Remove leftovers of interrupted saves: uncommitted ckpt-N files, `ckpt-N_temp*` dirs,
    `checkpoint.tmp*`, `.checkpoint.*.tmp` and `*.tempstate*` files. Symlinks are unlinked, never
    followed; directories are removed through descriptors (shutil.rmtree's fd-based walk), so
    nothing outside `directory` is touched. The removals are not fsynced: files that reappear
    after a power cut are still uncommitted, and the next collection removes them again."""
    removed = []
    with pinned(directory) as fd:
        for name in os.listdir(fd):
            m = FILE_RE.match(name)
            stray = (
                bool(m and int(m.group(1)) not in committed)
                or name.startswith(("checkpoint.tmp", ".checkpoint."))
                or ".tempstate" in name
            )
            if not (stray or TEMP_DIR_RE.match(name)):
                continue
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(name, dir_fd=fd)
                else:
                    os.unlink(name, dir_fd=fd)
            except FileNotFoundError:
                continue
            removed.append(name)
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

"""The memory tier's files, without TensorFlow: its private directory on a tmpfs, the snapshots
in it, their manifests and digests, the bound of N copies, quarantine and removal
(docs/memory-tier.md). Which snapshot a restore uses is decided by ckptd.state.mempolicy.

Layout: `<root>/<job-id>/` (root: checkpoint.memory.dir, default /dev/shm/ckptd-UID), both 0700
and owned by the job's user. A snapshot is a directory `snap-<step>-g<generation>/` holding
`values.bin` (the SnapshotPlan's shared-memory layout, byte for byte), `strings.bin` (the string
values, length-prefixed) and `manifest.json`. It is built under `.building-*` and renamed into
place once complete: that rename is its commit. Nothing is fsynced: a tmpfs has no disk, fsync is
a no-op there and the tier is gone after a reboot anyway; what matters is that a killed writer
leaves either a complete snapshot or debris that no listing takes for one.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import mmap
import os
import re
import shutil
import stat
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ckptd.state.ckptfiles import DirectoryMoved, pinned
from ckptd.state.durable import write_nondurable
from ckptd.state.memdigest import value_digest

TMPFS_MAGIC = 0x01021994
MANIFEST = "manifest.json"
VALUES = "values.bin"
STRINGS = "strings.bin"
QUARANTINE = "quarantine"
BUILDING = ".building-"
SPARE = ".spare-values.bin"  # a pruned snapshot's values file, to be written over
SNAP_RE = re.compile(r"^snap-(\d+)-g(\d+)$")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class TierRefused(Exception):
    """The tier's directory cannot be used safely; the message says which and what to do."""


@dataclass(frozen=True)
class MemManifest:
    lineage: str
    generation: int
    step: int
    epoch: int
    step_in_epoch: int
    wall_time: float
    plan_digest: str  # the object graph and the value layout (plan_digest below)
    value_digest: str  # "xxh3_128:<hex>" (or "crc32:<hex>") over values.bin, then strings.bin
    nbytes: int  # of values.bin
    strings_nbytes: int
    version: int = 1
    # The last step's logs, as a durable manifest keeps them: the epoch's logs if the snapshot
    # fell on an epoch's last step (a custom loop's epoch end comes after it).
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return snapshot_name(self.step, self.generation)

    def to_json(self) -> str:
        return json.dumps(vars(self), sort_keys=True)


@dataclass(frozen=True)
class Snap:
    """A complete snapshot found in the tier."""

    path: Path
    manifest: MemManifest

    @property
    def order(self) -> tuple[int, int]:
        """Newest last: the newest attempt's history first, then the step within it."""
        return (self.manifest.generation, self.manifest.step)


def snapshot_name(step: int, generation: int) -> str:
    return f"snap-{step:012d}-g{generation}"


def default_root(uid: int) -> Path:
    """Not $XDG_RUNTIME_DIR: logind caps it at 10 % of RAM and removes it with the user's last
    session, which a job under the daemon outlives."""
    return Path("/dev/shm") / f"ckptd-{uid}"


def tier_dir(configured: str | None, job_id: str, uid: int) -> Path:
    """One directory per job, so jobs naming the same checkpoint.memory.dir never meet."""
    return (Path(configured) if configured else default_root(uid)) / job_id


def lineage_of(job_id: str, checkpoint_dir: Path) -> str:
    """Whose history a snapshot continues: this job's, on top of this durable directory."""
    where = hashlib.sha256(os.fsencode(os.path.realpath(checkpoint_dir))).hexdigest()[:16]
    return f"{job_id}@{where}"


def plan_digest(object_graph: bytes, layout: Iterable[tuple[str, str, tuple[int, ...], int, int]]) -> str:
    """The object graph and every slot (key, dtype, shape, offset, nbytes): a snapshot's bytes
    mean the same values only to a plan with the same digest."""
    h = hashlib.sha256(object_graph)
    for slot in layout:
        h.update(repr(slot).encode())
    return h.hexdigest()


def _fs_type(fd: int) -> int:
    """statfs(2)'s f_type (the first field of struct statfs on Linux); os has no fstatfs."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    buf = ctypes.create_string_buffer(256)
    if libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int.from_bytes(buf.raw[: ctypes.sizeof(ctypes.c_long)], sys.byteorder)


def _private_dir(path: Path, uid: int, field: str, create: bool = True) -> None:
    """Make `path` (0700) if absent (else FileNotFoundError, unless `create`), then refuse it
    unless it is a real directory (no symlink anywhere on the way), owned by `uid`, with no
    group or other access, on a tmpfs."""
    try:
        if create:
            os.mkdir(path, 0o700)  # never follows a symlink in the last component
    except FileExistsError:
        pass
    except FileNotFoundError as e:
        raise TierRefused(f"{field}: {path.parent} does not exist; create it or choose another") from e
    try:
        with pinned(path) as fd:
            st, fs = os.fstat(fd), _fs_type(fd)
    except (DirectoryMoved, NotADirectoryError) as e:
        raise TierRefused(
            f"{field}: {path}: a symlink or not a directory; remove it or choose another dir"
        ) from e
    if st.st_uid != uid:
        raise TierRefused(
            f"{field}: {path} is owned by uid {st.st_uid}, not the job's uid {uid}; remove it "
            "or set checkpoint.memory.dir to a directory of your own"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise TierRefused(
            f"{field}: {path} has mode {stat.S_IMODE(st.st_mode):04o}: snapshots hold the "
            "model's weights, so group and others must have no access; chmod 700 it"
        )
    if fs != TMPFS_MAGIC:
        raise TierRefused(
            f"{field}: {path} is not on a tmpfs: the memory tier belongs in RAM "
            "(/dev/shm or /run/user/UID); durable checkpoints go in checkpoint.dir"
        )


def open_tier(configured: str | None, job_id: str, uid: int, create: bool = True) -> Path:
    """The job's tier directory, made and checked (run by the worker, as the job's user).
    Without `create` (a gang member reading its chief's tier), FileNotFoundError if absent."""
    tier = tier_dir(configured, job_id, uid)
    _private_dir(tier.parent, uid, "checkpoint.memory.dir", create)
    _private_dir(tier, uid, "checkpoint.memory.dir", create)
    return tier


def write_private(path: Path, data: bytes) -> None:
    """A new file of a snapshot being built, 0600 whatever the umask: a snapshot's files are
    its owner's alone, as its directories are."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with open(fd, "wb") as f:
        f.write(data)


def begin(tier: Path, step: int, generation: int) -> Path:
    """A fresh private directory to build a snapshot in; not a snapshot until `commit`."""
    path = tier / f"{BUILDING}{snapshot_name(step, generation)}-{os.getpid()}-{time.monotonic_ns()}"
    os.mkdir(path, 0o700)
    return path


def commit(tier: Path, building: Path, manifest: MemManifest) -> Snap:
    """Write the manifest, then rename the directory into place: the snapshot's commit. A
    snapshot of the same step and generation already there is replaced only after the new one
    is complete."""
    write_private(building / MANIFEST, manifest.to_json().encode())
    final = tier / manifest.name
    with contextlib.suppress(FileNotFoundError):
        old = tier / f"{BUILDING}replaced-{manifest.name}-{time.monotonic_ns()}"
        os.rename(final, old)
        _rmtree(tier, old.name)
    os.rename(building, final)
    return Snap(final, manifest)


Strings = dict[str, tuple[tuple[int, ...], list[bytes]]]  # key -> (shape, elements)


def pack_strings(strings: Strings) -> bytes:
    """The string values (host state, generator states: small beside the weights) as one blob:
    an 8-byte header length, a JSON header of keys, shapes and element lengths, the elements.
    Not pickle: nothing in the tier is ever executed."""
    header = {
        k: {"shape": list(shape), "lengths": [len(e) for e in elems]} for k, (shape, elems) in strings.items()
    }
    head = json.dumps(header, sort_keys=True).encode()
    body = b"".join(e for k in sorted(strings) for e in strings[k][1])
    return len(head).to_bytes(8, "little") + head + body


def unpack_strings(blob: bytes) -> Strings:
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    out: Strings = {}
    at = 8 + n
    for key in sorted(header):
        elems = []
        for length in header[key]["lengths"]:
            elems.append(blob[at : at + length])
            at += length
        out[key] = (tuple(header[key]["shape"]), elems)
    if at != len(blob):
        raise ValueError(f"{STRINGS}: {len(blob) - at} bytes beyond its header's elements")
    return out


def read_manifest(path: Path) -> MemManifest:
    data = json.loads((path / MANIFEST).read_text())
    if not isinstance(data, dict):
        raise ValueError("the manifest is not a JSON object")
    man = MemManifest(**data)
    if man.name != path.name:
        raise ValueError(f"the manifest is for {man.name}")
    return man


def snapshots(tier: Path) -> tuple[list[Snap], dict[Path, str]]:
    """Complete snapshots, oldest first; and the damaged ones (unreadable manifest) with why."""
    good: list[Snap] = []
    bad: dict[Path, str] = {}
    for entry in os.scandir(tier):
        if not SNAP_RE.match(entry.name) or not entry.is_dir(follow_symlinks=False):
            continue
        path = Path(entry.path)
        try:
            good.append(Snap(path, read_manifest(path)))
        except (OSError, ValueError, TypeError) as e:
            bad[path] = f"manifest unreadable: {type(e).__name__}: {e}"
    return sorted(good, key=lambda s: s.order), bad


def verify(snap: Snap) -> str | None:
    """Why `snap`'s files do not match its manifest (sizes, the value digest), or None. Reads
    every byte: run it off the step loop (at restore, before any variable changes)."""
    man = snap.manifest
    try:
        with (
            _mapped(snap.path / VALUES, man.nbytes) as values,
            _mapped(snap.path / STRINGS, man.strings_nbytes) as strings,
        ):
            digest = value_digest([values, strings], man.value_digest.partition(":")[0])
    except (OSError, ValueError) as e:
        return f"{e}"
    if digest != man.value_digest:
        return f"value digest {digest}, the manifest says {man.value_digest} (damaged in memory)"
    return None


@contextlib.contextmanager
def _mapped(path: Path, expected: int) -> Iterator[memoryview]:
    """The file's bytes without copying them (a 4 GB snapshot is not read into a second 4 GB)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size != expected:
            raise ValueError(f"{path.name} is {size} bytes, the manifest says {expected}")
        if size == 0:
            yield memoryview(b"")
            return
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as m:
            view = memoryview(m)
            try:
                yield view
            finally:
                view.release()
    finally:
        os.close(fd)


def prune(tier: Path, keep: int, spare: bool = False) -> list[Path]:
    """Remove the oldest complete snapshots beyond `keep` and any debris of unfinished ones
    (called after a commit, so the newest is complete before an older one goes). With `spare`,
    the first one removed leaves its values.bin as the tier's SPARE, for `take_spare`."""
    good, _ = snapshots(tier)
    removed = [s.path for s in good[: max(len(good) - keep, 0)]]
    for path in removed:
        gone = tier / f"{BUILDING}replaced-{path.name}-{time.monotonic_ns()}"
        os.rename(path, gone)  # un-committed first: no listing sees it without its values
        if spare and not os.path.lexists(tier / SPARE):
            with contextlib.suppress(FileNotFoundError):
                os.rename(gone / VALUES, tier / SPARE)
        _rmtree(tier, gone.name)
    for entry in os.scandir(tier):
        if entry.name.startswith(BUILDING) and not _building_alive(entry.name):
            _rmtree(tier, entry.name)
            removed.append(Path(entry.path))
    return removed


def remove_snapshot(tier: Path, path: Path) -> None:
    """Remove one snapshot, un-committed first (renamed out of the listing), then its files."""
    gone = tier / f"{BUILDING}replaced-{path.name}-{time.monotonic_ns()}"
    os.rename(path, gone)
    _rmtree(tier, gone.name)


def take_spare(tier: Path, building: Path, nbytes: int) -> bool:
    """Move the tier's spare values file (a pruned snapshot's, its tmpfs pages still allocated)
    into `building` if it has the size wanted; a fresh file costs a page fault and a zeroed page
    per 4 KiB. A spare of another size (the plan changed) is dropped."""
    try:
        st = os.lstat(tier / SPARE)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size != nbytes:
        os.unlink(tier / SPARE)
        return False
    os.rename(tier / SPARE, building / VALUES)
    return True


def _building_alive(name: str) -> bool:
    """A snapshot being built by a live process of ours is not debris (the name holds its pid)."""
    m = re.search(r"-(\d+)-\d+$", name)
    if m is None or name.startswith(f"{BUILDING}replaced-"):
        return False
    return int(m.group(1)) == os.getpid()


def quarantine(tier: Path, snap_path: Path, reason: str, keep_values: int = 1) -> Path:
    """Move a damaged snapshot to quarantine/ with reason.txt. RAM is scarce: only the newest
    `keep_values` quarantined snapshots keep their values; older ones keep manifest and reason."""
    qdir = tier / QUARANTINE
    with contextlib.suppress(FileExistsError):
        os.mkdir(qdir, 0o700)
    dest = qdir / f"{snap_path.name}-{time.strftime('%Y%m%dT%H%M%S')}-{time.monotonic_ns()}"
    os.rename(snap_path, dest)  # from now on no listing sees it
    write_nondurable(dest / "reason.txt", (reason + "\n").encode())
    # Oldest first by the clock reading that ends each name.
    held = sorted(
        (p for p in qdir.iterdir() if (p / VALUES).exists()), key=lambda p: int(p.name.rsplit("-", 1)[1])
    )
    for old in held[: max(len(held) - keep_values, 0)]:
        for name in (VALUES, STRINGS):
            with contextlib.suppress(FileNotFoundError):
                (old / name).unlink()
    return dest


def tier_bytes(tier: Path) -> int:
    """RAM the tier holds (every file's allocated tmpfs blocks, quarantine included): counted
    against resources.memory_limit and shown in status; 0 if there is no tier. Through
    descriptors from / with no symlink followed (a tier that is a symlink raises OSError): the
    daemon measures as root in a directory its owner may change, and a name swapped for a
    symlink between two steps of a walk by path would send root's walk anywhere."""
    total = 0
    try:
        with pinned(tier) as fd:
            for _, _, files, dfd in os.fwalk(".", dir_fd=fd):  # follow_symlinks=False
                for name in files:
                    with contextlib.suppress(FileNotFoundError):  # a prune meanwhile
                        total += os.stat(name, dir_fd=dfd, follow_symlinks=False).st_blocks * 512
    except FileNotFoundError:
        return 0
    return total


def remove_tier(tier: Path) -> None:
    """Remove the job's whole tier (the job ended). Descriptor-based, follows no symlink; run it
    with the tier owner's rights, as run directories are removed (ckptd.state.runremove)."""
    with contextlib.suppress(FileNotFoundError):
        _rmtree(tier.parent, tier.name)


def _rmtree(parent: Path, name: str) -> None:
    with pinned(parent) as fd:
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=fd)
        else:
            os.unlink(name, dir_fd=fd)

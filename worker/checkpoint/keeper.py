"""Checkpoint commit protocol and verified restore, on top of tf.train.CheckpointManager.

save:    TF writes ckpt-N (atomic against a process kill, never fsynced) → ckptd fsyncs every file
         of N and the directory → verifies N (its index opens and lists every variable) → writes
         the manifest ckpt-N.manifest.json durably (sizes, the index's SHA-256, step, epoch,
         metrics). The manifest is the commit record. Only then are older checkpoints deleted
         (manifest first). Any error (ENOSPC, EIO from fsync, …) before the manifest: N is
         removed, never committed, never retried with a second fsync; the previous commit stays.
restore: newest committed checkpoint whose files match its manifest (sizes, the index's
         SHA-256), whose every tensor reads back (TF checks each one's CRC32C, recorded in the index) and
         that TF restores; a damaged one is quarantined with the reason and the previous one is
         tried.
         TF's `checkpoint` state file is never trusted (tensorflow#35148); it is rewritten.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf

from ckptd.state import ckptfiles as cf
from ckptd.state.durable import atomic_write_text, fsync_dir, fsync_file
from ckptd.state.protocol import Event
from ckptd.state.retention import Committed, to_delete
from ckptd.worker.errors import Fenced, NoValidCheckpoint, SaveFailed

Log = Callable[..., None]


# Objects of a checkpoint written by ckptd 0.1; a checkpoint without LEGACY_MARKER is one.
LEGACY_NAMES = (
    "model",
    "optimizer",
    "step",
    "epoch",
    "step_in_epoch",
    "host_state",
    "rng",
    "best_weights",
    "metrics",
)
LEGACY_MARKER = "keras_rng/.ATTRIBUTES/VARIABLE_VALUE"


class Keeper:
    def __init__(
        self,
        directory: Path,
        ckpt: tf.train.Checkpoint,
        max_to_keep: int,
        keep_every_n_hours: float | None,
        log: Log,
        before_commit: Callable[[int], None] | None = None,
        during_restore: Callable[[], None] | None = None,
    ) -> None:
        # Resolved once: rotation, garbage collection and quarantine then follow no symlink.
        self.dir = cf.real_dir(directory)
        self.ckpt = ckpt
        self.max_to_keep = max_to_keep
        self.keep_every_n_hours = keep_every_n_hours
        self.log = log
        self.before_commit = before_commit  # test-only fault hooks
        self.during_restore = during_restore
        self.retired: list[cf.Manifest] = []
        self.who = (0, 1, 1)  # generation (the attempt), world size, replicas: set by the worker
        self.expected_keys: set[str] | None = None
        self.next_number = 1
        # An empty state file makes CheckpointManager raise; a garbage one makes TF forget valid
        # checkpoints. ckptd's manifests decide, so TF's file is dropped and rewritten later.
        cf.unlink_in(self.dir, "checkpoint")
        # max_to_keep=None: TF never deletes anything; retention runs after ckptd's commit.
        self.manager = tf.train.CheckpointManager(
            ckpt, str(self.dir), max_to_keep=None, checkpoint_name=cf.PREFIX
        )

    def committed(self) -> list[cf.Manifest]:
        return cf.read_manifests(self.dir)[0]

    def collect_garbage(self) -> list[str]:
        return cf.collect_garbage(self.dir, {m.number for m in self.committed()})

    def _quarantine(self, number: int, step: int | None, reason: str) -> None:
        dest = cf.quarantine(self.dir, number, reason)
        self.log(Event.CHECKPOINT_QUARANTINED, number=number, step=step, reason=reason, to=str(dest))

    # -- restore --------------------------------------------------------------------------

    def _scan(self) -> tuple[list[cf.Manifest], int]:
        """The committed manifests (oldest first), after quarantining the unreadable ones (how
        many)."""
        manifests, bad = cf.read_manifests(self.dir)
        # New commits are numbered after every existing one, whatever TF's save counter says
        # (a checkpoint restored through another object graph does not carry it).
        self.next_number = max([m.number for m in manifests] + list(bad) + [0]) + 1
        for number, reason in bad.items():
            self._quarantine(number, None, reason)
        return manifests, len(bad)

    def head(self) -> cf.Manifest | None:
        """The newest committed manifest, not restored (the memory tier may restore a newer
        state over it); numbering and TF's state file as after a restore."""
        manifests, _ = self._scan()
        cf.write_state_file(self.dir, manifests)
        return manifests[-1] if manifests else None

    def restore(self) -> cf.Manifest | None:
        """Restore the newest valid committed checkpoint; None if none was ever committed."""
        manifests, bad = self._scan()
        marker = cf.read_restore_marker(self.dir)
        for m in reversed(manifests):
            if marker.get("number") == m.number and marker["count"] >= 2:
                self._quarantine(m.number, m.step, "restoring it killed the worker twice")
                continue
            problem = cf.verify_files(self.dir, m) or self._restore_one(m, marker)
            if problem is None:
                cf.clear_restore_marker(self.dir)
                cf.write_state_file(self.dir, self.committed())
                return m
            self._quarantine(m.number, m.step, problem)
        cf.clear_restore_marker(self.dir)
        if manifests or bad:
            raise NoValidCheckpoint(
                f"{len(manifests) + bad} committed checkpoint(s) in {self.dir}, none valid "
                f"(see {self.dir / cf.QUARANTINE}); refusing to restart from step 0"
            )
        cf.write_state_file(self.dir, [])
        return None

    def _restore_one(self, m: cf.Manifest, marker: dict[str, int]) -> str | None:
        count = marker["count"] + 1 if marker.get("number") == m.number else 1
        cf.write_restore_marker(self.dir, m.number, count)
        self.log(Event.RESTORE_BEGIN, number=m.number, step=m.step, attempt_of_this_restore=count)
        if self.during_restore:
            self.during_restore()
        prefix = str(self.dir / m.prefix)
        try:
            problem = read_every_tensor(prefix)
            if problem is None:
                self._restore_objects(prefix, m)
        except Exception as e:  # TF raises OpError, IndexError, ValueError, AssertionError, …
            return f"restore failed: {type(e).__name__}: {str(e)[:300]}"
        return problem

    def _restore_objects(self, prefix: str, m: cf.Manifest) -> None:
        if LEGACY_MARKER in tf.train.load_checkpoint(prefix).get_variable_to_shape_map() or not all(
            hasattr(self.ckpt, name) for name in LEGACY_NAMES
        ):
            self.ckpt.restore(prefix).assert_existing_objects_matched()
            return
        # Written by ckptd 0.1, before random state was checkpointed: restore what it holds
        # (every object it had must match) rather than quarantine a job's whole history.
        legacy = tf.train.Checkpoint(**{n: getattr(self.ckpt, n) for n in LEGACY_NAMES})
        _ = legacy.save_counter  # created lazily; the numbering of later saves continues from it
        legacy.restore(prefix).assert_existing_objects_matched()
        self.ckpt.save_counter.assign(legacy.save_counter)
        self.log(
            Event.EXACTNESS_WARNING,
            number=m.number,
            step=m.step,
            cause=f"checkpoint {m.prefix} was written by an earlier ckptd without the "
            "random generators' state: random layers restart from their seeds, so "
            "this resume is not bit-identical",
        )

    # -- save -----------------------------------------------------------------------------

    def save(
        self, step: int, epoch: int, step_in_epoch: int, metrics: dict[str, float], number: int | None = None
    ) -> cf.Manifest:
        """Commit a checkpoint now. `number` overrides TF's save counter (the async path and
        this one share one numbering)."""
        self.retired = []
        if number is None:
            number = self.next_number
        self.next_number = max(self.next_number, number + 1)
        try:
            return self._commit(step, epoch, step_in_epoch, metrics, number)
        except (OSError, tf.errors.OpError, ValueError) as e:
            with contextlib.suppress(OSError):
                self.collect_garbage()  # remove the uncommitted files of this attempt
            errno = getattr(e, "errno", None)
            raise SaveFailed(f"{type(e).__name__}: {e}" + (f" (errno {errno})" if errno else "")) from e

    def _commit(
        self, step: int, epoch: int, step_in_epoch: int, metrics: dict[str, float], number: int | None
    ) -> cf.Manifest:
        with cf.pinned(self.dir):  # still the directory the job started with: no symlink since
            pass
        path = Path(self.manager.save(checkpoint_number=number))
        point = CommitPoint(int(path.name.rsplit("-", 1)[1]), step, epoch, step_in_epoch, metrics, self.who)
        manifest, self.retired, self.expected_keys = commit_written(
            self.dir, point, self.expected_keys, self.max_to_keep, self.keep_every_n_hours, self.before_commit
        )
        return manifest


def restore_readonly(
    directory: Path, ckpt: tf.train.Checkpoint, skipped: Callable[[cf.Manifest, str], None]
) -> cf.Manifest | None:
    """The newest committed checkpoint whose files match its manifest and that reads back,
    restored into `ckpt`, changing nothing on disk (no quarantine, restore marker or state
    file): for readers beside the worker that owns the directory (`ckptd export`, the members
    of a gang other than its chief). `skipped` hears of each one passed over, and why."""
    if not directory.is_dir():  # the owner has not created it yet: nothing was ever committed
        return None
    manifests, _bad = cf.read_manifests(directory)
    for m in reversed(manifests):
        problem = cf.verify_files(directory, m)
        if problem is None:
            try:
                ckpt.read(str(directory / m.prefix)).expect_partial()
            except Exception as e:  # a torn or foreign file: try the next older one
                problem = f"{type(e).__name__}: {str(e)[:200]}"
        if problem is None:
            return m
        skipped(m, problem)
    return None


def read_every_tensor(prefix: str) -> str | None:
    """Read every tensor of a checkpoint, so TF checks each one's CRC32C against the index (whose
    SHA-256 the manifest holds), including tensors no live object restores."""
    reader = tf.train.load_checkpoint(prefix)
    for key in sorted(reader.get_variable_to_shape_map()):
        try:
            reader.get_tensor(key)
        except tf.errors.OpError as e:
            return f"tensor {key} unreadable: {e.message.splitlines()[0][:300]}"
    return None


@dataclass(frozen=True)
class CommitPoint:
    number: int
    step: int
    epoch: int
    step_in_epoch: int
    metrics: dict[str, float]
    who: tuple[int, int, int] = (0, 1, 1)  # generation (attempt), world size, replicas


def commit_written(
    directory: Path,
    point: CommitPoint,
    expected_keys: set[str] | None,
    max_to_keep: int,
    keep_every_n_hours: float | None,
    before_commit: Callable[[int], None] | None = None,
) -> tuple[cf.Manifest, list[cf.Manifest], set[str]]:
    """Turn the files TF just wrote for ckpt-N into a commit: fsync them and the directory,
    verify the index lists the expected variables, write the manifest durably, then apply
    retention. Shared by synchronous saves and the asynchronous writer process."""
    prefix = directory / f"{cf.PREFIX}-{point.number}"
    for f in cf.files_of(directory, point.number):
        fsync_file(f)
    fsync_dir(directory)
    keys = set(tf.train.load_checkpoint(str(prefix)).get_variable_to_shape_map())
    if expected_keys is not None and keys != expected_keys:
        raise ValueError(
            f"{prefix.name}: written checkpoint lists {len(keys)} variables, expected {len(expected_keys)}"
        )
    if before_commit:
        before_commit(point.step)
    newest = max((m.generation for m in cf.read_manifests(directory)[0]), default=0)
    if newest > point.who[0]:
        raise Fenced(
            f"attempt {newest} of this job has committed in {directory}; this worker (attempt "
            f"{point.who[0]}) is stale and stops without committing"
        )
    manifest = cf.build_manifest(
        directory, point.number, point.step, point.epoch, point.step_in_epoch, point.metrics, point.who
    )
    atomic_write_text(directory / f"{manifest.prefix}.manifest.json", manifest.to_json())
    retired, kept = _rotate(directory, max_to_keep, keep_every_n_hours)
    cf.write_state_file(directory, kept)
    return manifest, retired, keys


def _rotate(
    directory: Path,
    max_to_keep: int,
    keep_every_n_hours: float | None,
) -> tuple[list[cf.Manifest], list[cf.Manifest]]:
    """Apply retention after a commit; returns the manifests deleted and kept."""
    committed = cf.read_manifests(directory)[0]
    doomed = to_delete([Committed(m.number, m.wall_time) for m in committed], max_to_keep, keep_every_n_hours)
    for number in doomed:
        # Manifest first: a crash midway leaves uncommitted files, which GC removes.
        cf.unlink_in(directory, f"{cf.PREFIX}-{number}.manifest.json")
    kept = [m for m in committed if m.number not in doomed]
    if doomed:
        # The un-commits must be durable before their files go; the files' removal need not be.
        fsync_dir(directory)
        cf.collect_garbage(directory, {m.number for m in kept})
    return [m for m in committed if m.number in doomed], kept

"""Restore: open the checkpoint directory (its lock held), restore the newest valid commit into
the checkpoint's objects (quarantining damaged ones, reported as events), or, as a gang member
other than the chief, read the chief's newest commit; then the inventory of what is on disk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import tensorflow as tf

from ckptd.state import memtier as mt
from ckptd.state.ckptfiles import Manifest
from ckptd.state.protocol import NAN_RESTARTS_ENV, Event, Phase
from ckptd.worker.checkpoint import memsnap, tiergang, tierrestore
from ckptd.worker.checkpoint.asyncsave import AsyncSaver
from ckptd.worker.checkpoint.ckptstate import CheckpointState
from ckptd.worker.checkpoint.keeper import Keeper, restore_readonly
from ckptd.worker.checkpoint.writer import Writer
from ckptd.worker.distribute import check_gang, is_chief, job_strategy, multi_worker


@dataclass
class Storage:
    """Where commits go, once the directory is opened: the keeper (sync commits) and, in async
    mode, the link to the writer."""

    keeper: Keeper
    async_saver: AsyncSaver | None


class Restorer:
    def __init__(self, state: CheckpointState, writer: Writer | None = None) -> None:
        self.s = state
        self.writer = writer  # started early (ckptd.worker.__main__), handed to the AsyncSaver
        self.tier: tierrestore.TierSetup | None = None  # the memory tier, if the job has one

    def open(self) -> Storage:
        """Touch the checkpoint directory only now, with its lock held: a hot spare builds its
        loop while the previous worker may still own the directory."""
        s, ck = self.s, self.s.spec.checkpoint
        keeper = Keeper(
            s.checkpoint_dir(),
            s.ckpt,
            ck.max_to_keep,
            ck.keep_every_n_hours,
            s.event,
            before_commit=lambda step: s.faults.in_save(step, s.attempt),
            during_restore=lambda: s.faults.in_restore(s.attempt),
        )
        # The manifest says who committed: the attempt fences a stale gang (errors.Fenced).
        world = s.spec.distribute.nodes if s.spec.distribute.is_gang else 1
        keeper.who = (s.attempt, world or 1, int(job_strategy().num_replicas_in_sync))
        saver = None
        if ck.mode == "async":
            saver = AsyncSaver(
                s.ckpt,
                s.checkpoint_dir(),
                ck.max_to_keep,
                ck.keep_every_n_hours,
                self.writer,
                ck.async_writer_share,
                ck.async_overhead_budget,
                ck.every_seconds,
                finite=s.weights,
            )
            saver.who = keeper.who
            saver.pacing.paced = ck.every_steps == "auto"
        return Storage(keeper, saver)

    def restore(self) -> tuple[Manifest | None, Storage | None]:
        """Restore the newest valid commit (None: a fresh start), and where commits go (None:
        a gang member, which never commits)."""
        self.s.beater.beat(Phase.RESTORING)
        if not is_chief():
            return self._restore_as_member(), None
        store = self.open()
        manifest, snap = self._restore_either(store)
        if restarts := int(os.environ.get(NAN_RESTARTS_ENV, "0")):  # restart.on_nan: restart
            self.lower_learning_rate(restarts, self.s.spec.restart.nan_lr_factor)
        removed = store.keeper.collect_garbage()
        if removed:
            self.s.event(Event.CHECKPOINT_GC, removed=removed)
        self._inventory(store.keeper)
        if store.async_saver is not None:
            # After a memory restore the durable head was not verified: the graph comes from
            # the live objects instead.
            store.async_saver.prepare(manifest if snap is None else None)
            if self.s.faults.writer_first:
                store.async_saver.wait_ready()
        if snap is not None:
            return self._restored_memory(snap, manifest), store
        return self._restored(manifest), store

    def _restore_either(self, store: Storage) -> tuple[Manifest | None, mt.Snap | None]:
        """The newest verified state of either tier: (the durable commit restored, None), or
        (the newest durable commit, not restored; the memory snapshot restored)."""
        s = self.s
        if s.spec.checkpoint.memory is not None:
            self.tier = tierrestore.open_tier(s)
        head = store.keeper.head() if self.tier is not None else None
        snap = tierrestore.choose_snapshot(s, self.tier, head) if self.tier is not None else None
        if s.spec.checkpoint.memory is not None and s.spec.distribute.is_gang:
            snap = self._agreed(snap)
        if self.tier is not None and snap is not None:
            tierrestore.restore(s, self.tier, snap)
            tierrestore.drop_dead_branch(s, self.tier, snap.manifest.step)
            return head, snap
        manifest = store.keeper.restore()  # quarantines damaged commits before GC sees them
        if self.tier is not None:
            tierrestore.drop_dead_branch(s, self.tier, manifest.step if manifest is not None else 0)
        return manifest, None

    def _agreed(self, snap: mt.Snap | None) -> mt.Snap | None:
        """The chief's snapshot if every member of the gang can restore it too."""
        agreed = tiergang.agree(self.s, snap)
        if snap is not None and agreed.snapshot is None:
            m = snap.manifest
            self.s.event(
                Event.MEMORY_IGNORED,
                snapshots=[{"step": m.step, "generation": m.generation, "why": f"gang: {agreed.why_not}"}],
            )
        return agreed.snapshot

    def _inventory(self, keeper: Keeper) -> None:
        """What is on disk, for the supervisor's store: commits and retirements made after it
        last read this worker's events (its crash, a power cut) would otherwise never reach it."""
        self.s.event(
            Event.CHECKPOINT_INVENTORY,
            checkpoints=[
                {
                    "step": m.step,
                    "epoch": m.epoch,
                    "path": str(keeper.dir / m.prefix),
                    "digest": m.digest,
                    "metrics": m.metrics,
                }
                for m in keeper.committed()
            ],
        )

    def _restore_as_member(self) -> Manifest | None:
        """A gang member other than the chief restores the snapshot the gang agreed on, or
        reads the chief's newest valid commit; the chief alone quarantines, collects garbage and
        commits."""
        if self.s.spec.checkpoint.memory is not None:
            agreed = tiergang.agree(self.s, None)
            if agreed.snapshot is not None and agreed.plan is not None:
                self.s.faults.in_restore(self.s.attempt)  # test-only: a kill while restoring
                memsnap.restore(agreed.snapshot, self.s.ckpt, agreed.plan)
                return self._restored_memory(agreed.snapshot, None)
        manifest = restore_readonly(
            self.s.checkpoint_dir(),
            self.s.ckpt,
            lambda m, why: self.s.event(Event.RESTORE_SKIPPED, number=m.number, reason=why),
        )
        return self._restored(manifest)

    def _restored(self, manifest: Manifest | None) -> Manifest | None:
        s = self.s
        strategy = job_strategy()
        if multi_worker(strategy):
            check_gang(strategy, s.checkpoint_dir(), s.attempt, manifest.step if manifest is not None else 0)
        if manifest is None:
            s.event(Event.RESTORE_FRESH, reason="no committed checkpoint")
            return None
        s.host_random.apply()
        # The last step's logs become the epoch's logs if the commit fell on its last step.
        s.last_logs = dict(manifest.metrics)
        s.committed_step = s.restored_step = manifest.step
        s.event(
            Event.RESTORE_DONE,
            source="durable",
            number=manifest.number,
            step=manifest.step,
            epoch=manifest.epoch,
        )
        s.beater.beat(
            restored_step=manifest.step,
            committed_step=manifest.step,
            step=manifest.step,
            epoch=manifest.epoch,
        )
        return manifest

    def _restored_memory(self, snap: mt.Snap, head: Manifest | None) -> Manifest | None:
        """Restored from a memory snapshot: not yet durable, so the next final or preemption
        save commits it (dirty), and `committed_step` stays the durable one's."""
        s, m = self.s, snap.manifest
        strategy = job_strategy()
        if multi_worker(strategy):
            check_gang(strategy, s.checkpoint_dir(), s.attempt, m.step)
        if self.tier is not None:  # the chief's count of tries ends once every member restored
            tierrestore.restore_done(self.tier.tier)
        s.host_random.apply()
        s.last_logs = dict(m.metrics)
        s.committed_step = head.step if head is not None else None
        s.restored_step = m.step
        s.dirty = True
        s.event(
            Event.RESTORE_DONE,
            source="memory",
            snapshot=snap.path.name,
            step=m.step,
            epoch=m.epoch,
            durable_step=s.committed_step,
        )
        s.beater.beat(restored_step=m.step, committed_step=s.committed_step, step=m.step, epoch=m.epoch)
        return head

    def lower_learning_rate(self, restarts: int, factor: float) -> None:
        """restart.on_nan: restart: the k-th attempt after a non-finite one trains at
        learning_rate * factor**k (from the restored value, so it compounds once)."""
        for v in self.s.learning_rates:
            before = float(tf.convert_to_tensor(v))
            v.assign(before * factor**restarts)
            self.s.event(
                Event.NAN_LEARNING_RATE_LOWERED,
                variable=str(getattr(v, "path", v.name)),
                before=before,
                after=before * factor**restarts,
                nan_restarts=restarts,
            )
        if not self.s.learning_rates:
            self.s.event(
                Event.NAN_LEARNING_RATE_NOT_FOUND,
                nan_restarts=restarts,
                hint="a LearningRateSchedule cannot be lowered; the attempt retries as is",
            )

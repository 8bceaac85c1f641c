"""A job's checkpointing inside the training process, as the step loops see it: restore, count
steps, close epochs, save when due, stop on a preemption, the final commit.

Shared by ckptd's own fit loop (ckptd.worker.fit.loop) and by custom training loops
(ckptd.worker.fit.session). The work is done by three parts: the state they share
(ckptd.worker.checkpoint.ckptstate), the restorer (ckptd.worker.checkpoint.restorer), the saver
(ckptd.worker.checkpoint.saver),
with the interval saves' timing decided by ckptd.worker.checkpoint.saveschedule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ckptd.state.ckptfiles import Manifest
from ckptd.state.jobspec import JobSpec
from ckptd.state.paths import RunDir
from ckptd.state.protocol import Event, Phase
from ckptd.worker.checkpoint.ckptstate import CheckpointState
from ckptd.worker.checkpoint.restorer import Restorer
from ckptd.worker.checkpoint.saver import Saver
from ckptd.worker.checkpoint.saveschedule import SaveSchedule, ScheduleLink
from ckptd.worker.checkpoint.savetypes import SaveStats
from ckptd.worker.checkpoint.tiersave import TierSaver
from ckptd.worker.checkpoint.writer import Writer
from ckptd.worker.faults import Faults
from ckptd.worker.fit.prep import Counters
from ckptd.worker.runtime import Beater, StopFlag


class Checkpointing:
    def __init__(
        self,
        spec: JobSpec,
        run: RunDir,
        trackables: dict[str, Any],
        state_variables: list[Any],
        beater: Beater,
        stop: StopFlag,
        writer: Writer | None = None,
    ) -> None:
        self.state = CheckpointState(spec, run, trackables, state_variables, beater, stop)
        self.restorer = Restorer(self.state, writer)
        self.saver = Saver(self.state)
        s = self.state
        self.schedule = SaveSchedule(
            spec.checkpoint,
            ScheduleLink(
                take=self.saver.save,
                drain=self.saver.drain_async,
                writer=lambda: self.saver.async_saver,
                step=lambda: s.step,
                committed_step=lambda: s.committed_step,
                event=s.event,
                stats=self.saver.stats,
            ),
        )
        self.saver.closing = self.schedule.closing
        self.tier: TierSaver | None = None  # the memory tier's snapshots, from restore() on

    # -- what the loops read ------------------------------------------------------------------

    @property
    def c(self) -> Counters:
        return self.state.c

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def committed_step(self) -> int | None:
        return self.state.committed_step

    @property
    def dirty(self) -> bool:
        return self.state.dirty

    @property
    def last_logs(self) -> dict[str, float]:
        return self.state.last_logs

    @property
    def faults(self) -> Faults:
        return self.state.faults

    @property
    def stats(self) -> SaveStats:
        return self.saver.stats

    @property
    def on_commit(self) -> list[Callable[[Manifest, str], None]]:
        return self.saver.on_commit

    def event(self, kind: Event, **data: Any) -> None:
        self.state.event(kind, **data)

    # -- what the loops do --------------------------------------------------------------------

    @property
    def restored_step(self) -> int | None:
        return self.state.restored_step

    def restore(self) -> int | None:
        """Restore the newest verified state of either tier into the checkpoint's objects; its
        step (None: a fresh start). Then memory snapshots are taken if the job has a tier."""
        _, self.saver.store = self.restorer.restore()
        if self.restorer.tier is not None:
            t, memory = self.restorer.tier, self.state.spec.checkpoint.memory
            assert memory is not None
            self.tier = TierSaver(self.state, memory, t.tier, t.plan, t.lineage)
            self.tier.epoch_steps = self.schedule.epoch_steps
        return self.state.restored_step

    def capture_before_save(self, capture: Callable[[], None]) -> None:
        """State kept outside TF variables: `capture` writes it into them before each save."""
        self.state.before_save.append(capture)

    def defer_to_epoch_end(self, epoch_steps: int | None) -> None:
        """The fit loop's epochs: a save due on an epoch's last step waits for its end."""
        self.schedule.epoch_steps = epoch_steps
        if self.tier is not None:
            self.tier.epoch_steps = epoch_steps

    def start(self) -> None:
        """Training starts now: every_seconds counts from here."""
        self.schedule.start()

    def count(self, logs: dict[str, float]) -> None:
        """Count the step just taken (its heartbeat goes out before `after_step`)."""
        self.state.c.step.assign_add(1)
        self.state.c.step_in_epoch.assign_add(1)
        self.state.dirty = True
        self.state.last_logs = logs

    def after_step(self, step_seconds: float) -> None:
        """Save if due, stop if asked, inject test faults."""
        s = self.state
        self.schedule.after_step(step_seconds)
        if s.stop.requested:
            self.preempt()
        self.schedule.interval(s.step, s.step_in_epoch)
        if self.tier is not None:
            self.tier.after_step(s.step, s.step_in_epoch)
            if s.faults.waits_for_memory(s.step, s.attempt):
                self.tier.drain()
        s.faults.after_step(s.step, s.attempt, self._landed_commit)

    def _landed_commit(self) -> int | None:
        """The newest durable commit once the save in flight, if any, has landed: what a test
        fault that kills "after a commit" waits for (only asked when such a fault is set)."""
        self.saver.drain_async(block=True)
        return self.state.committed_step

    def epoch_done(self) -> None:
        self.saver.check_finite()
        self.state.c.epoch.assign_add(1)
        self.state.c.step_in_epoch.assign(0)
        self.state.dirty = True

    def epoch_recorded(self) -> None:
        """The fit loop's epoch end is complete: a save due on its last step is taken now."""
        self.schedule.epoch_recorded()
        if self.tier is not None:
            self.tier.epoch_recorded()

    def preempt(self) -> None:
        self.saver.preempt()

    def finish(self) -> None:
        """The final commit (if anything changed since the last one), waited for."""
        self.saver.finish()

    def mark_done(self) -> None:
        """The done heartbeat, once the final commit is in and the program's end ran."""
        self.state.beater.beat(Phase.DONE, force=True)
        self.faults.when_done(self.state.attempt)  # test-only: a kill after the final commit

    def close(self) -> None:
        if self.tier is not None:
            self.tier.close()
        self.saver.close()

"""What the restorer and the saver of a job's checkpointing share inside the training process:
the checkpoint object and the counters it tracks, the run's position and the events about it.

ckptd.worker.checkpoint.restorer fills it from the newest valid commit; ckptd.worker.checkpoint.saver
commits it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tensorflow as tf

from ckptd.state.jobspec import JobSpec
from ckptd.state.paths import RunDir
from ckptd.state.protocol import EVENTS_FILE, Event, append_event
from ckptd.worker.checkpoint.trackables import HostRandom, keras_global_generator, untracked_variables
from ckptd.worker.faults import Faults
from ckptd.worker.fit.prep import Counters
from ckptd.worker.runtime import Beater, StopFlag


class CheckpointState:
    def __init__(
        self,
        spec: JobSpec,
        run: RunDir,
        trackables: dict[str, Any],
        state_variables: list[Any],
        beater: Beater,
        stop: StopFlag,
    ) -> None:
        self.spec, self.run, self.beater, self.stop = spec, run, beater, stop
        self.c = Counters.new()
        self.rng = tf.random.Generator.from_seed(spec.train.seed)
        tf.random.set_global_generator(self.rng)
        self.host_random = HostRandom()
        self.ckpt = tf.train.Checkpoint(
            **trackables,
            step=self.c.step,
            epoch=self.c.epoch,
            step_in_epoch=self.c.step_in_epoch,
            host_state=self.c.host,
            rng=self.rng,
            keras_rng=keras_global_generator().state,
            host_rng=self.host_random.var,
        )
        # Seed-generator states and whatever else the objects' graphs do not reach.
        self.ckpt.untracked = untracked_variables(self.ckpt, state_variables)
        self.faults = Faults.from_env()
        self.committed_step: int | None = None  # the newest durable commit's
        self.restored_step: int | None = None  # where this attempt started, from either tier
        self.dirty = False  # trained (or an epoch closed) since the last commit
        self.last_logs: dict[str, float] = {}
        # State kept outside TF variables, written into the checkpoint's variables per save.
        self.before_save: list[Callable[[], None]] = [self.host_random.capture]
        self.weights = [
            v for v in state_variables if getattr(v, "trainable", False) and "float" in str(v.dtype)
        ]
        self.learning_rates = [
            v
            for v in state_variables
            if str(getattr(v, "path", getattr(v, "name", ""))).endswith("learning_rate")
        ]

    def event(self, kind: Event, **data: Any) -> None:
        try:
            append_event(self.run.root / EVENTS_FILE, kind, attempt=self.beater.hb.attempt, **data)
        except OSError as e:  # a full disk must not stop training; the inventory at the next
            # restore tells the supervisor about commits whose events were lost here
            print(f"ckptd worker: event {kind} not recorded: {e}", file=sys.stderr)

    @property
    def step(self) -> int:
        return int(self.c.step.numpy())

    @property
    def epoch(self) -> int:
        return int(self.c.epoch.numpy())

    @property
    def step_in_epoch(self) -> int:
        return int(self.c.step_in_epoch.numpy())

    @property
    def attempt(self) -> int:
        return self.beater.hb.attempt

    def checkpoint_dir(self) -> Path:
        return self.run.checkpoint_dir(self.spec.checkpoint.dir)

"""Test-only fault injection, read from the environment variable CKPTD_FAULTS.

Format: comma-separated `key=value`:
- `step_delay=SECONDS`: sleep after every step (a tiny model made slow enough to hit mid-interval);
- `sigkill_at_step=N`, `raise_at_step=N`: SIGKILL itself, or raise RuntimeError, after step N;
- `commit_first=1`: `sigkill_at_step` fires at the first step from N on at which a durable commit
  exists, waiting at each for the asynchronous save in flight to land (on a loaded box a commit
  can land many steps after its step, or only at the run's end: a kill before it would test a
  fresh start, not a resume);
- `sigkill_in_save=N`, `enospc_in_save=N`: inside the save at step N, after TF wrote its files and
  before ckptd's commit;
- `kill_in_writer=N`: the async writer (process or thread), while it commits the save of step N,
  kills the training process (a kill landing during an asynchronous save);
- `kill_in_validation=N`: during the validation that follows training step N;
- `kill_in_memory=N`, `kill_after_memory=N`: the memory tier's writer thread kills the training
  process once the first snapshot of step N or later is copied, before its commit (rename), or
  just after it;
- `memory_first=1`: from step N of `kill_in_memory`/`kill_after_memory` on, the step loop waits at
  each step for the snapshot in flight to be written (on a loaded box the niced writer thread may
  copy none of step N or later before the job ends: the kill would never fire);
- `kill_when_done=1`: once the final commit is in and the heartbeat says so (phase done), as the
  worker is about to exit: the supervisor counts the job as finished, and no attempt follows;
- `kill_signal=TERM`: the kills above send SIGTERM (a preemption notice) instead of SIGKILL;
- `writer_first=1`: wait for the async writer before the first step, so every save is
  asynchronous (as in a job that outlasts the writer's start; a tiny one saves synchronously);
- `save_delay=SECONDS`: every save takes that much longer (no heartbeat meanwhile; in async mode
  the writer process's commit does);
- `val_delay=SECONDS`: every validation batch takes that much longer (a big validation set);
- `sigkill_in_restore=A-B[:M]`: while restoring, in attempts A..B (not limited by `attempt` or
  `member`; `:M` only in gang member M);
- `hang_at_step`, `gpu_fault_at_step`, `gpu_oom_at_step`, `hog_at_step`: a deadlock, a CUDA-like
  error, a GPU out-of-memory error, unbounded host allocation;
- `attempt=K`: apply kills and errors only in attempt K;
- `member=M`: only in gang member M of a multi_worker job (step delays apply to every member);
- `unshared_storage=1`: the member does not see the chief's files (as on a machine whose
  checkpoint.dir is a local disk);
- `unshared_tier=1`: members other than the chief do not see its memory tier (as on another
  node), in every attempt (not limited by `attempt` or `member`).
Never set it in production: it exists so every failure class is testable on a machine without a GPU.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Faults:
    step_delay: float = 0.0
    save_delay: float = 0.0  # every save takes this much longer (a big model on a slow disk)
    val_delay: float = 0.0  # every validation batch takes this much longer
    sigkill_at_step: int | None = None
    commit_first: int = 0  # sigkill_at_step waits for a durable commit
    raise_at_step: int | None = None
    sigkill_in_save: int | None = None  # kill after TF wrote the save at this step, before commit
    enospc_in_save: int | None = None  # raise ENOSPC there instead
    kill_in_writer: int | None = None  # the writer kills the trainer while committing step N
    kill_in_validation: int | None = None  # kill during the validation after step N
    kill_in_memory: int | None = None  # the tier's writer, the snapshot of step N copied, uncommitted
    kill_after_memory: int | None = None  # the tier's writer, just after committing step N
    memory_first: int = 0  # the step loop waits for the tier's writer from that step on
    kill_when_done: int = 0  # kill after the final commit and the done heartbeat
    kill_signal: str = "KILL"  # or TERM: the kills above are then a preemption notice
    writer_first: int = 0  # wait for the async writer before training
    sigkill_in_restore: str = ""  # "A-B[:M]": kill while restoring in attempts A..B (member M)
    hang_at_step: int | None = None  # stop making progress (alive, no heartbeat)
    gpu_fault_at_step: int | None = None  # raise a CUDA-like InternalError
    gpu_oom_at_step: int | None = None  # raise ResourceExhaustedError
    hog_at_step: int | None = None  # allocate host memory without bound
    attempt: int | None = None
    member: int | None = None
    unshared_storage: int = 0
    unshared_tier: int = 0  # a gang member looks for the chief's tier as if on another node

    @classmethod
    def from_env(cls) -> Faults:
        spec = os.environ.get("CKPTD_FAULTS", "")
        kw: dict[str, float | int | str] = {}
        for item in filter(None, spec.split(",")):
            key, _, value = item.partition("=")
            key = key.strip()
            kw[key] = (
                float(value)
                if key in ("step_delay", "save_delay", "val_delay")
                else value
                if key in ("sigkill_in_restore", "kill_signal")
                else int(value)
            )
        return cls(**kw)  # type: ignore[arg-type]

    def _armed(self, attempt: int) -> bool:
        mine = self.member is None or self.member == int(os.environ.get("CKPTD_MEMBER", "0"))
        return mine and (self.attempt is None or attempt == self.attempt)

    def in_save(self, step: int, attempt: int) -> None:
        if not self._armed(attempt):
            return
        if self.save_delay:
            time.sleep(self.save_delay)
        if step == self.sigkill_in_save:
            self._kill(os.getpid())
        if step == self.enospc_in_save:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")

    def in_writer(self, step: int, attempt: int) -> None:
        """The async writer (a child process or a thread of the trainer), before its commit."""
        if self.save_delay:
            time.sleep(self.save_delay)
        if step == self.kill_in_writer and self._armed(attempt):
            import multiprocessing

            parent = multiprocessing.parent_process()
            self._kill(parent.pid if parent is not None and parent.pid else os.getpid())

    def in_memory(self, step: int, attempt: int, committed: bool) -> None:
        """The memory tier's writer thread, before (committed False) and after a snapshot's
        commit."""
        # At or after step N: a snapshot due while the previous one is being written is skipped.
        at = self.kill_after_memory if committed else self.kill_in_memory
        if at is not None and step >= at and self._armed(attempt):
            self._kill(os.getpid())

    def waits_for_memory(self, step: int, attempt: int) -> bool:
        """Whether the step loop waits, after `step`, for the snapshot in flight (memory_first)."""
        at = [n for n in (self.kill_in_memory, self.kill_after_memory) if n is not None]
        return bool(self.memory_first) and bool(at) and step >= min(at) and self._armed(attempt)

    def _kill(self, pid: int | None) -> None:
        os.kill(pid or os.getpid(), signal.SIGTERM if self.kill_signal == "TERM" else signal.SIGKILL)

    def unshared_storage_for(self, attempt: int) -> bool:
        return bool(self.unshared_storage) and self._armed(attempt)

    def unshared_tier_for(self) -> bool:
        return bool(self.unshared_tier)

    def in_validation(self, step: int, attempt: int) -> None:
        if self.val_delay:
            time.sleep(self.val_delay)
        if step == self.kill_in_validation and self._armed(attempt):
            self._kill(os.getpid())

    def when_done(self, attempt: int) -> None:
        if self.kill_when_done and self._armed(attempt):
            self._kill(os.getpid())

    def in_restore(self, attempt: int) -> None:
        if self.sigkill_in_restore:
            attempts, _, who = self.sigkill_in_restore.partition(":")
            low, _, high = attempts.partition("-")
            mine = not who or int(who) == int(os.environ.get("CKPTD_MEMBER", "0"))
            if int(low) <= attempt <= int(high or low) and mine:
                os.kill(os.getpid(), signal.SIGKILL)

    def after_step(self, step: int, attempt: int, committed: Callable[[], int | None] = lambda: None) -> None:
        if self.step_delay:
            time.sleep(self.step_delay)
        if not self._armed(attempt):
            return
        if self._kill_now(step, committed):
            self._kill(os.getpid())
        if step == self.raise_at_step:
            raise RuntimeError(f"injected fault at step {step}")
        self._device_faults(step)
        if step == self.hang_at_step:
            while True:  # a deadlock: the process lives, the step loop never beats again
                time.sleep(3600)
        if step == self.hog_at_step:
            hog = []
            while True:
                hog.append(bytearray(64 * 2**20))
                hog[-1][::4096] = b"x" * len(hog[-1][::4096])  # touch every page
                time.sleep(0.01)

    def _kill_now(self, step: int, committed: Callable[[], int | None]) -> bool:
        if self.sigkill_at_step is None:
            return False
        if self.commit_first:
            return step >= self.sigkill_at_step and committed() is not None
        return step == self.sigkill_at_step

    def _device_faults(self, step: int) -> None:
        import tensorflow as tf

        if step == self.gpu_fault_at_step:
            raise tf.errors.InternalError(
                None, None, "CUDA_ERROR_ECC_UNCORRECTABLE: uncorrectable ECC error encountered (injected)"
            )
        if step == self.gpu_oom_at_step:
            raise tf.errors.ResourceExhaustedError(
                None, None, "OOM when allocating tensor with shape[4096,4096] (injected)"
            )

"""Where each epoch's batches come from under `keras.Model.fit`'s rules: pure, no TensorFlow.

Without `steps_per_epoch` every epoch is one full pass over the data (a new shuffle). With it,
Keras keeps one iterator across epochs: an epoch takes `steps_per_epoch` batches from where the
previous one stopped, and when the pass runs out the epoch ends early and the next epoch starts
a new pass (keras.src.trainers.epoch_iterator). ckptd replays the same plan, so the data position
after a restart is a function of the epoch alone.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EpochPlan:
    pass_index: int  # which pass over the data (each pass has its own shuffle)
    first_batch: int  # index of the epoch's first batch within that pass
    steps: int | None  # batches in this epoch; None: until the data runs out


def epoch_plan(epochs_done: int, num_batches: int | None, steps_per_epoch: int | None) -> EpochPlan:
    """The plan of the epoch after `epochs_done` epochs of this fit call."""
    if steps_per_epoch is None:
        return EpochPlan(epochs_done, 0, num_batches)
    if num_batches is None:  # data of unknown or infinite size: one iterator, never restarted
        return EpochPlan(0, epochs_done * steps_per_epoch, steps_per_epoch)
    per_pass = -(-num_batches // steps_per_epoch)  # the last epoch of a pass may be short
    passes, k = divmod(epochs_done, per_pass)
    at = k * steps_per_epoch
    return EpochPlan(passes, at, min(steps_per_epoch, num_batches - at))


def should_validate(epoch: int, validation_freq: int) -> bool:
    """Keras's `validation_freq`: validate after every n-th epoch (1-based)."""
    return (epoch + 1) % validation_freq == 0


def validations_between(first: int, epoch: int, validation_freq: int) -> int:
    """How many validations the epochs first..epoch-1 ran (should_validate counted)."""
    return epoch // validation_freq - first // validation_freq

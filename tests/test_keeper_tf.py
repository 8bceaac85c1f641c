"""The commit protocol's fence (ckptd.worker.checkpoint.keeper): a manifest records which attempt committed
it; a worker of an older attempt (a stale gang whose supervisor was lost) finds a newer commit
and stops instead of committing."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.tf


def test_a_stale_attempt_is_fenced_and_commits_nothing(tmp_path: Path) -> None:
    import tensorflow as tf

    from ckptd.state import ckptfiles as cf
    from ckptd.worker.checkpoint.keeper import Keeper
    from ckptd.worker.errors import Fenced

    v = tf.Variable(1.0)
    ckpt = tf.train.Checkpoint(v=v)

    def keeper(attempt: int) -> Keeper:
        k = Keeper(tmp_path, ckpt, 5, None, lambda *a, **kw: None)
        k.who = (attempt, 2, 4)
        k.restore()
        return k

    first = keeper(2).save(10, 0, 10, {})
    assert (first.generation, first.world_size, first.replicas) == (2, 2, 4)
    with pytest.raises(Fenced, match="attempt 2 of this job has committed"):
        keeper(1).save(20, 0, 20, {})
    assert [m.step for m in cf.read_manifests(tmp_path)[0]] == [10]  # nothing committed
    newer = keeper(3).save(30, 0, 30, {})  # the current attempt goes on
    assert newer.generation == 3
    assert [m.step for m in cf.read_manifests(tmp_path)[0]] == [10, 30]

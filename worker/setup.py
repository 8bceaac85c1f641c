"""From what the job's program handed over (a model and its data) to a primed training loop.

Anything that fails here is the job's configuration, not bad luck: data that cannot be batched,
a model that cannot be traced on its first batch, an uncompiled model, callbacks that clash
with the job file. It becomes a ConfigError with one readable line, never retried.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ckptd.state.jobspec import JobSpec
from ckptd.state.paths import RunDir
from ckptd.state.protocol import CHECK_ENV
from ckptd.worker.api import FitArgs
from ckptd.worker.checkpoint.writer import Writer
from ckptd.worker.entry import check_model
from ckptd.worker.errors import CheckDone, ConfigError
from ckptd.worker.runtime import Beater, StopFlag

if TYPE_CHECKING:
    from ckptd.worker.fit.loop import Loop


def configure_tf(spec: JobSpec) -> None:
    """Before the job's program builds anything: determinism and the seed it asks for."""
    import keras
    import tensorflow as tf

    from ckptd.worker.distribute import configure_devices

    configure_devices(spec)  # first: logical devices can only be set before TensorFlow starts
    if spec.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(spec.train.seed)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:400] if text else ''}".rstrip(": ")


def make_loop(
    spec: JobSpec,
    run: RunDir,
    model: Any,
    data_args: FitArgs | tuple[Any, Any],
    beater: Beater,
    stop: StopFlag,
    writer: Writer | None,
) -> Loop:
    """A primed Loop. `data_args` is a fit call's arguments, or the legacy (train, validation)
    that build() returned."""
    from ckptd.worker.checkpoint.trackables import make_step_function, prime
    from ckptd.worker.data.batches import Batches
    from ckptd.worker.data.fitdata import FitData
    from ckptd.worker.distribute import ReplicaFeed, multi_worker, replicas
    from ckptd.worker.fit.loop import Loop

    fit = data_args if isinstance(data_args, FitArgs) else None
    where = "ckptd.fit()" if fit is not None else "build()"
    check_model(model, where)
    stage = "reading the training data"
    try:
        if isinstance(data_args, FitArgs):
            data: Any = FitData(data_args, spec.train.seed)
        else:
            data = Batches(data_args[0], data_args[1], spec.train)
        stage = "building the model's variables on the first batch (as fit's first step would)"
        feed = ReplicaFeed(model.distribute_strategy) if replicas(model.distribute_strategy) > 1 else None
        step_fn = make_step_function(model, feed)
        prime(model, step_fn, data.first_batch())
        stage = "setting up the training loop"
        loop = Loop(spec, run, model, data, step_fn, beater, stop, writer, fit)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"{where}: {stage} failed: {_one_line(e)}") from e
    loop.feed = feed
    loop.inexact = exactness_causes(spec, data, step_fn)
    if multi_worker(model.distribute_strategy):
        loop.inexact.append(
            "multi_worker: only the chief commits, so an epoch interrupted mid-way resumes its "
            "running loss and metrics from the chief's replicas (weights, optimizer, data order and "
            "random state resume exactly; that epoch's reported figures may differ)"
        )
    if os.environ.get(CHECK_ENV):
        raise CheckDone(loop.inexact)
    return loop


def exactness_causes(spec: JobSpec, data: Any, step_fn: Any) -> list[str]:
    """Why a resumed run of this job might not end bit-identical to an uninterrupted one:
    ckptd says so at start-up instead of differing silently."""
    from ckptd.worker.data.batches import Batches
    from ckptd.worker.data.fitdata import DatasetSource, FitData, PySource
    from ckptd.worker.fit import exactness

    causes = spec_causes(spec)
    sources = [data.train, data.validation] if isinstance(data, FitData) else []
    if isinstance(data, Batches) and data.dataset_mode:
        # ckptd batches and shuffles these itself, but the program's own pipeline functions
        # (a generator, Python, a random layer in ds.map) still run per element; no pipeline
        # state is restored on this route.
        causes += exactness.dataset_risks(data.ds.batch(spec.train.batch_size))
    for source in sources:
        if isinstance(source, DatasetSource):
            causes += exactness.dataset_risks(source.ds, state_restored=source.state.all_integer)
        elif isinstance(source, PySource):
            causes += exactness.python_data_risks(source.ds)
    causes += exactness.graph_risks(step_fn)
    return list(dict.fromkeys(causes))


def spec_causes(spec: JobSpec) -> list[str]:
    """The causes the job file alone implies, whatever the program does."""
    if spec.train.deterministic:
        return []
    return [
        "train.deterministic is false: TensorFlow may pick non-deterministic "
        "kernels, so recomputed steps can differ in the last bits"
    ]


def session_causes(spec: JobSpec) -> list[str]:
    """Why a custom loop's (ckptd.session) resume might not be exact: one list for
    `validate --build` and for the run's exactness.warning events alike."""
    return [
        *spec_causes(spec),
        "custom training loop: the data position is the program's own "
        "(resume it from sess.epoch and sess.step_in_epoch); ckptd checks "
        "the state it saves, not the loop's data",
    ]

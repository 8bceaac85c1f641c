"""Worker entry: `python -m ckptd.worker RUN_DIR ATTEMPT`. Exit codes: ckptd.state.protocol."""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
from pathlib import Path

from ckptd.state import protocol as p
from ckptd.state.jobspec import JobSpec, spec_from_json
from ckptd.state.paths import RunDir


def _configure_tf(spec: JobSpec) -> None:
    import keras
    import tensorflow as tf

    if spec.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(spec.train.seed)


def _run(run: RunDir, attempt: int, beater_path: Path) -> int:
    from ckptd.worker.data import Batches
    from ckptd.worker.entry import build
    from ckptd.worker.loop import Loop, Preempted, prime
    from ckptd.worker.runtime import Beater, StopFlag, lock_dir

    stop = StopFlag()
    stop.install()
    spec = spec_from_json(run.spec_file.read_text())
    beater = Beater(beater_path, attempt)
    beater.beat("starting", force=True)
    lock_dir(run.checkpoint_dir(spec.checkpoint.dir))
    _configure_tf(spec)
    built = build(spec.model, spec.params)
    batches = Batches(built.train, built.validation, spec.train)
    prime(built.model, batches)
    loop = Loop(spec, run, built, batches, beater, stop)
    try:
        loop.restore()
        loop.train()
    except Preempted:
        return p.EXIT_PREEMPTED
    finally:
        loop.close()
    return p.EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m ckptd.worker RUN_DIR ATTEMPT", file=sys.stderr)
        return p.EXIT_CONFIG
    # Fatal signals print every thread's Python stack; the supervisor sends SIGUSR1 before it
    # kills a hung worker, so the attempt's stderr log shows where it was stuck.
    faulthandler.enable(file=sys.stderr, all_threads=True)
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    run, attempt = RunDir(Path(args[0])), int(args[1])
    attempt_dir = run.attempt_dir(attempt)
    attempt_dir.mkdir(parents=True, exist_ok=True)
    from ckptd.worker.entry import ConfigError
    from ckptd.worker.keeper import NoValidCheckpoint
    from ckptd.worker.runtime import DirLocked, write_error_file

    try:
        return _run(run, attempt, run.heartbeat)
    except (ConfigError, DirLocked, NoValidCheckpoint) as e:
        write_error_file(attempt_dir, e)
        print(f"ckptd worker: {e}", file=sys.stderr)
        codes = {ConfigError: p.EXIT_CONFIG, DirLocked: p.EXIT_LOCKED,
                 NoValidCheckpoint: p.EXIT_NO_VALID_CHECKPOINT}
        return codes[type(e)]
    except Exception as e:
        write_error_file(attempt_dir, e)
        raise  # the traceback goes to the attempt's stderr log as well; exit status 1


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    sys.exit(main())

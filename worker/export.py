"""`python -m ckptd.worker.export RUN_DIR OUT`: the newest verified checkpoint's weights as HDF5.

Read-only: a running worker may own the checkpoint directory, so nothing is quarantined, locked
or collected here; a checkpoint that fails verification is skipped with a message.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ckptd.state import ckptfiles as cf
from ckptd.state.jobfile import resolved_params
from ckptd.state.jobspec import spec_from_json
from ckptd.state.paths import RunDir

if TYPE_CHECKING:
    from ckptd.worker.fit.looptypes import TrainingLoop

EXIT_OK, EXIT_NONE = 0, 1


class _Ready(BaseException):
    def __init__(self, loop: TrainingLoop) -> None:
        super().__init__("ready")
        self.loop = loop


def _loop_for(run: RunDir, scratch: Path) -> TrainingLoop:
    """The job's loop (or custom-loop session), built as its worker builds it but for reading
    only: no async writer, no signal handlers, heartbeats into `scratch` (never the job's own
    heartbeat, which a running worker owns), nothing restored."""
    from ckptd.worker.distribute import job_strategy
    from ckptd.worker.entry import build
    from ckptd.worker.runtime import Beater, StopFlag
    from ckptd.worker.script import ScriptRunner, run_entrypoint
    from ckptd.worker.setup import configure_tf, make_loop

    spec = spec_from_json(run.spec_file.read_text())
    configure_tf(spec)
    beater, stop = Beater(scratch / "heartbeat", 0), StopFlag()
    if spec.entrypoint is None:
        assert spec.model is not None
        with job_strategy().scope():  # as its worker builds it
            built = build(spec.model, resolved_params(spec))
        data = built.fit if built.fit is not None else (built.train, built.validation)
        return make_loop(spec, run, built.model, data, beater, stop, None)
    os.chdir(run.root)  # as for its worker: files the script makes land in its run directory

    def ready(loop: TrainingLoop) -> None:
        raise _Ready(loop)  # the script stops in its fit / session call

    try:
        run_entrypoint(ScriptRunner(spec, run, beater, stop, None, ready), spec.entrypoint)
    except _Ready as r:
        return r.loop
    raise LookupError("the entrypoint never handed ckptd a model")


def export_latest(run: RunDir, out: Path) -> str:
    from ckptd.worker.checkpoint.h5export import save_weights_file
    from ckptd.worker.checkpoint.keeper import restore_readonly

    with tempfile.TemporaryDirectory(prefix="ckptd-export-") as scratch:
        loop = _loop_for(run, Path(scratch))
    if loop.model is None:
        raise LookupError("this job's session holds no keras.Model to export")
    ckdir = run.checkpoint_dir(loop.spec.checkpoint.dir)

    def skipped(m: cf.Manifest, problem: str) -> None:
        print(f"ckptd export: skipping checkpoint {m.number}: {problem}", file=sys.stderr)

    m = restore_readonly(ckdir, loop.ck.state.ckpt, skipped)
    if m is None:
        raise LookupError(f"no verified checkpoint in {ckdir}")
    save_weights_file(loop.model, out)
    return f"step {m.step} (epoch {m.epoch}, checkpoint {m.number})"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m ckptd.worker.export RUN_DIR OUT.h5", file=sys.stderr)
        return 2
    try:
        which = export_latest(RunDir(Path(args[0])), Path(args[1]))
    except LookupError as e:
        print(f"ckptd export: {e}", file=sys.stderr)
        return EXIT_NONE
    print(which)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

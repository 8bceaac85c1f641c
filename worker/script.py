"""Jobs that name a script (`entrypoint: train.py`): the worker runs it as `__main__`.

The script is the user's own program. Its `ckptd.fit(model, ...)` call (or `ckptd.session(...)`
for a custom loop) hands the model to the worker, which restores the newest commit and trains
under supervision. After a restart the script runs again from the top and its fit call
continues where the last commit stopped. Failures before training starts (imports, data
loading, model building) are configuration errors, as for `model:` jobs.
"""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ckptd.state.jobfile import resolved_params
from ckptd.state.jobspec import JobSpec
from ckptd.state.paths import RunDir
from ckptd.state.protocol import CHECK_ENV
from ckptd.worker import api
from ckptd.worker.checkpoint.writer import Writer
from ckptd.worker.errors import CheckDone, ConfigError, WorkerEnd
from ckptd.worker.fit.loop import report_exactness
from ckptd.worker.fit.looptypes import TrainingLoop
from ckptd.worker.runtime import Beater, StopFlag
from ckptd.worker.setup import make_loop, session_causes


class ScriptRunner(api.Runner):
    """Serves `ckptd.fit` / `ckptd.session` inside the worker; `start` (the worker's) takes a
    primed loop or session, locks the checkpoint directory, restores and returns it ready."""

    def __init__(
        self,
        spec: JobSpec,
        run: RunDir,
        beater: Beater,
        stop: StopFlag,
        writer: Writer | None,
        start: Callable[[TrainingLoop], None],
    ) -> None:
        self.spec, self.run, self.beater, self.stop, self.writer = spec, run, beater, stop, writer
        self.params = resolved_params(spec)
        self.start = start
        self.loop: TrainingLoop | None = None  # once the script handed its model over

    def _once(self, what: str) -> None:
        if self.loop is not None:
            raise ConfigError(
                f"the entrypoint called {what} after ckptd.fit/ckptd.session "
                "already ran; one training run per job"
            )

    def fit(self, args: api.FitArgs) -> Any:
        self._once("ckptd.fit")
        loop = make_loop(self.spec, self.run, args.model, args, self.beater, self.stop, self.writer)
        self.loop = loop
        self.start(loop)
        return loop.train()

    def session(self, trackables: dict[str, Any]) -> Any:
        from ckptd.worker.fit.session import Session

        self._once("ckptd.session")
        causes = session_causes(self.spec)
        if os.environ.get(CHECK_ENV):
            raise CheckDone(causes)
        if not trackables:
            raise ConfigError(
                "ckptd.session() needs the objects to checkpoint, e.g. "
                "ckptd.session(model=model, optimizer=optimizer)"
            )
        sess = Session(self.spec, self.run, trackables, self.beater, self.stop, self.writer)
        self.loop = sess
        self.start(sess)
        report_exactness(sess.event, causes)  # the run says what validate --build says
        return sess


def run_entrypoint(runner: ScriptRunner, path: str) -> None:
    """Run the script as `__main__`, with its folder first on sys.path as `python script.py`
    would have it."""
    script = Path(path)
    sys.path.insert(0, str(script.parent))
    sys.argv = [str(script)]
    undo = api.install(runner)
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0):
            raise
    except WorkerEnd:  # a stop, or an error that already says what it is
        raise
    except FileNotFoundError as e:
        if runner.loop is None:
            raise ConfigError(f"entrypoint: {e}") from e
        raise
    except Exception as e:
        if runner.loop is None:  # before training: the program or its data, not bad luck
            raise ConfigError(
                f"entrypoint {script.name} failed before training started: {type(e).__name__}: {str(e)[:400]}"
            ) from e
        raise
    finally:
        undo()
    if runner.loop is None:
        raise ConfigError(
            f"entrypoint {script.name} finished without calling ckptd.fit(...) "
            "or ckptd.session(...): nothing was trained (see docs/porting.md)"
        )

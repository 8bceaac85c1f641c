"""Worker entry. Exit codes: ckptd.state.protocol.

`python -m ckptd.worker RUN_DIR ATTEMPT` trains attempt ATTEMPT of the job in RUN_DIR.
`python -m ckptd.worker RUN_DIR --spare` is a hot spare: it imports TensorFlow, builds and primes
the model, then waits for one line on stdin naming the attempt to take over; recovery after a
failure then skips the import and the build (EOF on stdin: exit quietly).
`python -m ckptd.worker --warm` imports only, then waits for a JSON line naming the run directory
and mode (see ckptd.supervisor.warm).
`python -m ckptd.worker --zygote` imports only, then forks each attempt's worker on request (a
job's fork server, ckptd.worker.zygote).
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import json
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from ckptd.state import protocol as p
from ckptd.state.durable import atomic_write_text
from ckptd.state.jobfile import resolved_params
from ckptd.state.jobspec import JobSpec, spec_from_json
from ckptd.state.paths import MemberRunDir, RunDir
from ckptd.state.protocol import Phase
from ckptd.worker.errors import CheckDone, ConfigError, SpareReleased, WorkerEnd
from ckptd.worker.runtime import log_to, write_error_file

if TYPE_CHECKING:
    from ckptd.worker.fit.loop import Loop
    from ckptd.worker.fit.looptypes import TrainingLoop


def _basics(run: RunDir, attempt: int) -> tuple[JobSpec, Any, Any, Any]:
    """The spec, heartbeat, stop flag and (async) writer, with TensorFlow configured."""
    # The async writer is forked once TensorFlow is imported and before anything initialises its
    # runtime (devices, thread pools, a gang's coordination service): it inherits the import
    # instead of paying it again (~3 s of CPU and ~0.4 GB of RAM on a 2-core box) and is ready
    # at once. No TensorFlow op has run in this process yet, here or in the program.
    import tensorflow  # noqa: F401

    from ckptd.worker.checkpoint.writer import start_writer

    spec = spec_from_json(run.spec_file.read_text())
    chief = int(os.environ.get(p.MEMBER_ENV, "0")) == 0  # only the chief writes checkpoints
    writer = (
        start_writer(run.checkpoint_dir(spec.checkpoint.dir))
        if spec.checkpoint.mode == "async" and chief and not os.environ.get(p.CHECK_ENV)
        else None
    )
    from ckptd.worker.runtime import Beater, StopFlag
    from ckptd.worker.setup import configure_tf

    stop = StopFlag()
    stop.install()
    beater = Beater(run.heartbeat, attempt)
    if attempt:
        beater.beat(Phase.STARTING, force=True)
    configure_tf(spec)
    # Again: a multi_worker strategy starts TensorFlow's coordination service, whose preemption
    # notifier takes SIGTERM for itself; the chief would then never save on a stop.
    stop.install()
    return spec, beater, stop, writer


def prepare(run: RunDir, attempt: int) -> Loop:
    """Everything before the checkpoint directory is touched: import, build, prime."""
    from ckptd.worker.distribute import job_strategy
    from ckptd.worker.entry import build
    from ckptd.worker.setup import make_loop

    spec, beater, stop, writer = _basics(run, attempt)
    assert spec.model is not None
    with job_strategy().scope():  # mirrored variables for a mirrored job; else TF's default
        built = build(spec.model, resolved_params(spec))
    data = built.fit if built.fit is not None else (built.train, built.validation)
    return make_loop(spec, run, built.model, data, beater, stop, writer)


def _start(loop: TrainingLoop) -> None:
    """Check the output directories, lock the checkpoint directory (held until exit), restore."""
    from ckptd.worker.runtime import lock_dir, output_dir

    if loop.spec.best is not None:
        output_dir(loop.run.output_path(loop.spec.best.filepath).parent, "best.filepath")
    if not isinstance(loop.run, MemberRunDir):  # the chief holds it for the whole gang
        lock_dir(loop.run.checkpoint_dir(loop.spec.checkpoint.dir))
    loop.restore()


def train(loop: Loop) -> int:
    try:
        _start(loop)
        loop.train()
    except WorkerEnd as e:
        if e.recorded:  # recorded by _dispatch
            raise
        return e.exit_code  # preempted: saved and stopped as asked
    finally:
        loop.close()
    return p.EXIT_OK


def _run_entrypoint(run: RunDir, attempt: int, spare: bool, holder: list[TrainingLoop]) -> int:
    """An `entrypoint:` job: run the user's script; its ckptd.fit / ckptd.session call comes
    back here (via `ready`) to wait as a hot spare, lock and restore."""
    from ckptd.worker.fit.session import Session
    from ckptd.worker.script import ScriptRunner, run_entrypoint

    spec, beater, stop, writer = _basics(run, attempt)
    assert spec.entrypoint is not None

    def ready(loop: TrainingLoop) -> None:
        holder.append(loop)
        if spare and _become_assigned(run, loop) is None:
            raise SpareReleased()
        _start(loop)

    runner = ScriptRunner(spec, run, beater, stop, writer, ready)
    try:
        run_entrypoint(runner, spec.entrypoint)
        if isinstance(runner.loop, Session):
            runner.loop.finish()  # a custom loop that did not call sess.finish()
    finally:
        if runner.loop is not None:
            runner.loop.close()
    return p.EXIT_OK


def _become_assigned(run: RunDir, loop: TrainingLoop) -> int | None:
    """A hot spare, built and primed: say so, then wait to be named an attempt."""
    # Tell whoever watches (benchmarks, operators) that this spare is warm.
    (run.root / "attempts" / "spare").mkdir(parents=True, exist_ok=True)
    (run.root / "attempts" / "spare" / "ready").write_text(f"{os.getpid()}\n")
    assigned = _await_assignment(run)
    if assigned is None:
        return None
    loop.beater.hb.attempt = assigned
    loop.beater.beat(Phase.STARTING, force=True)
    loop.event(p.Event.WORKER_SPARE_ASSIGNED, pid=os.getpid())
    return assigned


def _await_assignment(run: RunDir) -> int | None:
    """Block until the supervisor names the attempt; then log to that attempt's files."""
    line = sys.stdin.readline()
    if not line.strip():
        return None
    attempt = int(line)
    log_to(run.attempt_dir(attempt))
    return attempt


def _warm() -> int:
    """A warm worker (ckptd.supervisor.warm): import everything now, then wait for a job."""
    import keras  # noqa: F401  (the point: pay for the imports before there is a job)
    import tensorflow  # noqa: F401

    from ckptd.worker.fit import loop  # noqa: F401

    Path(f"{os.getpid()}.ready").write_text("")  # in the pool's directory: for operators, tests
    line = sys.stdin.readline()
    Path(f"{os.getpid()}.ready").unlink(missing_ok=True)
    if not line.strip():
        return p.EXIT_OK  # the daemon stopped or died
    job = json.loads(line)
    if job.get("owner"):  # the job's owner's rights, for good, before anything of the job runs
        from ckptd.supervisor.identity import drop_to, owner_from_json

        drop_to(owner_from_json(job["owner"]))
    os.environ.update(job["env"])  # before TensorFlow first touches a device
    run = RunDir(Path(job["run"]))
    os.chdir(run.root)  # with --warm in the command line, this tells a daemon whose run it is
    atomic_write_text(run.warm_env(os.getpid()), json.dumps(job["env"]))
    log_to(run.attempt_dir(int(job["mode"])) if job["mode"].isdigit() else run.root / "attempts" / "spare")
    return main([job["run"], job["mode"]])


def _zygote(listen: str | None) -> int:
    """A job's fork server (or, listening, a user's shared one); in each forked child, the
    worker of the attempt it asked for."""
    from ckptd.worker.zygote import ListenError, serve

    try:
        work = serve(listen)
    except ListenError as e:
        print(f"python -m ckptd.worker --zygote {e}", file=sys.stderr)
        return p.EXIT_CONFIG
    return p.EXIT_OK if work is None else main(list(work))


def _dispatch(run: RunDir, mode: str) -> int:
    spare = mode == "--spare"
    attempt = 0 if spare else int(mode)
    holder: list[TrainingLoop] = []  # the loop, once built: its step goes into the error record
    try:
        if spec_from_json(run.spec_file.read_text()).entrypoint is not None:
            return _run_entrypoint(run, attempt, spare, holder)
        loop = prepare(run, attempt)
        holder.append(loop)
        if spare and _become_assigned(run, loop) is None:
            return p.EXIT_OK
        return train(loop)
    except WorkerEnd as e:
        return _ended(run, holder[0].beater.hb.attempt if holder else attempt, e)
    except Exception as e:
        attempt = holder[0].beater.hb.attempt if holder else attempt
        run.attempt_dir(attempt).mkdir(parents=True, exist_ok=True)
        # The exact step lets the supervisor tell a crash loop (same step every time) from
        # flaky crashes; the heartbeat it polls may lag a few steps behind.
        step = int(holder[0].c.step.numpy()) if holder else None
        if not step and _program_error(e):  # nothing ever trained: it would fail the same way
            err = ConfigError(
                f"before the first training step: {type(e).__name__}: {e} (see "
                f"{run.attempt_dir(attempt) / 'stderr.log'}); not retried"
            )
            write_error_file(run.attempt_dir(attempt), err, step=step)
            traceback.print_exc()
            return err.exit_code
        write_error_file(run.attempt_dir(attempt), e, step=step)
        raise  # the traceback goes to the attempt's stderr log as well; exit status 1


def _ended(run: RunDir, attempt: int, e: WorkerEnd) -> int:
    """The exit code a worker-ending error or stop carries (ckptd.worker.errors); an error is
    recorded first, for the supervisor to classify."""
    if isinstance(e, CheckDone):  # `ckptd validate --build` reads the verdict on stdout
        print(p.CHECK_PREFIX + json.dumps({"inexact": e.causes}), flush=True)
    if e.recorded:
        run.attempt_dir(attempt).mkdir(parents=True, exist_ok=True)
        write_error_file(run.attempt_dir(attempt), e, **e.context)
        print(f"ckptd worker: {e}", file=sys.stderr)
    return e.exit_code


# Errors of the program itself (shapes, names, types), not of the machine (memory, I/O, devices):
# raised before any step ever completed, retrying cannot help.
_PROGRAM_ERRORS = (
    ValueError,
    TypeError,
    LookupError,
    AttributeError,
    NameError,
    ImportError,
    SyntaxError,
    NotImplementedError,
    AssertionError,
    ArithmeticError,
)


def _program_error(e: BaseException) -> bool:
    name = type(e).__name__
    if name in ("ResourceExhaustedError", "MemoryError") or isinstance(e, OSError):
        return False
    return isinstance(e, _PROGRAM_ERRORS) or name == "InvalidArgumentError"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--warm"]:
        return _warm()
    if args[:1] == ["--zygote"] and (len(args) == 1 or (len(args) == 3 and args[1] == "--listen")):
        return _zygote(args[2] if len(args) == 3 else None)
    if len(args) != 2 or not (args[1] == "--spare" or args[1].isdigit()):
        print(
            "usage: python -m ckptd.worker "
            "(RUN_DIR (ATTEMPT | --spare) | --warm | --zygote [--listen SOCKET])",
            file=sys.stderr,
        )
        return p.EXIT_CONFIG
    p.wait_contained()  # every process of the attempt is the attempt's (ckptd.supervisor.contain)
    # Fatal signals print every thread's Python stack; the supervisor sends SIGUSR1 before it
    # kills a hung worker, so the attempt's stderr log shows where it was stuck.
    faulthandler.enable(file=sys.stderr, all_threads=True)
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    if p.SLURM_PORT_BASE_ENV in os.environ and "SLURM_PROCID" in os.environ:  # a task of srun
        os.environ[p.MEMBER_ENV] = os.environ["SLURM_PROCID"]
    # A multi_worker gang member other than the chief reads the job and keeps its own files.
    run = RunDir(Path(args[0])).member(int(os.environ.get(p.MEMBER_ENV, "0")))
    if not os.environ.get(p.CHECK_ENV):  # `ckptd validate --build` reads the verdict on stdout
        log_to(run.root / "attempts" / "spare" if args[1] == "--spare" else run.attempt_dir(int(args[1])))
    code = 1
    try:
        code = _dispatch(run, args[1])
        return code
    finally:
        _record_exit(run, args[1], code)


def _record_exit(run: RunDir, mode: str, code: int) -> None:
    """A daemon that adopted this worker after its own restart cannot waitpid() it: it reads this."""
    hb = p.Heartbeat.read(run.heartbeat)
    attempt = int(mode) if mode.isdigit() else hb.attempt if hb and hb.pid == os.getpid() else 0
    if attempt > 0:
        with contextlib.suppress(OSError):
            atomic_write_text(run.attempt_dir(attempt) / p.EXIT_FILE, f"{code}\n")


def exit_now(code: int) -> NoReturn:
    """End the worker without the interpreter's teardown. With TensorFlow loaded, freeing every
    module and object one by one took ~0.8 s of CPU after the last line of a Keras program on
    a 2-core box, at the end of every attempt (a finished job, a stop, a crash it reported),
    and nothing in it is the job's: its commits, events and exit file are durable by then.
    What a normal exit promises is kept: atexit handlers run (the program's, TensorFlow's,
    multiprocessing's, logging's) and stdio is flushed. A non-daemon thread still running
    (a program's own) is waited for as Python would: then the exit is the normal one."""
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    exit_now(main())

"""`ckptd` command line. Exit codes: 0 ok, 1 job failed or runtime error, 2 bad input, 130 stopped."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import click

from ckptd.daemon import cli_admin, cli_report, cli_service, cli_store, jobs, logs, metrics
from ckptd.daemon.cli_service import client_call
from ckptd.daemon.cli_service import die as _die
from ckptd.daemon.client import Client, SocketDenied, find_socket, service_home, service_socket
from ckptd.daemon.report import job_report, print_outputs, print_status
from ckptd.state.jobfile import load_job_file
from ckptd.state.jobspec import JobSpec
from ckptd.state.paths import RunDir, state_dir
from ckptd.state.protocol import EVENTS_FILE
from ckptd.state.states import RESUMABLE, STALE, JobState
from ckptd.state.store import Job, Store, StoreError
from ckptd.state.yamlstrict import JobFileError
from ckptd.supervisor import cgroups, contain, identity, tier
from ckptd.supervisor.display import BarDisplay, LogDisplay
from ckptd.supervisor.gpus import detect_gpus
from ckptd.supervisor.process import RealProcessOps
from ckptd.supervisor.runner import JobRunner, StopRequests

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130


def _load(path: str) -> tuple[JobSpec, bytes]:
    try:
        return load_job_file(path)
    except JobFileError as e:
        for problem in e.problems:
            click.echo(problem, err=True)
        sys.exit(EXIT_BAD_INPUT)


def _daemon_answers(home: Path) -> bool:
    try:
        return Client(find_socket(home)).available()
    except SocketDenied as e:
        _die(str(e))


def _existing_store(home: Path, job_id: str | None) -> Store | None:
    """The local store of `ckptd run` jobs, when no daemon answers; else the system service's
    store if this user may read it; None (and why, on stderr) rather than a store created just
    to say it is empty: that would hide a stopped daemon's jobs behind an empty list."""
    if (home / "ckptd.db").exists():
        return _open_store(home, readonly=True)
    where = f"no daemon answers on {find_socket(home)} and no `ckptd run` job is in {home}"
    service = service_home()
    if service != home and (service / "ckptd.db").exists():
        if os.access(service / "ckptd.db", os.R_OK):
            click.echo(
                f"ckptd: the service is not running; its jobs as of its last stop ({service}):", err=True
            )
            return _open_store(service, readonly=True)
        # Not "no jobs": the jobs exist, this user may not see them while the service is down.
        _die(
            f"the service is not running (no answer on {service_socket()}) and its store "
            f"{service / 'ckptd.db'} is not readable by you: permission denied. Start it "
            f"(systemctl start ckptd) or ask as root (sudo ckptd --home {service} status)"
        )
    if job_id:
        _die(f"no job {job_id!r}: {where}", EXIT_BAD_INPUT)
    click.echo(f"ckptd: {where}", err=True)
    return None


def _open_store(home: Path, readonly: bool = False) -> Store:
    try:
        home.mkdir(parents=True, exist_ok=True)
        return Store.open(home, readonly=readonly)
    except StoreError as e:  # a damaged or foreign store: the operator's to look at
        _die(str(e), EXIT_BAD_INPUT)
    except OSError as e:
        _die(f"cannot use state directory {home}: {e}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--home",
    type=click.Path(file_okay=False, readable=False, path_type=Path),
    envvar="CKPTD_HOME",
    help="State directory (default: $CKPTD_HOME or ~/.local/state/ckptd).",
)
@click.pass_context
def cli(ctx: click.Context, home: Path | None) -> None:
    """ckptd: fault-tolerant training for TensorFlow/Keras."""
    ctx.obj = (home or state_dir()).absolute()


@cli.command()
@click.argument("job_files", nargs=-1, required=True, type=click.Path(readable=False, path_type=Path))
@click.option(
    "--build",
    "build_",
    is_flag=True,
    help="Also set each job up in a worker (import, build, first batch) and report "
    "whatever would make a resumed run differ from an uninterrupted one.",
)
def validate(job_files: tuple[Path, ...], build_: bool) -> None:
    """Check job files; print every problem with its field path. Records nothing."""
    bad = False
    for path in job_files:
        try:
            spec, _ = load_job_file(path)
        except JobFileError as e:
            bad = True
            for problem in e.problems:
                click.echo(problem, err=True)
            continue
        what = f"{spec.train.epochs} epochs" if spec.model else f"entrypoint {spec.entrypoint}"
        click.echo(f"{path}: ok (job {spec.name}, {what})")
        bad = (build_ and not _build_report(path, spec)) or bad
    if bad:
        sys.exit(EXIT_BAD_INPUT)


def _build_report(path: Path, spec: JobSpec) -> bool:
    from ckptd.daemon.check import build_check

    result = build_check(spec)
    if not result.ok:
        click.echo(f"{path}: set-up failed: {result.error}", err=True)
        return False
    if not result.inexact:
        click.echo(f"{path}: set-up ok; nothing found that would make a resumed run differ")
    for cause in result.inexact:
        click.echo(f"{path}: warning: resume may not be bit-identical: {cause}", err=True)
    return True


def _pick_job(
    store: Store, home: Path, job_file: Path | None, resume: str | None, new: bool
) -> tuple[Job, JobSpec, bool]:
    if resume:
        try:
            job = store.job(resume)
        except StoreError as e:
            _die(str(e), EXIT_BAD_INPUT)
        if job.state not in RESUMABLE | STALE:
            _die(
                f"job {job.id} is {job.state}; only {', '.join(sorted(RESUMABLE))} jobs resume",
                EXIT_BAD_INPUT,
            )
        return job, jobs.spec_of(job), True
    assert job_file is not None
    spec, raw = _load(str(job_file))
    found = None if new else jobs.find_resumable(store, spec)
    if found is not None:
        return found, spec, True
    try:
        return jobs.create_job(store, home, spec, raw, job_file), spec, False
    except (OSError, StoreError) as e:
        _die(f"cannot create the job: {e}")


def _install_stop_handlers(stops: StopRequests) -> None:
    def record(signum: int, _frame: FrameType | None) -> None:
        stops.signals.append(signum)  # only record; the supervisor loop acts on it

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, record)


@cli.command()
@click.argument("job_file", required=False, type=click.Path(readable=False, path_type=Path))
@click.option("--resume", "resume", metavar="JOB-ID", help="Resume this interrupted or failed job.")
@click.option("--new", is_flag=True, help="Start a fresh job even if an identical one can resume.")
@click.option(
    "--progress",
    type=click.Choice(["auto", "bar", "json"]),
    default="auto",
    show_default=True,
    help="Progress bar on a terminal, JSON log lines otherwise.",
)
@click.option(
    "--metrics-address",
    metavar="HOST:PORT",
    callback=metrics.check_address,
    help="Serve Prometheus metrics of this job on HOST:PORT (off unless given).",
)
@click.pass_obj
def run(
    home: Path,
    job_file: Path | None,
    resume: str | None,
    new: bool,
    progress: str,
    metrics_address: str | None,
) -> None:
    """Run JOB_FILE in the foreground under supervision until it succeeds or fails.

    Run it again after Ctrl-C (same job file, same name) to continue from the last checkpoint.
    """
    if (job_file is None) == (resume is None):
        raise click.UsageError("give either JOB_FILE or --resume JOB-ID")
    store = _open_store(home)
    job, spec, resuming = _pick_job(store, home, job_file, resume, new)
    run_dir = RunDir(Path(job.run_dir))
    try:
        jobs.lock_job(run_dir.root)
    except jobs.JobBusy as e:
        _die(str(e))
    job = jobs.reconcile_lost(store, job)
    use_bar = progress == "bar" or (progress == "auto" and sys.stderr.isatty())
    logs.configure(json_lines=not use_bar)
    log = logs.get(job_id=job.id)
    log.info(
        "job.resumed" if resuming else "job.started",
        run_dir=str(run_dir.root),
        last_committed_step=job.last_committed_step,
    )
    if spec.resources.memory_limit:
        how, detail = cgroups.enforcement()
        log.info("memory.enforcement", how=how, detail=detail)
    held = contain.instance().choice
    log.info("containment", how=held.kind, detail=held.why)
    if metrics_address:
        _serve_metrics(home, metrics_address, log)
    store.transition(job.id, JobState.RUNNING, "resumed" if resuming else "started")
    stops = StopRequests()
    _install_stop_handlers(stops)
    gpus = detect_gpus() if spec.resources.gpus else []
    ops = RealProcessOps()
    with (
        BarDisplay() if use_bar else contextlib.nullcontext(LogDisplay(log)) as display,
        contextlib.closing(ops),
    ):
        end = JobRunner(
            store,
            job.id,
            spec,
            run_dir,
            ops,
            display,
            stops,
            hot_spare=spec.restart.hot_spare,
            gpus=gpus,
            record=jobs.supervision_dir(home, job.id) / EVENTS_FILE,
            tier=tier.for_job(spec, job.id, identity.me()),
        ).run_job()
    final = store.job(job.id)
    log.info(
        "job.finished", state=str(end), reason=final.reason, last_committed_step=final.last_committed_step
    )
    print_outputs(final, spec)
    store.checkpoint_wal()  # a clean end: ckptd.db alone holds every job
    if end == JobState.INTERRUPTED:
        click.echo(f"ckptd: stopped; continue with: ckptd run --resume {job.id}", err=True)
    sys.exit({JobState.SUCCEEDED: 0, JobState.INTERRUPTED: EXIT_INTERRUPTED}.get(end, EXIT_FAILED))


def _serve_metrics(home: Path, address: str, log: Any) -> None:
    try:
        log.info("metrics.serving", address=metrics.serve(address, home), path="/metrics")
    except OSError as e:
        _die(f"--metrics-address {address}: cannot serve there: {e.strerror or e}", EXIT_BAD_INPUT)


@cli.command()
@click.argument("job_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def status(home: Path, job_id: str | None, as_json: bool) -> None:
    """Show all jobs, or one job with its attempts."""
    reports: list[dict[str, Any]]
    if as_json:  # a refusal too is JSON on stdout: scripts piping to jq see why
        cli_service.json_errors(home)
    if _daemon_answers(home):  # the daemon's view, with owners and priorities
        got = client_call(home, "GET", f"/v1/jobs/{job_id}" if job_id else "/v1/jobs")
        reports = [got] if job_id else got
    elif (store := _existing_store(home, job_id)) is None:
        reports = []
    else:
        try:
            selected = [store.job(job_id)] if job_id else store.jobs()
        except StoreError as e:
            _die(str(e), EXIT_BAD_INPUT)
        reports = [job_report(store, j, detail=job_id is not None) for j in selected]
    if as_json:
        click.echo(json.dumps(reports[0] if job_id else reports, indent=2))
    else:
        print_status(reports, detail=job_id is not None)


@cli.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--all",
    "include_retired",
    is_flag=True,
    help="Include checkpoints already deleted by retention (max_to_keep).",
)
@click.pass_obj
def checkpoints(home: Path, job_id: str, as_json: bool, include_retired: bool) -> None:
    """List a job's committed checkpoints (newest last)."""
    if _daemon_answers(home):
        rows = client_call(home, "GET", f"/v1/jobs/{job_id}/checkpoints?all={int(include_retired)}")
    else:
        store = _existing_store(home, job_id)
        assert store is not None  # with a job id, _existing_store exits instead
        try:
            store.job(job_id)
        except StoreError as e:
            _die(str(e), EXIT_BAD_INPUT)
        rows = store.checkpoints(job_id, include_retired)
        for r in rows:
            r["metrics"] = json.loads(r.pop("metrics_json") or "{}")
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"{job_id}: no committed checkpoint yet")
    for r in rows:
        metrics = " ".join(f"{k}={v:.4f}" for k, v in sorted(r["metrics"].items()))
        retired = "  (retired)" if r["retired_at"] else ""
        click.echo(f"step {r['step']:>8}  epoch {r['epoch']:>5}  {r['path']}  {metrics}{retired}")


for _command in (
    cli_service.daemon_cmd,
    cli_service.submit,
    cli_service.logs_cmd,
    cli_service.cancel,
    cli_service.export,
    cli_store.recover,
    cli_store.backup,
    cli_admin.drain,
    cli_admin.undrain,
    cli_report.report,
):
    cli.add_command(_command)


def main() -> None:
    cli(prog_name="ckptd")


if __name__ == "__main__":
    main()

"""CLI commands that talk to the daemon: daemon, submit, logs, cancel, export."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, NoReturn

import click

from ckptd.daemon import logs, metrics
from ckptd.daemon.client import ApiRefused, Client, DaemonUnavailable, SocketDenied, find_socket
from ckptd.daemon.config import load_config
from ckptd.daemon.report import best_files
from ckptd.daemon.service import AlreadyRunning, Daemon
from ckptd.daemon.sockets import SocketError
from ckptd.state.jobfile import load_job_file
from ckptd.state.jobspec import spec_json
from ckptd.state.protocol import Event
from ckptd.state.store import StoreError
from ckptd.state.yamlstrict import JobFileError

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2
SUBMIT_RETRIES = 3
FOLLOW_POLL_SECONDS = 0.5
JSON_ERRORS = "ckptd.json_errors"  # click's context meta: the home whose refusals are also JSON


def json_errors(home: Path) -> None:
    """From here on in this command, a refusal is also one JSON object on stdout (`status
    --json`): a script piping to jq reads why, not an empty stream."""
    click.get_current_context().meta[JSON_ERRORS] = home


def die(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """One line on stderr, then exit `code` (and the JSON object, after json_errors)."""
    click.echo(f"ckptd: {message}", err=True)
    ctx = click.get_current_context(silent=True)
    if ctx is not None and JSON_ERRORS in ctx.meta:
        click.echo(json.dumps(_error_report(message, code, ctx.meta[JSON_ERRORS])))
    sys.exit(code)


def _error_report(message: str, code: int, home: Path) -> dict[str, Any]:
    """The refusal with whether the daemon (or service) answers: up, down, or denied to us."""
    path = find_socket(home)
    try:
        state = "up" if Client(path, timeout=5).available() else "down"
    except SocketDenied:
        state = "denied"
    return {"error": message, "exit_code": code, "service": state, "socket": str(path)}


def client_call(home: Path, method: str, url: str, body: dict[str, Any] | None = None) -> Any:
    try:
        return Client(find_socket(home)).call(method, url, body)
    except DaemonUnavailable as e:
        die(str(e))
    except ApiRefused as e:
        for problem in e.payload.get("problems", []):
            click.echo(f"  {problem}", err=True)
        die(str(e), EXIT_BAD_INPUT if e.status in (400, 403, 404, 409) else EXIT_FAILED)


@click.command("daemon")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Daemon settings (default: <state>/daemon.yaml if present).",
)
@click.option(
    "--metrics-address",
    metavar="HOST:PORT",
    callback=metrics.check_address,
    help="Serve Prometheus metrics on HOST:PORT (default: metrics_address in the settings; off).",
)
@click.pass_obj
def daemon_cmd(home: Path, config_file: Path | None, metrics_address: str | None) -> None:
    """Run the service in the foreground (systemd runs this): API, queue, spool, recovery."""
    logs.configure(json_lines=not sys.stdout.isatty(), stream=sys.stdout)
    log = logs.get()
    try:
        home.mkdir(parents=True, exist_ok=True)
        config = load_config(config_file, home)
        if metrics_address:
            config = config.model_copy(update={"metrics_address": metrics_address})
        sys.exit(Daemon(home, config, log).serve())
    except JobFileError as e:
        for problem in e.problems:
            click.echo(problem, err=True)
        sys.exit(EXIT_BAD_INPUT)
    except (AlreadyRunning, SocketError, StoreError, OSError) as e:
        log.error("daemon.refused", error=str(e))
        die(str(e))


@click.command()
@click.argument("job_file", type=click.Path(readable=False, path_type=Path))
@click.option(
    "--priority",
    type=click.IntRange(-100, 100),
    default=0,
    show_default=True,
    help="Higher runs first; equal priorities run in submission order.",
)
@click.option("--key", help="Idempotency key (default: a fresh one, reused by this command's retries).")
@click.option("--wait", is_flag=True, help="Wait until the job ends; exit 0 only if it succeeded.")
@click.option("--follow", is_flag=True, help="Like --wait, printing the job's events.")
@click.pass_obj
def submit(home: Path, job_file: Path, priority: int, key: str | None, wait: bool, follow: bool) -> None:
    """Validate JOB_FILE here, queue it on the daemon, print the job id."""
    try:
        spec, raw = load_job_file(job_file)
    except JobFileError as e:
        for problem in e.problems:
            click.echo(problem, err=True)
        sys.exit(EXIT_BAD_INPUT)
    body = {
        "spec_json": spec_json(spec),
        "job_file": os.path.abspath(job_file),
        "raw": raw.decode(),
        "priority": priority,
        "key": key or f"cli-{uuid.uuid4()}",
    }
    client = Client(find_socket(home))
    answer: Any = {}
    for attempt in range(SUBMIT_RETRIES):
        try:
            answer = client.call("POST", "/v1/jobs", body)
            break
        except DaemonUnavailable as e:  # same key: a retry never creates a second job
            if attempt == SUBMIT_RETRIES - 1:
                die(str(e))
            time.sleep(1.0)
        except ApiRefused as e:
            for problem in e.payload.get("problems", []):
                click.echo(f"  {problem}", err=True)
            die(str(e), EXIT_BAD_INPUT)
    job_id = answer["job"]["id"]
    click.echo(job_id)
    if wait or follow:
        sys.exit(_watch(home, job_id, show=follow, as_json=not sys.stdout.isatty()))


def _export_best(job_id: str, template: str | None, output: Path) -> None:
    best = best_files(template)  # listed with our own rights
    if not best:
        die(f"job {job_id} has no best file yet (best: not configured, or no epoch ended)")
    if Path(best[-1]).suffix != output.suffix:
        die(
            f"the best file is {Path(best[-1]).name}; name the output *{Path(best[-1]).suffix}",
            EXIT_BAD_INPUT,
        )
    try:
        shutil.copyfile(best[-1], output)
    except OSError as e:
        die(f"cannot copy {best[-1]} to {output}: {e.strerror}")
    click.echo(f"{output}: best weights from {best[-1]}")


def _refuse_unreadable(home: Path, job: dict[str, Any], where: Path, which: str, output: Path) -> NoReturn:
    """An admin sees every job through the daemon, but its files stay its owner's (mode 2750,
    group ckptd): say so, with what the job's events (read by the daemon) say was saved, rather
    than "no best file"."""
    saved = _saved_best(home, job["id"]) if which == "best" else []
    what = f"Its worker saved {len(saved)} best file(s), the newest {saved[-1]}. " if saved else ""
    die(
        f"{where} is not readable by you (uid {os.getuid()}): job {job['id']}'s files belong to "
        f"its owner (uid {job.get('owner_uid')}); an admin may see and cancel any job, not read "
        f"its files. {what}Export it as root (sudo ckptd export {job['id']} --{which} -o "
        f"{output}) or ask its owner"
    )


def _saved_best(home: Path, job_id: str) -> list[str]:
    """The best files the job's `best.saved` events name, oldest first, each once."""
    saved: dict[str, None] = {}
    offset = "0"
    while True:
        chunk = client_call(home, "GET", f"/v1/jobs/{job_id}/events?offset={offset}")
        saved.update(
            (str(ev["path"]), None)
            for ev in chunk["events"]
            if ev.get("event") == Event.BEST_SAVED and ev.get("path")
        )
        if not chunk["events"]:
            return list(saved)
        offset = chunk["offset"]


def _print_event(ev: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(ev, separators=(",", ":")))
        return
    ts = time.strftime("%H:%M:%S", time.localtime(ev.pop("ts", time.time())))
    kind = ev.pop("event", "?")
    detail = " ".join(f"{k}={v}" for k, v in ev.items() if k not in ("metrics", "digest", "logs"))
    click.echo(f"{ts} {kind} {detail}")


def _watch(home: Path, job_id: str, show: bool, as_json: bool, follow: bool = True) -> int:
    """Print events (if `show`) until the job ends; exit code 0 only if it succeeded."""
    offset = 0
    while True:
        chunk = client_call(home, "GET", f"/v1/jobs/{job_id}/events?offset={offset}")
        for ev in chunk["events"]:
            if show:
                _print_event(ev, as_json)
        offset = chunk["offset"]
        if not follow or (chunk["terminal"] and not chunk["events"]):
            return 0 if chunk["state"] == "succeeded" or not follow else EXIT_FAILED
        if not chunk["events"]:
            time.sleep(FOLLOW_POLL_SECONDS)


@click.command("logs")
@click.argument("job_id")
@click.option("-f", "--follow", is_flag=True, help="Keep following across worker restarts.")
@click.option("--json", "as_json", is_flag=True, help="Raw JSON lines.")
@click.pass_obj
def logs_cmd(home: Path, job_id: str, follow: bool, as_json: bool) -> None:
    """Print a job's events (epochs, checkpoints, best files, attempts)."""
    code = _watch(home, job_id, show=True, as_json=as_json, follow=follow)
    sys.exit(code if follow else 0)


@click.command()
@click.argument("job_id")
@click.pass_obj
def cancel(home: Path, job_id: str) -> None:
    """Cancel a job in any state; a running worker saves a checkpoint first."""
    answer = client_call(home, "POST", f"/v1/jobs/{job_id}/cancel")
    click.echo(f"{job_id}: {answer['state']}")


@click.command()
@click.argument("job_id")
@click.option("--best", "which", flag_value="best", help="The best weights file so far.")
@click.option("--latest", "which", flag_value="latest", help="The newest verified checkpoint.")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Where to write (.hdf5/.h5: Keras-2 layout, .weights.h5: Keras 3).",
)
@click.pass_obj
def export(home: Path, job_id: str, which: str | None, output: Path) -> None:
    """Write a job's weights to an HDF5 file that model.load_weights() reads."""
    if which is None:
        raise click.UsageError("give --best or --latest")
    if not output.parent.is_dir():
        what = "is not a directory" if output.parent.exists() else "does not exist"
        die(f"-o {output}: {output.parent} {what}", EXIT_BAD_INPUT)
    if not os.access(output.parent, os.W_OK | os.X_OK):
        die(f"-o {output}: the directory {output.parent} is not writable by you", EXIT_BAD_INPUT)
    job = client_call(home, "GET", f"/v1/jobs/{job_id}")
    template = job["outputs"].get("best_template")
    where = Path(template).parent if which == "best" and template else Path(job["run_dir"])
    if not os.access(where, os.R_OK | os.X_OK):  # seeing a job (admins) is not reading its files
        _refuse_unreadable(home, job, where, which, output)
    if which == "best":
        _export_best(job_id, template, output)
        return
    # TensorFlow is only ever imported in a worker-side process.
    r = subprocess.run(
        [sys.executable, "-m", "ckptd.worker.export", job["run_dir"], str(output)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        die(f"export failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    click.echo(f"{output}: weights of {r.stdout.strip()}")

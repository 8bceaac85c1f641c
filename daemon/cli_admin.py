"""The operator's maintenance commands: `ckptd drain`, `ckptd undrain` (ckptd.daemon.drain)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from ckptd.daemon.cli_service import client_call, die

DRAIN_WAIT_POLL = 0.5


@click.command()
@click.option(
    "--finish",
    is_flag=True,
    help="Let running jobs run to their end (default: they save, stop and go back to the queue).",
)
@click.option("--wait", is_flag=True, help="Return once no job runs any more.")
@click.option("--timeout", type=click.FloatRange(min=0), default=3600, show_default=True, help="With --wait.")
@click.pass_obj
def drain(home: Path, finish: bool, wait: bool, timeout: float) -> None:
    """Start no job until `ckptd undrain` (for an upgrade or a reboot); submissions still queue.

    Survives a restart of the service. Root and the admin group only."""
    answer = client_call(home, "POST", "/v1/drain", {"running": "finish" if finish else "stop"})
    stopping = answer["stopping"]
    click.echo(
        "drained: no job starts until `ckptd undrain`; "
        + (
            f"{len(stopping)} running job(s) save a checkpoint, stop and go back to the queue"
            if not finish
            else f"{len(answer['running'])} running job(s) run to their end"
        )
    )
    if wait:
        deadline = time.monotonic() + timeout
        while client_call(home, "GET", "/v1/health")["running"]:
            if time.monotonic() > deadline:
                die(f"jobs still running after {timeout:.0f} s (ckptd status); the service stays drained")
            time.sleep(DRAIN_WAIT_POLL)
        click.echo("no job runs")


@click.command()
@click.pass_obj
def undrain(home: Path) -> None:
    """Start jobs again after `ckptd drain`, in queue order."""
    answer = client_call(home, "POST", "/v1/undrain")
    click.echo("undrained: queued jobs start again" if answer["was"] else "was not drained")

"""`ckptd recover` and `ckptd backup`: the store's own care, for the operator who owns it.

Both open the store directly (the daemon's user, or root for the service's state directory);
SQLite's locking lets them run beside a live daemon.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from pathlib import Path

import click

from ckptd.state import orphans
from ckptd.state.durable import fsync_dir
from ckptd.state.store import Store, StoreError


def _open(home: Path) -> Store:
    if not (home / "ckptd.db").exists():
        click.echo(f"ckptd: no job store in {home} (give --home, or CKPTD_HOME)", err=True)
        sys.exit(2)
    try:
        return Store.open(home, check=False)
    except StoreError as e:
        click.echo(f"ckptd: {e}", err=True)
        sys.exit(2)


@click.command()
@click.option("--adopt", is_flag=True, help="Queue every adoptable run directory again as its owner's job.")
@click.pass_obj
def recover(home: Path, adopt: bool) -> None:
    """List run directories the job store does not know (a lost WAL, a store restored from an
    old backup); with --adopt, put them back as queued jobs that resume from their newest
    checkpoint. Their attempt history is not recovered: it lived in the lost store."""
    store = _open(home)
    found = orphans.find(store, home)
    if not found:
        click.echo(f"every run directory in {home / 'jobs'} is in the store")
        return
    failed = False
    for o in found:
        if o.problem is not None:
            click.echo(f"{o.job_id}: cannot adopt: {o.problem}")
            failed = failed or adopt
        elif adopt:
            orphans.adopt(store, o)
            click.echo(f"{o.job_id}: adopted (queued, owner uid {o.owner_uid})")
        else:
            click.echo(f"{o.job_id}: not in the store (owner uid {o.owner_uid}); --adopt queues it")
    sys.exit(1 if failed else 0)


@click.command()
@click.argument("target", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_obj
def backup(home: Path, target: Path) -> None:
    """Copy the job store, consistent and complete (WAL included), to TARGET while the daemon
    runs (SQLite's online backup). Restore by stopping the daemon and putting TARGET in place
    of <state>/ckptd.db."""
    store = _open(home)
    if target.exists():
        click.echo(f"ckptd: {target} exists; give a new file name", err=True)
        sys.exit(2)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with sqlite3.connect(tmp) as dst:
            store.backup_to(dst)
        os.chmod(tmp, 0o600)  # every user's job records: private, as the store is
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.rename(tmp, target)
        fsync_dir(target.parent)
    except (OSError, sqlite3.Error) as e:
        tmp.unlink(missing_ok=True)
        click.echo(f"ckptd: cannot back the store up to {target}: {e}", err=True)
        sys.exit(1)
    click.echo(f"backed up {home / 'ckptd.db'} to {target}")

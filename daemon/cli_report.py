"""`ckptd report JOB`: a picture of a run, for the operator who would rather look than read.

Top panel: steps over wall time, one line per attempt, each attempt's end marked with its class,
commits as dots, start-ups and backoffs shaded. Bottom panel: the goodput breakdown as one
stacked bar. Three layers: gathering the facts (the store, or the service's API plus the
worker's events file read with the caller's own rights), shaping them (`picture`, pure), and
drawing (`draw`). matplotlib is imported inside `draw` only: the daemon never loads it and
`ckptd status` does not pay for it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from ckptd.daemon.backend import read_events
from ckptd.daemon.cli_service import client_call, die
from ckptd.state import goodput
from ckptd.state.protocol import EVENTS_FILE, Event
from ckptd.state.store import Store, StoreError

EXIT_BAD_INPUT = 2
MISSING = "ckptd report needs matplotlib: pip install 'ckptd[report]'"
FORMATS = {".svg": "svg", ".png": "png"}
# The worker's events that say which step an attempt had reached when (restores: where it began).
SERIES = frozenset(
    {
        Event.RESTORE_DONE,
        Event.RESTORE_FRESH,
        Event.TRAINING_FIRST_STEP,
        Event.EPOCH_END,
        Event.CHECKPOINT_COMMITTED,
    }
)
ISO = "%Y-%m-%dT%H:%M:%S%z"  # the job report's times (daemon/report.py), to the second
# One colour per goodput part, so the same part looks the same in every report.
PART_COLOURS = {
    "productive": "#2ca02c",
    "checkpoint_stall": "#bcbd22",
    "recomputed": "#d62728",
    "hang": "#9467bd",
    "startup": "#1f77b4",
    "restart": "#ff7f0e",
    "shutdown": "#8c564b",
    "waiting": "#7f7f7f",
    "other": "#dbdbdb",
}
# The shaded gaps wear the colours of the goodput parts they fall in.
GAP_COLOURS = {
    "start-up": PART_COLOURS["startup"],
    "restart": PART_COLOURS["restart"],
    "backoff": PART_COLOURS["waiting"],
}

# Attempts' lines: colours none of the parts or gaps wear, so a line is never read as a band.
ATTEMPT_COLOURS = ("#393b79", "#e377c2", "#17becf", "#8c6d31", "#843c39", "#637939")

Point = tuple[float, int]  # (time, step)


@dataclass(frozen=True)
class AttemptRow:
    n: int
    started: float
    ended: float | None  # None: still running
    klass: str | None
    last_step: int | None  # its last heartbeat's step


@dataclass(frozen=True)
class Facts:
    """What gathering found, in epoch seconds; `events` are the worker's (SERIES only)."""

    job_id: str
    state: str
    attempts: tuple[AttemptRow, ...]
    commits: tuple[Point, ...]
    events: tuple[dict[str, Any], ...]
    goodput: dict[str, Any]
    now: float


@dataclass(frozen=True)
class Line:
    n: int
    label: str  # its class, or "running"
    points: tuple[Point, ...]  # seconds since the picture's origin
    end: float | None  # None: still running
    end_step: int | None


@dataclass(frozen=True)
class Picture:
    title: str
    origin: float  # the job's first spawn, epoch seconds
    lines: tuple[Line, ...]
    commits: tuple[Point, ...]
    gaps: tuple[tuple[float, float, str], ...]  # (start, end, a GAP_COLOURS key)
    parts: tuple[tuple[str, float], ...]  # goodput seconds by part, in goodput.PARTS order
    goodput_title: str


# -- shaping (pure) -----------------------------------------------------------------------------


def picture(facts: Facts) -> Picture:
    attempts = tuple(_settled(a, facts.events) for a in facts.attempts)
    origin = min((a.started for a in attempts), default=facts.now)
    lines = tuple(_line(a, facts.events, origin) for a in attempts)
    g = facts.goodput
    parts = tuple((k, float(g[k])) for k in goodput.PARTS if isinstance(g.get(k), int | float))
    return Picture(
        title=f"{facts.job_id} — {facts.state}",
        origin=origin,
        lines=lines,
        commits=tuple((t - origin, s) for t, s in facts.commits),
        gaps=tuple(_gaps(attempts, facts.events, origin, facts.now)),
        parts=parts,
        goodput_title=goodput.describe(g) if parts or "error" in g else "goodput: not reported",
    )


def _mine(events: tuple[dict[str, Any], ...], n: int) -> list[dict[str, Any]]:
    return [e for e in events if e.get("attempt") == n and e.get("event") in SERIES and "ts" in e]


def _settled(a: AttemptRow, events: tuple[dict[str, Any], ...]) -> AttemptRow:
    """The attempt's spawn never after its first event, its end never before its last: the
    service's job report gives attempt times to the second only."""
    times = [float(e["ts"]) for e in _mine(events, a.n)]
    if not times:
        return a
    ended = None if a.ended is None else max(a.ended, *times)
    return replace(a, started=min(a.started, *times), ended=ended)


def _line(a: AttemptRow, events: tuple[dict[str, Any], ...], origin: float) -> Line:
    """The attempt's known (time, step) points, its end and the last step it was seen at."""
    points = sorted((float(e["ts"]) - origin, int(e.get("step", 0))) for e in _mine(events, a.n))
    end = None if a.ended is None else a.ended - origin
    last = max([s for _, s in points] + ([a.last_step] if a.last_step is not None else []), default=None)
    return Line(a.n, a.klass or "running", tuple(points), end, last)


def _gaps(
    attempts: tuple[AttemptRow, ...], events: tuple[dict[str, Any], ...], origin: float, now: float
) -> list[tuple[float, float, str]]:
    """Backoff: from an attempt's end to the next one's spawn. Start-up (the first attempt's) or
    restart (a later one's): from a spawn to its first training step (process start, import,
    build, restore)."""
    out: list[tuple[float, float, str]] = []
    prev_end: float | None = None
    for a in attempts:
        if prev_end is not None and a.started > prev_end:
            out.append((prev_end - origin, a.started - origin, "backoff"))
        mine = _mine(events, a.n)
        firsts = [float(e["ts"]) for e in mine if e["event"] == Event.TRAINING_FIRST_STEP]
        trained = min(firsts or [float(e["ts"]) for e in mine] or [a.ended or now])
        out.append((a.started - origin, trained - origin, "start-up" if prev_end is None else "restart"))
        prev_end = a.ended if a.ended is not None else now
    return out


# -- gathering ----------------------------------------------------------------------------------


def series_events(run_root: Path, name: str = EVENTS_FILE) -> tuple[dict[str, Any], ...]:
    """The worker's SERIES events, read as everything in a job owner's directory is (no link
    followed), chunk by chunk; unreadable reads as none."""
    out: list[dict[str, Any]] = []
    offset = 0
    while True:
        chunk, after = read_events(run_root, name, offset)
        out += [e for e in chunk if e.get("event") in SERIES]
        if after == offset:  # the end (or a line too long to ever end: nothing more to read)
            return tuple(out)
        offset = after


def from_store(store: Store, job_id: str) -> Facts:
    job = store.job(job_id)
    attempts = tuple(
        AttemptRow(a.n, a.started_at, a.ended_at, str(a.klass) if a.klass else None, a.last_step)
        for a in store.attempts(job.id)
    )
    rows = store.checkpoints(job.id, include_retired=True)
    return Facts(
        job_id=job.id,
        state=str(job.state),
        attempts=attempts,
        commits=tuple((float(r["committed_at"]), int(r["step"])) for r in rows),
        events=series_events(Path(job.run_dir)),
        goodput=goodput.summary(store, job.id),
        now=time.time(),
    )


def _api_time(text: str | None) -> float | None:
    return None if text is None else datetime.strptime(text, ISO).timestamp()


def _readable(run_root: Path) -> bool:
    """False: it is there and not ours to read. A run directory retention removed is readable
    (as no events): the attempts and the goodput still make a picture."""
    try:
        os.stat(run_root)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return os.access(run_root, os.R_OK | os.X_OK)


def from_service(home: Path, job_id: str) -> Facts:
    """The daemon's job report (it checks who may see the job); the events file with the
    caller's own rights: seeing a job through the daemon is not reading its owner's files."""
    job = client_call(home, "GET", f"/v1/jobs/{job_id}")
    rows = client_call(home, "GET", f"/v1/jobs/{job_id}/checkpoints?all=1")
    events = Path(job["outputs"]["events"])
    if not _readable(events.parent):
        die(
            f"{events.parent} is not readable by you (uid {os.getuid()}): job {job['id']}'s files "
            f"belong to its owner (uid {job.get('owner_uid')}); run `sudo ckptd report {job['id']}` "
            "or ask its owner"
        )
    attempts = tuple(
        AttemptRow(
            a["n"], _api_time(a["started_at"]) or 0.0, _api_time(a["ended_at"]), a["class"], a["last_step"]
        )
        for a in job["attempt_list"]
    )
    return Facts(
        job_id=job["id"],
        state=job["state"],
        attempts=attempts,
        commits=tuple((float(r["committed_at"]), int(r["step"])) for r in rows),
        events=series_events(events.parent, events.name),
        goodput=job.get("goodput") or {},
        now=time.time(),
    )


def _gather(home: Path, job_id: str) -> Facts:
    """As `ckptd status JOB` finds a job: the daemon if one answers, else the local store."""
    from ckptd.daemon.cli import _daemon_answers, _existing_store  # cli imports this module

    if _daemon_answers(home):
        return from_service(home, job_id)
    store = _existing_store(home, job_id)
    assert store is not None  # with a job id, _existing_store exits instead
    try:
        return from_store(store, job_id)
    except StoreError as e:
        die(str(e), EXIT_BAD_INPUT)


# -- drawing ------------------------------------------------------------------------------------


def draw(pic: Picture, output: Path) -> None:
    """Write the picture to `output` (its suffix, a FORMATS key, chooses SVG or PNG)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # svg.fonttype none: text stays text in the SVG (searchable, selectable, small).
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": pic.title}):
        fig = Figure(figsize=(11, 7), layout="constrained")
        FigureCanvasAgg(fig)  # the non-interactive Agg canvas; no pyplot, no GUI, no global state
        steps, bar = fig.subplots(2, 1, height_ratios=[4, 1])
        fig.suptitle(pic.title)
        _draw_steps(steps, pic)
        _draw_goodput(bar, pic)
        fig.savefig(output, format=FORMATS[output.suffix.lower()])


def _draw_steps(ax: Any, pic: Picture) -> None:
    shaded: set[str] = set()
    for start, end, kind in pic.gaps:
        if end > start:
            label = None if kind in shaded else kind
            ax.axvspan(start, end, color=GAP_COLOURS[kind], alpha=0.15, lw=0, label=label)
            shaded.add(kind)
    for i, line in enumerate(pic.lines):
        colour = ATTEMPT_COLOURS[i % len(ATTEMPT_COLOURS)]
        if line.points:
            ax.plot(*zip(*line.points, strict=True), color=colour, lw=1.8, label=f"attempt {line.n}")
        if line.end is not None:
            ax.axvline(line.end, color=colour, ls="--", lw=1)
            at = "" if line.end_step is None else f", last step {line.end_step}"
            ax.annotate(
                f"attempt {line.n} {line.label}{at}",
                xy=(line.end, 0.98),
                xycoords=("data", "axes fraction"),
                rotation=90,
                ha="right",
                va="top",
                fontsize=9,
                color=colour,
            )
    if pic.commits:
        ax.scatter(*zip(*pic.commits, strict=True), s=14, color="black", zorder=3, label="commit")
    clock = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(pic.origin))
    ax.set_xlabel(f"seconds since the first start ({clock})")
    ax.set_ylabel("step")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)  # beside: it hides nothing


def _draw_goodput(ax: Any, pic: Picture) -> None:
    ax.set_title(pic.goodput_title, fontsize=10)
    ax.set_yticks([])
    left = 0.0
    for part, seconds in pic.parts:
        if seconds > 0:
            ax.barh(0, seconds, left=left, color=PART_COLOURS[part], label=f"{part} {seconds:.1f} s")
            left += seconds
    ax.set_xlabel("seconds of the job's active time")
    if left > 0:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.6), ncol=5, fontsize=8, frameon=False)


# -- the command --------------------------------------------------------------------------------


def _check_output(_ctx: click.Context, _param: click.Parameter, value: Path | None) -> Path | None:
    if value is not None and value.suffix.lower() not in FORMATS:
        raise click.BadParameter(f"{value}: name a .svg or .png file")
    return value


@click.command()
@click.argument("job_id")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    callback=_check_output,
    help="Where to write; .svg or .png (default: JOB-report.svg here).",
)
@click.pass_obj
def report(home: Path, job_id: str, output: Path | None) -> None:
    """Draw a job's run: steps over wall time per attempt, each attempt's end and class,
    commits, restarts, and where the time went (goodput)."""
    if importlib.util.find_spec("matplotlib") is None:  # before any work: say what is missing
        click.echo(MISSING, err=True)
        sys.exit(EXIT_BAD_INPUT)
    facts = _gather(home, job_id)
    target = output or Path(f"{facts.job_id}-report.svg")
    try:
        draw(picture(facts), target)
    except OSError as e:
        die(f"cannot write {target}: {e.strerror or e}")
    click.echo(str(target))

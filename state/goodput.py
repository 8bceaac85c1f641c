"""Goodput: where a job's wall time went, and how much of it trained what the job keeps.

The large training platforms' goodput libraries split a job's time into productive training and
"badput" (failures, restarts, saves, waits). Here every second of the time the job was active
(queued, running or in backoff; time spent interrupted or failed before a resume is not its
wall time) goes to exactly one part:

- productive: an attempt's training (steps, epoch ends) up to the newest step still in the job's
  committed state, minus checkpoint_stall. A running attempt's time since its last commit counts
  too, until a failure proves it lost.
- checkpoint_stall: the training loop blocked on saves of kept steps: every final and preemption
  save; interval saves when synchronous, or the loop's own measure where the worker reported it
  (training.done, which also covers the async snapshot; failed async attempts report none).
- recomputed: training after an attempt's last kept commit, lost when the attempt failed (the
  next attempt trains it again), up to its end; for a hang, up to its last progress.
- hang: an attempt that ended in a hang, from its last progress (its last heartbeat's step, placed
  at the attempt's step rate) to its end: the silence until the verdict, then the SIGTERM grace.
- startup: from the spawn of the first attempt (of the job, or of a resume) to its first training
  step: process start, TensorFlow import, build, restore, tracing; a run without failures pays it.
- restart: from an attempt's end to the next attempt's first training step, minus waits: what a
  failure (or preemption) costs besides the lost steps.
- shutdown: an attempt that lost nothing (succeeded, preempted), from its last commit to its exit.
- waiting: queued (from the job's start or resume to its first spawn), backoff (the supervisor's
  delay before a restart) and disk_full (that delay after a disk_full attempt: waiting for space).
- other: whatever none of these covers (between the last exit and the job's end state).

`account` is pure; `gather` and `of_job` read its facts from the store and the run directory.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptd.state import protocol as p
from ckptd.state.jobspec import spec_from_json
from ckptd.state.states import AttemptClass, JobState
from ckptd.state.store import Attempt, Store

WAIT_CAUSES = ("queued", "backoff", "disk_full")
PARTS = (
    "productive",
    "checkpoint_stall",
    "recomputed",
    "hang",
    "startup",
    "restart",
    "shutdown",
    "waiting",
    "other",
)
# The job's time counts while it is in one of these states.
ACTIVE = frozenset({JobState.QUEUED, JobState.RUNNING, JobState.BACKOFF})
# Saves the training loop waits for in either checkpoint mode.
BLOCKING_SAVES = frozenset({"final", "preempted"})
# Attempt endings that lose no step: their time after the last commit is the exit.
NOTHING_LOST = frozenset({AttemptClass.SUCCEEDED, AttemptClass.PREEMPTED})

Interval = tuple[float, float, str]  # start, end, label
Point = tuple[int, float]  # (step, when the attempt had trained it)


@dataclass(frozen=True)
class Commit:
    step: int
    time: float  # when it was durable
    seconds: float  # how long the save took (the worker's figure)
    reason: str  # interval, final, preempted


@dataclass(frozen=True)
class AttemptFacts:
    spawned: float
    ended: float | None  # None: still running
    klass: str | None  # an AttemptClass; None while running
    training_from: float | None  # its first step's end (custom loops: its restore's); None: never trained
    first_step: int = 0  # the step count at training_from
    restored_step: int | None = None  # None: unknown (it never got that far)
    last_step: int | None = None  # its last heartbeat's step (or its error record's)
    commits: tuple[Commit, ...] = ()
    interval_stall: float | None = None  # the loop's own measure of interval-save stalls


@dataclass(frozen=True)
class JobFacts:
    states: tuple[tuple[float, str], ...]  # (time, JobState) from its creation on, in time order
    attempts: tuple[AttemptFacts, ...]
    sync_saves: bool  # checkpoint.mode sync: interval saves block the training loop


@dataclass(frozen=True)
class Goodput:
    wall: float
    productive: float = 0.0
    checkpoint_stall: float = 0.0
    recomputed: float = 0.0
    hang: float = 0.0
    startup: float = 0.0
    restart: float = 0.0
    shutdown: float = 0.0
    waiting: float = 0.0
    other: float = 0.0
    waits: dict[str, float] = field(default_factory=dict)  # waiting by cause (WAIT_CAUSES)

    @property
    def ratio(self) -> float:
        return self.productive / self.wall if self.wall > 0 else 0.0

    def parts(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in PARTS}

    def as_dict(self) -> dict[str, Any]:
        """For `ckptd status --json` and the attempt's exit event: seconds, to the millisecond."""
        out: dict[str, Any] = {"ratio": round(self.ratio, 4), "wall": round(self.wall, 3)}
        out.update({k: round(v, 3) for k, v in self.parts().items()})
        out["waiting_by_cause"] = {k: round(v, 3) for k, v in self.waits.items()}
        return out


def describe(d: dict[str, Any]) -> str:
    """One line for `ckptd status JOB`, from `summary` (which is what the daemon sends)."""
    if "error" in d:
        return str(d["error"])
    rest = ", ".join(f"{k} {d[k]:.1f}s" for k in PARTS if k != "productive" and d.get(k, 0.0) >= 0.05)
    head = f"goodput {d['ratio']:.3f}: productive {d['productive']:.1f}s of {d['wall']:.1f}s"
    return head + (f"; {rest}" if rest else "")


# -- the accounting (pure) ----------------------------------------------------------------------


def account(facts: JobFacts, now: float) -> Goodput:
    """Split the job's active time into PARTS. Each instant goes to the first interval that covers
    it (waits before attempts' parts); what none covers is `other`, so the parts sum to the wall
    time by construction and nothing unexplained hides in a named part."""
    spans = active_spans(facts.states, now)
    kept = kept_steps(facts.attempts)
    seconds = _paint(spans, _waits(facts, spans, now) + _attempt_parts(facts, spans, kept, now))
    stalls = sum(_stall(a, k, facts.sync_saves) for a, k in zip(facts.attempts, kept, strict=True))
    seconds["checkpoint_stall"] = min(stalls, seconds["productive"])
    seconds["productive"] -= seconds["checkpoint_stall"]
    waits = {cause: seconds.pop(cause) for cause in WAIT_CAUSES}
    seconds["waiting"] = sum(waits.values())
    return Goodput(wall=sum(seconds.values()), waits=waits, **seconds)


def active_spans(states: tuple[tuple[float, str], ...], now: float) -> list[tuple[float, float]]:
    """The periods the job was queued, running or in backoff (a running job's last ends now)."""
    spans: list[tuple[float, float]] = []
    start: float | None = None
    for ts, state in states:
        if state in ACTIVE and start is None:
            start = ts
        elif state not in ACTIVE and start is not None:
            spans.append((start, ts))
            start = None
    if start is not None:
        spans.append((start, max(start, now)))
    return spans


def kept_steps(attempts: tuple[AttemptFacts, ...]) -> list[int | None]:
    """Per attempt, its newest step still in the job's state: its newest commit, unless a later
    attempt restored from an older one (a quarantined commit; a fresh start is step 0)."""
    out: list[int | None] = []
    for i, a in enumerate(attempts):
        newest = max((c.step for c in a.commits), default=None)
        later = [b.restored_step for b in attempts[i + 1 :] if b.restored_step is not None]
        out.append(None if newest is None else min([newest, *later]))
    return out


def _paint(spans: list[tuple[float, float]], intervals: list[Interval]) -> dict[str, float]:
    out = dict.fromkeys((*PARTS, *WAIT_CAUSES), 0.0)
    cuts = sorted({t for span in spans for t in span} | {t for iv in intervals for t in iv[:2]})
    for a, b in itertools.pairwise(cuts):
        mid = (a + b) / 2
        if any(s <= mid < e for s, e in spans):
            out[next((label for s, e, label in intervals if s <= mid < e), "other")] += b - a
    return out


def _waits(facts: JobFacts, spans: list[tuple[float, float]], now: float) -> list[Interval]:
    """Queued: from each active period's start to its first spawn. Backoff: the BACKOFF state;
    after a disk_full attempt it is the wait for space."""
    out: list[Interval] = []
    for start, end in spans:
        out.append(
            (
                start,
                min((a.spawned for a in facts.attempts if start <= a.spawned < end), default=end),
                "queued",
            )
        )
    for (ts, state), (nxt, _) in zip(facts.states, [*facts.states[1:], (now, "")], strict=True):
        if state == JobState.BACKOFF:
            before = [a for a in facts.attempts if a.ended is not None and a.ended <= ts]
            disk = bool(before) and before[-1].klass == AttemptClass.DISK_FULL
            out.append((ts, nxt, "disk_full" if disk else "backoff"))
    return out


def _span_of(spans: list[tuple[float, float]], t: float) -> int:
    return next((i for i, (s, e) in enumerate(spans) if s <= t <= e), -1)


def _attempt_parts(
    facts: JobFacts, spans: list[tuple[float, float]], kept: list[int | None], now: float
) -> list[Interval]:
    out: list[Interval] = []
    rate = _job_rate(facts.attempts)
    prev_end: float | None = None
    for a, k in zip(facts.attempts, kept, strict=True):
        first = prev_end is None or _span_of(spans, prev_end) != _span_of(spans, a.spawned)
        begin = a.spawned if first or prev_end is None else prev_end
        out += _one_attempt(a, begin, "startup" if first else "restart", k, rate, now)
        prev_end = a.ended if a.ended is not None else now
    return out


def _one_attempt(
    a: AttemptFacts, begin: float, lead: str, kept: int | None, job_rate: float | None, now: float
) -> list[Interval]:
    """startup/restart until its first step; then productive up to its kept step; then, if
    steps were lost, recomputed (and hang), else shutdown."""
    end = a.ended if a.ended is not None else now
    if a.training_from is None:
        return [(begin, end, lead)]
    train = min(max(a.training_from, begin), end)
    if a.ended is None:
        return [(begin, train, lead), (train, end, "productive")]
    points = _points(a)
    rate = _rate(points) or job_rate

    def at(step: int | None) -> float:
        return train if step is None else min(max(_time_at(step, points, rate), train), end)

    kept_at = at(kept)
    out = [(begin, train, lead), (train, kept_at, "productive")]
    newest = max((c.step for c in a.commits), default=None)
    if a.klass in NOTHING_LOST and (newest is None or kept == newest):
        return [*out, (kept_at, end, "shutdown")]
    if a.klass != AttemptClass.HANG:
        return [*out, (kept_at, end, "recomputed")]
    progress = max(at(a.last_step), kept_at) if a.last_step is not None else kept_at
    return [*out, (kept_at, progress, "recomputed"), (progress, end, "hang")]


def _points(a: AttemptFacts) -> list[Point]:
    assert a.training_from is not None
    commits = sorted((c.step, c.time) for c in a.commits if c.step >= a.first_step)
    return [(a.first_step, a.training_from), *commits]


def _rate(points: list[Point]) -> float | None:
    """Seconds per step between an attempt's first step and its newest commit."""
    (s0, t0), (s1, t1) = points[0], points[-1]
    return (t1 - t0) / (s1 - s0) if s1 > s0 else None


def _job_rate(attempts: tuple[AttemptFacts, ...]) -> float | None:
    """The job's seconds per step, for an attempt that never committed."""
    known = [_points(a) for a in attempts if a.training_from is not None]
    steps = sum(pts[-1][0] - pts[0][0] for pts in known)
    return sum(pts[-1][1] - pts[0][1] for pts in known) / steps if steps > 0 else None


def _time_at(step: int, points: list[Point], rate: float | None) -> float:
    """When the attempt had trained `step`: interpolated between its known points, extrapolated
    past the newest at `rate` seconds per step."""
    below = [pt for pt in points if pt[0] <= step]
    above = [pt for pt in points if pt[0] > step]
    if not below:
        return points[0][1]
    s0, t0 = below[-1]
    if above:
        s1, t1 = above[0]
        return t0 + (t1 - t0) * (step - s0) / (s1 - s0)
    return t0 + (step - s0) * (rate or 0.0)


def _stall(a: AttemptFacts, kept: int | None, sync: bool) -> float:
    mine = [c for c in a.commits if kept is not None and c.step <= kept]
    blocking = sum(c.seconds for c in mine if c.reason in BLOCKING_SAVES)
    if a.interval_stall is not None and len(mine) == len(a.commits):
        return blocking + a.interval_stall
    return blocking + (sum(c.seconds for c in mine if c.reason not in BLOCKING_SAVES) if sync else 0.0)


# -- the facts, from the store and the worker's events ------------------------------------------


@dataclass
class _Seen:
    """What the worker's events say of one attempt."""

    first_step: tuple[float, int] | None = None
    restored: tuple[float, int] | None = None
    commits: list[Commit] = field(default_factory=list)
    interval_stall: float | None = None


def of_job(store: Store, job_id: str, run_root: Path | None = None, now: float | None = None) -> Goodput:
    return account(gather(store, job_id, run_root), time.time() if now is None else now)


def summary(store: Store, job_id: str, run_root: Path | None = None) -> dict[str, Any]:
    """`Goodput.as_dict` for `ckptd status` and the attempts' exit events. Accounting must never
    stop a supervisor or a status report: what went wrong is reported in its place."""
    try:
        return of_job(store, job_id, run_root).as_dict()
    except Exception as e:
        return {"error": f"goodput not accounted: {type(e).__name__}: {e}"}


def gather(store: Store, job_id: str, run_root: Path | None = None) -> JobFacts:
    job = store.job(job_id)
    seen = worker_events(Path(job.run_dir) if run_root is None else run_root)
    attempts = tuple(_attempt_facts(a, seen.get(a.n, _Seen())) for a in store.attempts(job_id))
    states = tuple(_states(store.events(job_id))) or ((job.created_at, str(job.state)),)
    return JobFacts(states, attempts, spec_from_json(job.spec_json).checkpoint.mode == "sync")


def _states(events: list[dict[str, Any]]) -> Iterator[tuple[float, str]]:
    for e in events:
        with contextlib.suppress(KeyError, TypeError, ValueError):
            data, kind = json.loads(e["data_json"] or "{}"), e["kind"]
            if kind in (p.Event.JOB_CREATED, p.Event.JOB_STATE):
                yield float(e["ts"]), str(JobState(data["state" if kind == p.Event.JOB_CREATED else "to"]))


def worker_events(run_root: Path) -> dict[int, _Seen]:
    """Per attempt: first step, restore, commits, the loop's stall figure. The file is its
    owner's: read without following links, in bounded chunks; a malformed line is skipped."""
    seen: dict[int, _Seen] = {}
    tail = p.EventTail(run_root / p.EVENTS_FILE, root=run_root)
    while True:
        before = tail.offset
        for ev in tail.read():
            with contextlib.suppress(KeyError, TypeError, ValueError):
                _note(seen.setdefault(int(ev["attempt"]), _Seen()), ev)
        if tail.offset == before:
            return seen


def _note(s: _Seen, ev: dict[str, Any]) -> None:
    kind, ts = ev["event"], float(ev["ts"])
    if kind == p.Event.TRAINING_FIRST_STEP and (s.first_step is None or ts < s.first_step[0]):
        s.first_step = (ts, int(ev["step"]))  # a gang's members each say it: the earliest
    elif kind in (p.Event.RESTORE_DONE, p.Event.RESTORE_FRESH) and s.restored is None:
        s.restored = (ts, int(ev.get("step", 0)))
    elif kind == p.Event.CHECKPOINT_COMMITTED:
        s.commits.append(
            Commit(int(ev["step"]), ts, float(ev.get("seconds", 0.0)), str(ev.get("reason", "")))
        )
    elif kind == p.Event.TRAINING_DONE and "stall_seconds" in ev:
        s.interval_stall = float(ev["stall_seconds"])


def _attempt_facts(a: Attempt, s: _Seen) -> AttemptFacts:
    restored = s.restored[1] if s.restored is not None else a.restored_step
    trained = bool(s.commits) or (a.last_step is not None and a.last_step > (restored or 0))
    start: tuple[float, int] | None = s.first_step
    if start is None and s.restored is not None and trained:  # a custom loop: no first-step event
        start = s.restored
    return AttemptFacts(
        spawned=a.started_at,
        ended=a.ended_at,
        klass=str(a.klass) if a.klass is not None else None,
        training_from=start[0] if start is not None else None,
        first_step=start[1] if start is not None else restored or 0,
        restored_step=restored,
        last_step=a.last_step,
        commits=tuple(s.commits),
        interval_stall=s.interval_stall,
    )

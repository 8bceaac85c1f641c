"""What `ckptd status` and `ckptd run` print about a job."""

from __future__ import annotations

import json
import pwd
import time
from pathlib import Path
from typing import Any

import click

from ckptd.state import goodput
from ckptd.state.jobspec import JobSpec, spec_from_json
from ckptd.state.paths import RunDir
from ckptd.state.protocol import Event, Heartbeat, Phase
from ckptd.state.runretention import describe_removal
from ckptd.state.states import JobState
from ckptd.state.store import Attempt, Job, Store
from ckptd.supervisor.policy import silence_limit, suspect


def _ts(t: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t)) if t else None


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def job_report(store: Store, job: Job, detail: bool) -> dict[str, Any]:
    report: dict[str, Any] = {
        "id": job.id,
        "name": job.name,
        "state": str(job.state),
        "reason": job.reason,
        "created_at": _ts(job.created_at),
        "updated_at": _ts(job.updated_at),
        "last_committed_step": job.last_committed_step,
        "run_dir": job.run_dir,
        "job_file": job.job_file,
    }
    attempts = store.attempts(job.id)
    report["attempts"] = len(attempts)
    if job.state == JobState.RUNNING and attempts:
        report["live"] = live(store, job, attempts[-1])
    events = store.events(job.id)
    problems = [
        e
        for e in events
        if e["kind"] in (Event.CHECKPOINT_FAILED, Event.CHECKPOINT_QUARANTINED, Event.CHECKPOINT_COALESCED)
    ]
    if removed := [e for e in events if e["kind"] == Event.RETENTION_REMOVED]:  # daemon/retention_runs.py
        report["retention"] = {"time": _ts(removed[-1]["ts"]), **json.loads(removed[-1]["data_json"] or "{}")}
    report["checkpoint_problems"] = [
        {"time": _ts(e["ts"]), "kind": e["kind"], **json.loads(e["data_json"] or "{}")} for e in problems[-5:]
    ]
    if detail:
        report["attempt_list"] = _attempt_list(store, job.id, attempts)
        report["outputs"] = outputs(job, spec_from_json(job.spec_json))
        # Reads the whole events file: for one job's detail only, never for the list of jobs.
        report["goodput"] = goodput.summary(store, job.id)
    return report


def live(store: Store, job: Job, attempt: Attempt, now: float | None = None) -> dict[str, Any]:
    """A running attempt as its heartbeat shows it: where it is, its last commit, how long it
    has been silent, and whether that is longer than normal for its phase (`suspect`), long
    before the hang verdict."""
    now = time.time() if now is None else now
    run = RunDir(Path(job.run_dir))
    hb = Heartbeat.read(run.heartbeat, run.root)
    tier = 0
    if hb is None or hb.attempt != attempt.n:  # this attempt has not beaten yet: starting
        phase, silent, step, expect = Phase.STARTING, now - attempt.started_at, None, None
    else:
        phase, silent, step, expect = hb.phase, now - hb.time, hb.step, hb.expect_seconds
        tier = hb.memory_tier_bytes
    restart = spec_from_json(job.spec_json).restart
    commits = store.checkpoints(job.id)
    return {
        "attempt": attempt.n,
        "phase": phase,
        "step": step,
        "last_commit_step": commits[-1]["step"] if commits else None,
        "last_commit_age_seconds": round(now - commits[-1]["committed_at"], 1) if commits else None,
        "silent_seconds": round(max(0.0, silent), 1),
        "normal_seconds": expect,
        "hang_verdict_seconds": silence_limit(phase, restart),
        "suspect": suspect(phase, max(0.0, silent), expect, restart),
        "memory_tier_bytes": tier,  # the worker's word (docs/memory-tier.md); 0 without a tier
    }


def describe_live(v: dict[str, Any]) -> str:
    commit = (
        f"last commit step {v['last_commit_step']} {v['last_commit_age_seconds']:.0f} s ago"
        if v["last_commit_step"] is not None
        else "no commit yet"
    )
    line = (
        f"attempt {v['attempt']} {v['phase']} step={v['step']}, {commit}, silent {v['silent_seconds']:.1f} s"
    )
    if v.get("memory_tier_bytes"):  # .get: a daemon older than the memory tier sends none
        line += f", memory tier {v['memory_tier_bytes'] / 2**20:.1f} MiB"
    if v["suspect"]:
        normal = f"{v['normal_seconds']:.0f} s" if v["normal_seconds"] is not None else "a quarter of it"
        verdict = f"hang verdict at {v['hang_verdict_seconds']:.0f} s"
        line += f" — SUSPECT: longer than normal for {v['phase']} ({normal}); {verdict}"
    return line


def _attempt_list(store: Store, job_id: str, attempts: list[Attempt]) -> list[dict[str, Any]]:
    members: dict[int, list[dict[str, Any]]] = {}
    for e in store.events(job_id):
        if e["kind"] == Event.GANG_MEMBER_ENDED:
            m = json.loads(e["data_json"] or "{}")
            members.setdefault(m.get("attempt", 0), []).append(
                {k: m.get(k) for k in ("member", "host", "pid", "exit_class", "root_cause")}
            )
    return [
        {
            "n": a.n,
            "pid": a.pid,
            "started_at": _ts(a.started_at),
            "ended_at": _ts(a.ended_at),
            "class": str(a.klass) if a.klass else None,
            "evidence": a.evidence,
            "exit_code": a.exit_code,
            "signal": a.signal,
            "error": a.error_summary,
            "restored_step": a.restored_step,
            "last_step": a.last_step,
            "steps_done": (None if a.last_step is None else max(0, a.last_step - (a.restored_step or 0))),
            # a multi_worker gang: each member's host and class (the attempt's is the root's)
            "members": members.get(a.n, []),
        }
        for a in attempts
    ]


def print_status(reports: list[dict[str, Any]], detail: bool) -> None:
    if not reports:
        click.echo("no jobs")
    for r in reports:
        step = r["last_committed_step"]
        owner = f"owner={_user(r['owner_uid'])} " if r.get("owner_uid") is not None else ""
        state = r["state"] + (" suspect" if (r.get("live") or {}).get("suspect") else "")
        click.echo(
            f"{r['id']:<40} {state:<12} {owner}attempts={r['attempts']:<3} "
            f"committed_step={'-' if step is None else step}" + (f"  ({r['reason']})" if r["reason"] else "")
        )
        if r.get("live"):
            click.echo(f"  live: {describe_live(r['live'])}")
        if r.get("retention"):
            click.echo(f"  {describe_removal(r['retention'])}")
        for prob in r["checkpoint_problems"]:
            click.echo(
                f"  {prob['kind']} at step {prob.get('step')}: {prob.get('error') or prob.get('reason')}"
            )
        if not detail:
            continue
        for a in r["attempt_list"]:
            click.echo(
                f"  attempt {a['n']}: pid {a['pid']} {a['class'] or 'running'}"
                f" restored_step={a['restored_step']} last_step={a['last_step']}"
                f" — {a['evidence'] or ''}"
            )
            if a["error"]:
                click.echo(f"    error: {a['error']}")
            for m in a["members"]:
                root = "  (root cause)" if m["root_cause"] else ""
                click.echo(f"    member {m['member']} on {m['host']}: pid {m['pid']} {m['exit_class']}{root}")
        if r.get("goodput"):  # a daemon older than goodput sends none
            click.echo(f"  {goodput.describe(r['goodput'])}")
        shown = dict(r["outputs"], best_files=best_files(r["outputs"].get("best_template")))
        click.echo(json.dumps(shown, indent=2))


def outputs(job: Job, spec: JobSpec) -> dict[str, Any]:
    """Where a job's outputs are: paths only. Whoever asks lists them (best_files) with their own
    rights; the daemon never lists a directory on anybody's behalf."""
    run = RunDir(Path(job.run_dir))
    return {
        "run_dir": str(run.root),
        "checkpoints": str(run.checkpoint_dir(spec.checkpoint.dir)),
        "history": str(run.history),
        "best_template": str(run.output_path(spec.best.filepath)) if spec.best else None,
        "logs": str(run.root / "attempts"),
        "events": str(run.root / "events.jsonl"),
    }


def best_files(template: str | None) -> list[str]:
    """The best files written so far from `best.filepath`'s template, oldest first, as far as
    the caller may list its directory."""
    if not template:
        return []
    path = Path(template)
    stem = path.name.split("{", 1)[0]
    try:
        found = [
            p for p in path.parent.iterdir() if (p.name.startswith(stem) if "{" in path.name else p == path)
        ]
        return [str(p) for p in sorted(found, key=lambda p: p.stat().st_mtime_ns)]
    except OSError:
        return []


def print_outputs(job: Job, spec: JobSpec) -> None:
    out = outputs(job, spec)
    out["best_files"] = best_files(out["best_template"])
    click.echo(f"job {job.id}: {job.state}" + (f" ({job.reason})" if job.reason else ""), err=True)
    click.echo(f"  run dir:     {out['run_dir']}", err=True)
    click.echo(f"  checkpoints: {out['checkpoints']}", err=True)
    click.echo(f"  history:     {out['history']}", err=True)
    if out["best_files"]:
        click.echo(
            f"  best:        {out['best_files'][-1]}"
            + (f" (+{len(out['best_files']) - 1} earlier)" if len(out["best_files"]) > 1 else ""),
            err=True,
        )

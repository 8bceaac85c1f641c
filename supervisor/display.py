"""How `ckptd run` shows progress: a rich progress bar on a terminal, JSON log lines otherwise."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from structlog.typing import FilteringBoundLogger

from ckptd.state import protocol as p
from ckptd.state.states import AttemptClass

_QUIET_EVENTS = {p.Event.EPOCH_END}
_WARNING_EVENTS = {p.Event.MEMORY_TIER_REMOVE_FAILED}  # the supervisor's own trouble, not the job's


def _fmt_logs(logs: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in sorted(logs.items()))


class LogDisplay:
    """Structured lines: one per epoch, checkpoint, best file and attempt (never per step)."""

    def __init__(self, log: FilteringBoundLogger) -> None:
        self.log = log

    def heartbeat(self, hb: p.Heartbeat) -> None:
        pass

    def event(self, ev: dict[str, Any]) -> None:
        ev = dict(ev)
        kind = ev.pop("event", "worker.event")
        (self.log.warning if kind in _WARNING_EVENTS else self.log.info)(kind, **ev)

    def attempt_started(self, n: int, pid: int) -> None:
        self.log.info(p.Event.WORKER_SPAWNED, attempt=n, pid=pid)

    def attempt_ended(self, n: int, klass: AttemptClass, evidence: str) -> None:
        level = (
            self.log.info if klass in (AttemptClass.SUCCEEDED, AttemptClass.PREEMPTED) else self.log.warning
        )
        level(p.Event.WORKER_EXITED, attempt=n, exit_class=str(klass), evidence=evidence)

    def restarting(self, delay: float, reason: str) -> None:
        self.log.warning(p.Event.WORKER_RESTARTING, delay_seconds=round(delay, 2), reason=reason)


class BarDisplay:
    """A progress bar (epoch, step, loss, metrics, ETA) with notable events printed above it."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True, log_path=False)
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(),
            TextColumn("step {task.fields[steps]}"),
            TextColumn("{task.fields[metrics]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.task: TaskID | None = None

    def __enter__(self) -> BarDisplay:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def heartbeat(self, hb: p.Heartbeat) -> None:
        total = (hb.steps_per_epoch or 0) * hb.epochs or None
        epoch = min(hb.epoch + 1, hb.epochs or hb.epoch + 1)
        fields: dict[str, Any] = {
            "epoch": epoch,
            "epochs": hb.epochs or "?",
            "steps": f"{hb.step}/{total or '?'}",
            "metrics": _fmt_logs(hb.logs),
        }
        if self.task is None:
            self.task = self.progress.add_task("train", total=total, completed=hb.step, **fields)
        self.progress.update(self.task, total=total, completed=hb.step, **fields)

    def event(self, ev: dict[str, Any]) -> None:
        kind = ev.get("event", "")
        if kind in _QUIET_EVENTS:
            return
        detail = {k: v for k, v in ev.items() if k not in ("event", "metrics", "digest", "logs")}
        self.console.log(f"{kind} " + " ".join(f"{k}={v}" for k, v in detail.items()))

    def attempt_started(self, n: int, pid: int) -> None:
        self.console.log(f"worker started: attempt {n}, pid {pid}")

    def attempt_ended(self, n: int, klass: AttemptClass, evidence: str) -> None:
        self.console.log(f"worker ended: attempt {n}: {klass} ({evidence})")

    def restarting(self, delay: float, reason: str) -> None:
        self.console.log(f"restarting in {delay:.1f}s: {reason}")

"""Engine slurm: a gang attempt is one `srun` step of `nodes` tasks, each task a member worker.

Slurm places the members (sbatch/salloc partitions, node health, its own allocation when srun
runs outside one); `--kill-on-bad-exit` ends every task when one exits badly, which is ckptd's
rule too (the unit of restart is the gang). Each task learns its member index from
SLURM_PROCID and its cluster from TensorFlow's SlurmClusterResolver (ckptd.worker.distribute).
The supervisor reaches the tasks through Slurm: `scancel --signal` for a stop (the chief saves)
and for stack dumps, `scancel` to end them. srun reports, in order, which task ended how; the
first report names the root cause. Members' heartbeats, events and error files are on the
shared file system with the run directory.
"""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ckptd.state import protocol as p
from ckptd.state.paths import RunDir
from ckptd.state.safeopen import read_under
from ckptd.supervisor.attempt import Member
from ckptd.supervisor.gang import free_ports
from ckptd.supervisor.process import ExitStatus, ProcessOps

# "srun: error: node7: task 1: Killed", "srun: error: vm: tasks 0-1: Terminated",
# "srun: error: vm: task 0: Exited with exit code 75"
_REPORT = re.compile(r"srun: error: (?P<host>\S+): tasks? (?P<tasks>[0-9,\-]+): (?P<what>.+)")
_SIGNALS = {"Killed": signal.SIGKILL, "Terminated": signal.SIGTERM, "Aborted": signal.SIGABRT}


def parse_reports(text: str) -> list[tuple[list[int], str, str]]:
    """srun's reports of tasks that ended badly, in the order it wrote them: (tasks, host, what)."""
    out = []
    for m in _REPORT.finditer(text):
        tasks: list[int] = []
        for part in m.group("tasks").split(","):
            low, _, high = part.partition("-")
            tasks += range(int(low), int(high or low) + 1)
        out.append((tasks, m.group("host"), m.group("what").strip()))
    return out


def status_of(what: str) -> ExitStatus:
    """A task's end as srun words it."""
    if m := re.match(r"Exited with exit code (\d+)", what):
        return ExitStatus(int(m.group(1)), None)
    return ExitStatus(None, int(_SIGNALS.get(what.split()[0], signal.SIGKILL)))


def srun_argv(count: int, name: str, extra: list[str], worker: list[str]) -> list[str]:
    return ["srun", f"--ntasks={count}", "--kill-on-bad-exit=1", f"--job-name={name}", *extra, *worker]


@dataclass
class SlurmLaunch:
    ops: ProcessOps
    srun: int  # the srun process: it ends when every task has
    name: str  # the job name scancel finds the step by
    run: RunDir
    log: Path  # srun's own messages
    n: int
    count: int
    _done: bool = False
    _killed: set[int] = field(default_factory=set)

    def ended(self) -> list[tuple[int, ExitStatus, bool]]:
        if self._done or (srun := self.ops.poll(self.srun)) is None:
            return []
        self._done = True
        try:
            text = read_under(self.run.root, self.log, limit=p.MAX_RECORD).decode(errors="replace")
        except OSError:
            text = ""
        out: dict[int, tuple[ExitStatus, bool]] = {}
        for order, (tasks, _host, what) in enumerate(parse_reports(text)):
            for t in tasks:
                # The first report is the cause; later ones are srun ending the others.
                out.setdefault(t, (status_of(what), order == 0 and t not in self._killed))
        for i in range(self.count):  # not reported: it exited 0 (or its exit_code file says)
            if i not in out:
                code = p.read_exit_code(self.run.member(i).attempt_dir(self.n), self.run.root)
                out[i] = (ExitStatus(code if code is not None else srun.exit_code, None), True)
        return [(i, st, own) for i, (st, own) in sorted(out.items())]

    def _scancel(self, *args: str) -> None:
        subprocess.run(
            ["scancel", *args, f"--name={self.name}"], capture_output=True, timeout=30, check=False
        )

    def stop_chief(self) -> None:
        self._scancel("--signal=TERM")  # every task: the others ignore it, the chief saves

    def dump_stacks(self, index: int) -> None:
        self._scancel("--signal=USR1")

    def stopped(self, index: int) -> bool:
        return False  # a remote task's state is not visible from here

    def kill(self, index: int) -> None:
        self._killed.add(index)
        if len(self._killed) == 1:  # one scancel ends the whole step
            self._scancel()


def spawn(
    ops: ProcessOps, run: RunDir, n: int, count: int, worker: list[str], extra: list[str], name: str
) -> tuple[list[Member], SlurmLaunch]:
    """Start attempt `n` as one srun step; srun's own messages go to the chief's attempt
    directory (the owner's, on the shared file system), where the supervisor reads them."""
    adir = run.attempt_dir(n)
    log = adir / "srun.log"
    base = free_ports(1)[0]
    cmd = (
        f"mkdir -p {shlex.quote(str(adir))} && exec "
        + shlex.join(srun_argv(count, name, extra, worker))
        + f" 2>>{shlex.quote(str(log))}"
    )
    env = {p.SLURM_PORT_BASE_ENV: str(base)}
    pid = ops.spawn(["/bin/sh", "-c", cmd], run.root, adir / "stdout.log", adir / "stderr.log", env=env)
    now = ops.monotonic()
    members = [Member(i, pid, run.member(i), last_change=now, host=f"slurm task {i}") for i in range(count)]
    return members, SlurmLaunch(ops, pid, name, run, log, n, count)

"""Starting an attempt's workers, and the devices they run on.

A single worker starts in the job's hot spare (a worker with TensorFlow imported and the model
built, waiting on stdin), else in one of the daemon's warm workers, else forked by the job's fork
server (ckptd.supervisor.zygote), else cold. A gang starts as
K local processes with their TF_CONFIG (engine local) or as one `srun` step (engine slurm,
ckptd.supervisor.slurm). Either way the supervisor gets a `Group` to watch
(ckptd.supervisor.attempt). GPUs are chosen among the healthy ones; a GPU fault excludes some.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

from ckptd.state import protocol as p
from ckptd.state.jobspec import JobSpec, replica_counts
from ckptd.state.paths import RunDir
from ckptd.supervisor import slurm
from ckptd.supervisor.attempt import POLL_SECONDS, Group, LocalGroup, Member
from ckptd.supervisor.gang import free_ports, tf_config
from ckptd.supervisor.gpus import choose_devices, exclude_after_fault
from ckptd.supervisor.process import ProcessOps, worker_argv
from ckptd.supervisor.tier import attempt_limit


class NoDevices(Exception):
    """Not enough healthy GPUs for the job."""


class Launcher:
    """Starts one job's attempts; keeps its hot spare and its healthy GPUs between them."""

    def __init__(
        self,
        ops: ProcessOps,
        run: RunDir,
        spec: JobSpec,
        hot_spare: bool,
        gpus: list[int],
        tier_bytes: Callable[[], int] | None = None,
    ) -> None:
        """`tier_bytes`: the job's memory tier's size now (None: the job has no tier)."""
        self.ops, self.run, self.spec, self.hot_spare = ops, run, spec, hot_spare
        self.tier_bytes = tier_bytes
        self.spare_pid: int | None = None
        self.spare_env: dict[str, str] = {}
        self.gpus, self.excluded_gpus = gpus, set[int]()
        self.devices: list[int] = []  # the current attempt's

    # -- a single worker -------------------------------------------------------------------

    def single(self, n: int, nan_restarts: int) -> tuple[int, p.Event | None]:
        """Start attempt `n`: in the job's hot spare, else in a warm worker, else forked by the
        job's fork server, else cold. Returns the pid and which of these took it, if not cold."""
        env = self._device_env()
        if nan_restarts:  # the worker lowers its learning rate this much
            env[p.NAN_RESTARTS_ENV] = str(nan_restarts)
        limit = self.memory_limit()
        pid = self._take_spare(n, env)
        how = p.Event.WORKER_SPARE_ASSIGNED if pid is not None else None
        if pid is None and (pid := self.ops.take_warm(self.run.root, str(n), env, limit)):
            how = p.Event.WORKER_WARM_ASSIGNED
        if pid is None and (pid := self.ops.fork(self.run.root, str(n), env, limit)):
            how = p.Event.WORKER_FORKED
        if pid is None:
            pid = self._cold(n, env, limit)
        if self.hot_spare:
            self._start_spare(env)
        return pid, how

    def memory_limit(self) -> int | None:
        """An attempt's memory cgroup limit, decided at its launch: the job's limit less what
        its memory tier already holds (ckptd.supervisor.tier.attempt_limit)."""
        tier = self.tier_bytes() if self.tier_bytes is not None else 0
        return attempt_limit(self.spec.resources.memory_limit, tier)

    def _cold(self, n: int | None, env: dict[str, str], limit: int | None) -> int:
        """A cold start: attempt `n`'s worker, or the hot spare (None) waiting for its attempt."""
        logs = self.run.attempt_dir(n) if n is not None else self.run.root / "attempts" / "spare"
        return self.ops.spawn(
            worker_argv(self.run.root, n),
            self.run.root,
            logs / "stdout.log",
            logs / "stderr.log",
            spare=n is None,
            env=env,
            memory_limit=limit,
        )

    def _start_spare(self, env: dict[str, str]) -> None:
        self.spare_env = env
        # Decided at the spare's start, and not changed when it takes its attempt: the tier's
        # growth in between is not subtracted (a known gap, docs/memory-tier.md).
        limit = self.memory_limit()
        self.spare_pid = self.ops.take_warm(self.run.root, "--spare", env, limit)
        if self.spare_pid is None:
            self.spare_pid = self._cold(None, env, limit)

    def _take_spare(self, n: int, env: dict[str, str]) -> int | None:
        pid, self.spare_pid = self.spare_pid, None
        # A spare started on a device that has since been excluded is no use.
        if pid is not None and self.spare_env == env and self.ops.assign(pid, n):
            return pid
        if pid is not None:
            self.spare_pid = pid
            self.drop_spare()
        return None

    def drop_spare(self) -> None:
        if self.spare_pid is None:
            return
        self.ops.signal_group(self.spare_pid, signal.SIGKILL)
        for _ in range(100):  # reap it: no zombie, no orphan
            if self.ops.poll(self.spare_pid) is not None:
                break
            self.ops.sleep(POLL_SECONDS / 5)
        self.spare_pid = None

    def _device_env(self) -> dict[str, str]:
        wanted = self.spec.resources.gpus
        if wanted == 0:
            return {}
        fewest = replica_counts(self.spec)[1]
        chosen = choose_devices(self.gpus, self.excluded_gpus, wanted, fewest)
        if chosen is None:
            raise NoDevices(
                f"resources.gpus={wanted} (fewest {fewest}), but only "
                f"{len(self.gpus) - len(self.excluded_gpus)} healthy GPU(s) "
                f"(found {self.gpus}, excluded {sorted(self.excluded_gpus)})"
            )
        self.devices = chosen
        # nvidia-smi's and NVML's indices are in PCI bus order; CUDA's default order is not.
        return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ",".join(map(str, chosen))}

    def exclude_sick(self, sick: list[int]) -> list[int]:
        """After a GPU fault: exclude the sick devices (NVML names them), else all the attempt's
        (an error message alone only says "one of these"). Returns every excluded device."""
        self.excluded_gpus = exclude_after_fault(
            self.gpus,
            self.excluded_gpus,
            sick or self.devices,
            self.spec.resources.gpus,
            replica_counts(self.spec)[1],
        )
        return sorted(self.excluded_gpus)

    # -- a gang ----------------------------------------------------------------------------

    def gang(self, n: int, job_id: str) -> tuple[list[Member], Group]:
        """Start attempt `n`'s members: one srun step on Slurm, else local processes."""
        count, argv = self.spec.distribute.members, worker_argv(self.run.root, n)
        if self.spec.distribute.on_slurm:
            name = f"ckptd-{job_id}-{n}"
            return slurm.spawn(self.ops, self.run, n, count, argv, self.spec.distribute.slurm_args, name)
        return self._local_gang(n, count, argv, self._gang_devices(count))

    def _gang_devices(self, count: int) -> list[int]:
        """A local gang's GPUs: resources.gpus for each of its members, all healthy."""
        wanted = self.spec.resources.gpus * count
        if wanted == 0:
            return []
        chosen = choose_devices(self.gpus, self.excluded_gpus, wanted)
        if chosen is None:
            raise NoDevices(
                f"resources.gpus={self.spec.resources.gpus} for each of {count} members, but only "
                f"{len(self.gpus) - len(self.excluded_gpus)} healthy GPU(s) here"
            )
        self.devices = chosen
        return chosen

    def _local_gang(self, n: int, count: int, argv: list[str], gpus: list[int]) -> tuple[list[Member], Group]:
        """The local engine: `count` members of attempt `n` on 127.0.0.1, member 0 the chief,
        each with its own share of `gpus` (none: CPU only), forked by the job's fork server
        (else cold)."""
        hosts = [f"127.0.0.1:{port}" for port in free_ports(count)]
        per = len(gpus) // count
        members = []
        for i in range(count):
            env = {p.MEMBER_ENV: str(i), "TF_CONFIG": tf_config(hosts, i)}
            if per:
                env |= {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
                env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus[i * per : (i + 1) * per]))
            adir = self.run.member(i).attempt_dir(n)
            pid = self.ops.fork(self.run.root, str(n), env) or self.ops.spawn(
                argv, self.run.root, adir / "stdout.log", adir / "stderr.log", env=env
            )
            members.append(
                Member(i, pid, self.run.member(i), last_change=self.ops.monotonic(), host=hosts[i])
            )
        return members, LocalGroup(self.ops, [m.pid for m in members])

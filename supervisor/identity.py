"""Whose rights a worker runs with, and how the daemon hands them over.

A daemon that may switch users (root, or CAP_SETUID + CAP_SETGID) starts each worker as the job's
owner: uid, gid and supplementary groups, set in the child between fork and exec. A daemon
without that right runs only its own user's jobs. Going from uid 0 to a non-zero uid clears every
capability (capabilities(7)), so a worker never keeps any of the daemon's; `drop_to` checks that.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path
from typing import Any

from ckptd.state.submissions import Owner

CAP_SETGID, CAP_SETUID = 6, 7
WORKER_UMASK = 0o027  # the run directory's group (the daemon's) reads; others do not


def _capabilities(field: str = "CapEff") -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


def can_switch_users() -> bool:
    caps = _capabilities()
    return os.geteuid() == 0 or bool(caps & (1 << CAP_SETUID) and caps & (1 << CAP_SETGID))


def me() -> Owner:
    return Owner(os.geteuid(), os.getegid(), tuple(sorted(set(os.getgroups()))))


def needs_switch(owner: Owner) -> bool:
    return (owner.uid, owner.gid) != (os.geteuid(), os.getegid())


def popen_kwargs(owner: Owner) -> dict[str, Any]:
    """subprocess.Popen arguments that start the child as `owner` (none if it is us already)."""
    if not needs_switch(owner):
        return {"umask": WORKER_UMASK}
    return {"user": owner.uid, "group": owner.gid, "extra_groups": list(owner.groups), "umask": WORKER_UMASK}


def owner_env(owner: Owner) -> dict[str, str]:
    """HOME, USER and LOGNAME of the owner: Keras and TensorFlow keep caches under ~."""
    if not needs_switch(owner):
        return {}
    try:
        pw = pwd.getpwuid(owner.uid)
    except KeyError:
        return {"HOME": "/", "USER": str(owner.uid), "LOGNAME": str(owner.uid)}
    return {"HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name}


class StillPrivileged(Exception):
    pass


def drop_to(owner: Owner) -> None:
    """Become `owner` for good (a warm worker taking a job): groups, then gid, then uid."""
    if not needs_switch(owner):
        return
    os.setgroups(list(owner.groups))
    os.setresgid(owner.gid, owner.gid, owner.gid)
    os.setresuid(owner.uid, owner.uid, owner.uid)
    if owner.uid != 0 and (_capabilities("CapEff") or _capabilities("CapPrm") or _capabilities("CapAmb")):
        raise StillPrivileged(f"still holding capabilities after switching to uid {owner.uid}")
    os.umask(WORKER_UMASK)
    os.environ.update(owner_env(owner))


def owner_to_json(owner: Owner) -> dict[str, Any]:
    return {"uid": owner.uid, "gid": owner.gid, "groups": list(owner.groups)}


def owner_from_json(data: dict[str, Any]) -> Owner:
    return Owner(int(data["uid"]), int(data["gid"]), tuple(int(g) for g in data["groups"]))

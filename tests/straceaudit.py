"""A small persistence-order checker for strace logs (a mini-ALICE, test plan T04)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

_LINE = re.compile(r"^(?:\d+\s+)?(?P<call>\w+)\((?P<args>.*)\)\s+=\s+(?P<ret>-?\d+)")
_FD_PATH = re.compile(r"^\d+<(?P<path>[^>]*)>")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Op:
    i: int
    call: str
    path: str
    dest: str = ""


_UNFINISHED = " <unfinished ...>"
_RESUMED = re.compile(r"^(?P<pid>\d+)\s+<\.\.\. \w+ resumed>(?P<rest>.*)$")


def _joined(log: str) -> Iterator[str]:
    """strace -f splits a call that another process interrupts into "<unfinished ...>" and
    "<... call resumed>" lines (the async writer process and the worker make calls at once):
    join them, placed where the call returned."""
    pending: dict[str, str] = {}
    for line in log.splitlines():
        if line.endswith(_UNFINISHED):
            pending[line.split(None, 1)[0]] = line[: -len(_UNFINISHED)]
            continue
        m = _RESUMED.match(line)
        if m and m.group("pid") in pending:
            yield pending.pop(m.group("pid")) + m.group("rest")
            continue
        yield line


def parse(log: str) -> list[Op]:
    ops: list[Op] = []
    for line in _joined(log):
        m = _LINE.match(line)
        if not m or m.group("ret").startswith("-"):
            continue
        call, args = m.group("call"), m.group("args")
        if call in ("write", "pwrite64", "fsync", "fdatasync"):
            fd = _FD_PATH.match(args)
            if fd:
                ops.append(Op(len(ops), "write" if "write" in call else "fsync", fd.group("path")))
        elif call.startswith("rename"):
            paths = _QUOTED.findall(args)
            if len(paths) == 2:
                ops.append(Op(len(ops), "rename", paths[0], paths[1]))
        elif call.startswith("unlink"):
            paths = _QUOTED.findall(args)
            if paths:
                ops.append(Op(len(ops), "unlink", paths[-1]))
    return ops


def _number(path: str) -> int | None:
    m = re.search(r"/ckpt-(\d+)[._]", path)
    return int(m.group(1)) if m else None


def manifest_commits(ops: list[Op]) -> list[tuple[Op, int]]:
    """ckptd's commit markers: the rename that puts ckpt-N.manifest.json in place."""
    out = []
    for o in ops:
        m = re.search(r"/ckpt-(\d+)\.manifest\.json$", o.dest) if o.call == "rename" else None
        if m:
            out.append((o, int(m.group(1))))
    return out


def state_file_commits(ops: list[Op]) -> list[tuple[Op, int]]:
    """TF's markers: the first rename onto `checkpoint` after ckpt-N.index was written."""
    out = []
    for n in sorted(
        {
            k
            for o in ops
            if o.call == "write" and (k := _number(o.path)) is not None and o.path.endswith(".index")
        }
    ):
        last = max(o.i for o in ops if o.call == "write" and o.path.endswith(f"/ckpt-{n}.index"))
        marker = next(
            (o for o in ops if o.call == "rename" and o.dest.endswith("/checkpoint") and o.i > last), None
        )
        if marker is not None:
            out.append((marker, n))
    return out


def audit(ops: list[Op], directory: str, commits: list[tuple[Op, int]]) -> list[str]:
    """Violations of: every file of checkpoint N is fsynced after its last write and before N's
    commit marker appears; the directory is fsynced between the last rename into it and the
    marker, and again after the marker; committed files are never written again; old files are
    unlinked only after a newer commit."""
    problems: list[str] = []
    if not commits:
        return ["no commit found in the trace"]
    for marker, n in commits:
        files = {
            o.path
            for o in ops
            if o.call == "write"
            and _number(o.path) == n
            and re.search(r"\.(index|data-\d+-of-\d+)$", o.path)
            and o.i < marker.i
        }
        files |= {
            o.dest
            for o in ops
            if o.call == "rename"
            and _number(o.dest) == n
            and re.search(r"\.(index|data-\d+-of-\d+)$", o.dest)
            and o.i < marker.i
        }
        # Writes under TF's temp names end in a rename onto the final name, checked below.
        files = {f for f in files if "_temp/" not in f and ".tempstate" not in f}
        for f in sorted(files):
            last = max(o.i for o in ops if (o.path == f and o.call == "write") or o.dest == f)
            if not any(o.call == "fsync" and o.path == f and last < o.i < marker.i for o in ops):
                problems.append(f"ckpt-{n}: {f} not fsynced between its last write and the commit")
            if any(o.call == "write" and o.path == f and o.i > marker.i for o in ops):
                problems.append(f"ckpt-{n}: {f} written after the commit")
        renames_in = [
            o.i
            for o in ops
            if o.call == "rename" and _number(o.dest) == n and o.i < marker.i and o is not marker
        ]
        start = max(renames_in, default=-1)
        if not any(o.call == "fsync" and o.path == directory and start < o.i < marker.i for o in ops):
            problems.append(f"ckpt-{n}: directory not fsynced before the commit")
        if not any(o.call == "fsync" and o.path == directory and o.i > marker.i for o in ops):
            problems.append(f"ckpt-{n}: directory not fsynced after the commit")
    first_commit = {n: m.i for m, n in reversed(commits)}
    for o in ops:
        n = _number(o.path)
        if o.call != "unlink" or n is None or "_temp" in o.path:
            continue
        if not any(m > n and i < o.i for m, i in first_commit.items()):
            problems.append(f"{o.path} unlinked before any newer checkpoint was committed")
    return problems

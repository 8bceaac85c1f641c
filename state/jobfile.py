"""Reading a job file: `load_job_file` is the single entry for every command that reads one.
Strict YAML (ckptd.state.yamlstrict), then the strict schema (ckptd.state.jobspec), then path
resolution against the job file's directory and, for the CLI, checks of the paths with the
caller's rights. Every problem becomes one message naming the field path; nothing is recorded
for a rejected file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ckptd.state.jobspec import ENTRY_RE, JobSpec
from ckptd.state.yamlstrict import JobFileError, load_mapping


def _format_validation(source: str, err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see the job file reference, docs/job-files.md)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        given = e.get("input")
        if e["type"] not in ("missing", "extra_forbidden") and isinstance(given, str | int | float):
            msg += f" (got {given!r})"
        out.append(f"{source}: {loc}: {msg}")
    return out


def _resolve_params(value: Any, base: Path) -> Any:
    """Relative path strings in params that name an existing file or directory beside the job file
    become absolute, so a job keeps working from its run directory and after the caller cd's away."""
    if isinstance(value, dict):
        return {k: _resolve_params(v, base) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_params(v, base) for v in value]
    if (
        isinstance(value, str)
        and value
        and not value.startswith("/")
        and "://" not in value
        and "\n" not in value
        and len(value) < 4096
    ):
        try:
            candidate = base / value
            if candidate.exists():
                return str(candidate.resolve())
        except (OSError, ValueError):
            return value
    return value


def resolved_params(spec: JobSpec) -> dict[str, Any]:
    """The params a job's code sees. Called in the worker, which runs with the submitter's rights:
    whether `data.csv` names a file is decided by what the submitter can see, never the daemon."""
    if spec.base_dir is None:  # stored by ckptd 0.2 and earlier: resolved when submitted
        return dict(spec.params)
    return dict(_resolve_params(spec.params, Path(spec.base_dir)))


def _code_path(job_dir: Path, target: str) -> str:
    # Lexical only (no filesystem access): the daemon derives the stored spec from the job file's
    # text with this, and must not probe paths on a submitter's behalf.
    return os.path.normpath(job_dir / target)


def pure_spec(spec: JobSpec, job_dir: Path) -> JobSpec:
    """The spec as stored and run: code paths made absolute against the job file's directory."""
    update: dict[str, Any] = {"base_dir": os.path.normpath(job_dir)}
    if spec.model is not None:
        m = ENTRY_RE.match(spec.model)
        assert m is not None  # checked by the schema
        target, func = m.group("target"), m.group("func")
        if target.endswith(".py") or "/" in target:  # a path (a module name has no "/")
            update["model"] = f"{_code_path(job_dir, target)}:{func}"
    if spec.entrypoint is not None:
        update["entrypoint"] = _code_path(job_dir, spec.entrypoint)
    return spec.model_copy(update=update)


def _writable_parent(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` (itself included), if the caller can write it."""
    for candidate in (path, *path.parents):
        try:
            candidate.stat()
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError:  # a directory on the way that the caller may not search
            return None
        return candidate if os.access(candidate, os.W_OK | os.X_OK) else None
    return None


def _why_unreadable(path: str) -> str:
    try:
        os.stat(path)
    except FileNotFoundError:
        return "does not exist"
    except OSError as e:  # a directory on the way that the caller may not search
        return f"is not reachable by you ({e.strerror})"
    return "is not readable by you"


def check_paths(spec: JobSpec, source: str) -> None:
    """What the submitter's own rights say about the job's paths (the CLI runs this as them; the
    worker meets the same rights at run time, with the same field names in its messages)."""
    problems = []
    for field, text in (("model", spec.model), ("entrypoint", spec.entrypoint)):
        target = text.rsplit(":", 1)[0] if field == "model" and text else text
        if target and "/" in target and os.path.isdir(target):
            problems.append(
                f"{source}: {field}: {target} is a directory; name the Python file "
                "in it" + (", e.g. model.py:build" if field == "model" else "")
            )
        elif target and target.endswith(".py") and not os.access(target, os.R_OK):
            problems.append(f"{source}: {field}: file {target} {_why_unreadable(target)}")
    outputs = [("checkpoint.dir", spec.checkpoint.dir)]
    if spec.best:
        outputs.append(("best.filepath", str(Path(spec.best.filepath).parent)))
    for field, value in outputs:
        if value.startswith("/") and _writable_parent(Path(value)) is None:
            problems.append(
                f"{source}: {field}: {value} is not writable by you (uid "
                f"{os.geteuid()}); choose a directory you can write, or a path "
                "relative to the run directory"
            )
    if problems:
        raise JobFileError(problems)


def parse_job(data: bytes, source: str, job_dir: Path, check: bool = True) -> JobSpec:
    """`check`: also look at the paths with the caller's rights (the CLI; never the daemon)."""
    raw = load_mapping(data, source)
    if "base_dir" in raw:
        raise JobFileError([f"{source}: base_dir: unknown field (set by ckptd, not the job file)"])
    try:
        spec = JobSpec.model_validate(raw, context={"job_file": True})
    except ValidationError as e:
        raise JobFileError(_format_validation(source, e)) from e
    spec = pure_spec(spec, job_dir)
    if check:
        check_paths(spec, source)
    return spec


def _not_a_job_file(p: Path) -> str:
    """What stands at `p` instead of a job file, in the words an operator acts on."""
    if p.is_symlink() and not p.exists():
        return f"a symlink to {os.readlink(p)}, which does not exist"
    if p.is_dir():
        return "is a directory; name the job file (a .yaml file) in it"
    if p.exists():
        return "is not a regular file (a FIFO, socket or device); give a job file"
    return "no such job file"


def load_job_file(path: str | Path) -> tuple[JobSpec, bytes]:
    """Read, parse and validate a job file. Returns the spec to store and the raw bytes."""
    p = Path(path)
    try:
        if not p.is_file():
            raise JobFileError([f"{p}: {_not_a_job_file(p)}"])
        with open(p, "rb") as f:
            data = f.read(1024 * 1024 + 1)
    except OSError as e:
        raise JobFileError([f"{p}: cannot read: {e.strerror}"]) from e
    return parse_job(data, str(p), Path(os.path.abspath(p)).parent), data

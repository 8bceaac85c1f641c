"""The docs stay true: every module is on docs/architecture.md's map (and the map names no module
that is gone), relative links in README.md and docs/*.md resolve (anchors too), the README stays a
front door (≤ 16 000 bytes), and its test command is the one CI runs.

Each check is a small pure helper, first shown to catch a fault planted in a tiny example, then
run on the repository."""

from __future__ import annotations

import re
from pathlib import Path

from .conftest import ROOT

PACKAGES = ("daemon", "supervisor", "state", "worker")
README_LIMIT = 16_000

# A module as the map writes it: `worker/fit/loop.py`, `worker/sub/x.py`. Not preceded by a path
# character, so `ckptd/worker/fit/loop.py` or `tests/worker/x.py` are not read as a module name.
_MODULE = re.compile(r"(?<![\w/.-])(?:" + "|".join(PACKAGES) + r")/(?:\w+/)*\w+\.py\b")
_FENCE = re.compile(r"^\s*(```|~~~)")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_INLINE_CODE = re.compile(r"`[^`]*`")


def modules_under(root: Path) -> set[str]:
    """Every module of the four packages, sub-packages included; `__init__.py` says nothing a
    reader would look up on the map."""
    return {
        p.relative_to(root).as_posix()
        for pkg in PACKAGES
        for p in (root / pkg).rglob("*.py")
        if p.name != "__init__.py"
    }


def modules_named(text: str) -> set[str]:
    return set(_MODULE.findall(text))


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks: a link or heading inside a fence is not one."""
    out: list[str] = []
    fenced = False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: inline markup dropped, lower case, every character
    but letters, digits, `_`, `-` and spaces removed, each space a hyphen."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").replace("*", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor; a repeated one gets -1, -2, … as GitHub numbers them."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in prose_lines(text):
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(text: str) -> list[str]:
    """Link targets in prose (not in code), leaving out web addresses and absolute paths."""
    out: list[str] = []
    for line in prose_lines(text):
        for target in _LINK.findall(_INLINE_CODE.sub("", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("/"):
                continue
            out.append(target)
    return out


def link_problems(page: Path) -> list[str]:
    """Each relative link of `page` that names a missing file, or a heading its page lacks."""
    problems: list[str] = []
    for target in relative_links(page.read_text(encoding="utf-8")):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            problems.append(f"{page.name}: {target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
            problems.append(f"{page.name}: {target}: no such heading")
    return problems


def fenced_block_after(text: str, marker: str) -> str:
    """The first fenced code block after the line holding `marker`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if marker in line)
    block: list[str] = []
    inside = False
    for line in lines[start + 1 :]:
        if _FENCE.match(line):
            if inside:
                return "\n".join(block)
            inside = True
        elif inside:
            block.append(line)
    raise ValueError(f"no fenced block after {marker!r}")


def commands(script: str) -> list[str]:
    """A shell script's simple commands: comments dropped, split at `&&`, `||`, `;` and lines."""
    out: list[str] = []
    for line in script.splitlines():
        if line.lstrip().startswith("#"):
            continue
        line = re.sub(r"\s#.*$", "", line)
        out += [part.strip() for part in re.split(r"&&|\|\||;", line) if part.strip()]
    return out


def pytest_invocation(command: str) -> str:
    """The `python -m pytest …` part of a command line."""
    return next(c for c in commands(command) if " -m pytest" in c)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")


def test_module_map_helpers_catch_a_missing_and_a_stale_module(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "worker/__init__.py": "",
            "worker/fit/loop.py": "",
            "worker/sub/deep.py": "",
            "state/store.py": "",
        },
    )
    on_map = (
        "| 8 | training | `worker/fit/loop.py`, `state/store.py`, `worker/gone.py`; see ckptd/worker/x.py |"
    )
    assert modules_under(tmp_path) == {"worker/fit/loop.py", "worker/sub/deep.py", "state/store.py"}
    assert modules_named(on_map) == {"worker/fit/loop.py", "state/store.py", "worker/gone.py"}
    assert modules_under(tmp_path) - modules_named(on_map) == {"worker/sub/deep.py"}
    assert modules_named(on_map) - modules_under(tmp_path) == {"worker/gone.py"}


def test_slugs_follow_githubs_rules() -> None:
    assert slug("A `model.fit` program") == "a-modelfit-program"
    assert slug("6–8. The worker") == "68-the-worker"
    assert slug("Exact resume: what is checked, what is not") == "exact-resume-what-is-checked-what-is-not"
    assert slug("Several machines (Slurm)") == "several-machines-slurm"
    text = "# Title\n## Notes\n```\n## not a heading\n```\n### Notes\n"
    assert anchors(text) == {"title", "notes", "notes-1"}


def test_link_check_catches_a_missing_file_and_a_missing_heading(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "README.md": "# Top\n## A first job\nSee [guide](docs/guide.md#setup).\n",
            "docs/guide.md": (
                "# Guide\n## Setup\n"
                "[ok](../README.md#a-first-job) [here](#guide) [web](https://example.com/x.md)\n"
                "[gone](gone.md) [bad anchor](../README.md#no-such) `[code](nowhere.md)`\n"
                "```\n[fenced](nowhere.md)\n```\n"
            ),
        },
    )
    assert link_problems(tmp_path / "README.md") == []
    assert link_problems(tmp_path / "docs" / "guide.md") == [
        "guide.md: gone.md: no such file",
        "guide.md: ../README.md#no-such: no such heading",
    ]


def test_pytest_invocation_is_compared_command_for_command() -> None:
    readme = "**Run the tests**:\n\n```sh\npython3 -m venv .venv && .venv/bin/python -m pytest -n 2 -x\n```\n"
    command = fenced_block_after(readme, "**Run the tests**")
    assert pytest_invocation(command) == ".venv/bin/python -m pytest -n 2 -x"
    ci = "# run .venv/bin/python -m pytest -n 2 -x\n.venv/bin/python -m pytest -n 2 -x --lf\n"
    # Only in a comment, or as a prefix of a longer command: not what CI runs.
    assert pytest_invocation(command) not in commands(ci)
    ci += "pip install . && .venv/bin/python -m pytest -n 2 -x\n"
    assert pytest_invocation(command) in commands(ci)


def test_every_module_is_on_the_architecture_map() -> None:
    on_map = modules_named((ROOT / "docs" / "architecture.md").read_text(encoding="utf-8"))
    missing = sorted(modules_under(ROOT) - on_map)
    assert not missing, f"modules not named on docs/architecture.md: {missing}"


def test_the_architecture_map_names_no_missing_module() -> None:
    on_map = modules_named((ROOT / "docs" / "architecture.md").read_text(encoding="utf-8"))
    stale = sorted(on_map - modules_under(ROOT))
    assert not stale, f"docs/architecture.md names modules that do not exist: {stale}"


def test_relative_links_resolve() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) > 5
    problems = [p for page in pages for p in link_problems(page)]
    assert not problems, "\n".join(problems)


def test_the_readme_is_a_front_door() -> None:
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes: move reference text to docs/"


def test_ci_runs_the_readmes_test_command() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    invocation = pytest_invocation(fenced_block_after(readme, "**Run the tests**"))
    ci = commands((ROOT / ".ci" / "run").read_text(encoding="utf-8"))
    assert invocation in ci, f"{invocation!r} is not among .ci/run's commands: {ci}"

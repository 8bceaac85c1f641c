"""The kill-point sweep's matrix as Markdown (docs/porting.md), from the JSON lines that
`CKPTD_SWEEP_REPORT=FILE pytest -m conformance tests/test_killsweep.py` appends (later lines of a
cell replace earlier ones: a re-run after a fix).

    python bench/sweep_matrix.py FILE...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.test_killsweep import MOMENTS, ROUTES

VARIANTS = ("KILL-divides", "KILL-nondiv", "TERM-divides", "TERM-nondiv")


def cells(paths: list[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                out[row["cell"]] = row
    return out


def entry(found: dict[str, dict[str, str]], route: str, moment: str) -> str:
    rows = [found.get(f"{route}-{moment}-{v}") for v in VARIANTS]
    if all(r is None for r in rows):
        return "n/a"
    marks = []
    for r in rows:
        if r is None:
            marks.append("·")
        elif r["outcome"] == "identical":
            marks.append("=")
        elif r["outcome"].startswith("named"):
            marks.append("N")
        else:
            marks.append("✗")
    return " ".join(marks)


def main() -> None:
    found = cells(sys.argv[1:])
    print("| route | " + " | ".join(m.replace("_", " ") for m in MOMENTS) + " |")
    print("| --- " * (len(MOMENTS) + 1) + "|")
    for route in ROUTES:
        print(f"| {route} | " + " | ".join(entry(found, route, m) for m in MOMENTS) + " |")
    seeds = sorted({str(r["seed"]) for r in found.values()})
    print(f"\n{len(found)} cells; seed(s) {', '.join(seeds)}")


if __name__ == "__main__":
    main()

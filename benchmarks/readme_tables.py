"""The README's quickstart tables, made from the quickstart's report.json by the code
that writes report.md (without its wall-time column, which depends on the machine).

    dba-ray run examples/quickstart.yaml
    python benchmarks/readme_tables.py                # rewrite them in README.md
    python benchmarks/readme_tables.py --check        # exit 1 if README.md's differ

``--check`` compares the text word by word and the numbers within one unit of their
last printed digit (a rounding that flips on float noise), so the README cannot quote
numbers the code no longer produces.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from dba_ray.report import markdown

ROOT = Path(__file__).resolve().parents[1]
BEGIN = "<!-- quickstart tables: benchmarks/readme_tables.py writes from here -->"
END = "<!-- quickstart tables: to here -->"
NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")


def tables(report: dict) -> str:
    return markdown(report, wall_times=False).strip() + "\n"


def between_markers(readme: str) -> tuple[int, int]:
    """Where the generated text starts and ends in ``readme``."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"README.md has no {BEGIN!r} ... {END!r} block")
    return start + len(BEGIN) + 1, end


def differences(want: str, have: str) -> list[str]:
    """What differs between two texts beyond float noise: their words apart from
    numbers, then each number against one unit of its last printed digit."""
    if NUMBER.sub("#", want) != NUMBER.sub("#", have):
        return ["the text around the numbers differs (rows, columns or words)"]
    out = []
    for w, h in zip(NUMBER.findall(want), NUMBER.findall(have)):
        decimals = len(w.split(".")[1]) if "." in w else 0
        a, b = float(w.replace(",", "")), float(h.replace(",", ""))
        if abs(a - b) > 1.01 * 10**-decimals:
            out.append(f"README has {h}, report.json gives {w}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", nargs="?", default="runs/quickstart/report.json")
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    ap.add_argument("--check", action="store_true", help="compare instead of rewriting; exit 1 on a difference")
    args = ap.parse_args()
    want = tables(json.loads(Path(args.report).read_text()))
    readme = Path(args.readme).read_text()
    start, end = between_markers(readme)
    if args.check:
        found = differences(want, readme[start:end])
        for line in found:
            print(f"readme_tables: {line}", file=sys.stderr)
        if found:
            print("readme_tables: run `python benchmarks/readme_tables.py` to update README.md", file=sys.stderr)
        return 1 if found else 0
    Path(args.readme).write_text(readme[:start] + want + readme[end:])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fail when a notebook under the given folders carries outputs or execution counts.

Chapters are committed stripped: the book build and nbval execute them, and outputs in git
would make diffs unreadable and hide whether the committed code still produces them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def dirty_cells(path: Path) -> list[int]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    return [
        i
        for i, cell in enumerate(nb["cells"])
        if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]


def main(folders: list[str]) -> int:
    notebooks = sorted(p for f in folders for p in Path(f).rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    bad = {p: cells for p in notebooks if (cells := dirty_cells(p))}
    for p, cells in bad.items():
        print(f"{p}: outputs or execution counts in code cells {cells}; run `make strip`")
    if not notebooks:
        print("check_notebooks: no notebooks found", file=sys.stderr)
        return 1
    print(f"check_notebooks: {len(notebooks) - len(bad)}/{len(notebooks)} notebooks clean")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["nbs"]))

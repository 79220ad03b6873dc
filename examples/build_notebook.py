"""Build examples/steering.ipynb from examples/tutorial_steering.py (the lesson's one source).

    python examples/build_notebook.py            # rewrite the notebook (no outputs)
    python examples/build_notebook.py --check    # exit 1 if the notebook is out of date

The script is in the "percent" layout: ``# %%`` starts a code cell, ``# %% [markdown]`` a
Markdown cell (its lines without the leading ``# ``), ``# %% tags=["parameters"]`` the
cell whose settings a runner may replace (papermill's convention). Tests execute the
notebook (tests/test_notebook.py), so it is kept free of outputs here.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "tutorial_steering.py"
NOTEBOOK = HERE / "steering.ipynb"


def _cell(kind: str, lines: list[str], tags: list[str], n: int) -> dict[str, Any]:
    while lines and not lines[-1].strip():
        lines.pop()
    while lines and not lines[0].strip():
        lines.pop(0)
    if kind == "markdown":
        lines = [line[2:] if line.startswith("# ") else line.lstrip("#") for line in lines]
    source = [line + "\n" for line in lines]
    if source:
        source[-1] = source[-1].rstrip("\n")
    cell: dict[str, Any] = {
        "cell_type": kind,
        "id": f"cell-{n:02d}",
        "metadata": {"tags": tags} if tags else {},
        "source": source,
    }
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


def cells_of(text: str) -> list[dict[str, Any]]:
    """The notebook cells of a percent-layout script."""
    cells: list[dict[str, Any]] = []
    kind, tags, lines = None, [], []
    for line in text.splitlines():
        if line.startswith("# %%"):
            if kind is not None:
                cells.append(_cell(kind, lines, tags, len(cells)))
            head = line[4:].strip()
            kind = "markdown" if head.startswith("[markdown]") else "code"
            tags = json.loads(head.split("=", 1)[1]) if head.startswith("tags=") else []
            lines = []
        elif kind is not None:
            lines.append(line)
    if kind is not None:
        cells.append(_cell(kind, lines, tags, len(cells)))
    return cells


def build() -> str:
    """The notebook's JSON text."""
    nb = {
        "cells": cells_of(SOURCE.read_text(encoding="utf-8")),
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="only check the notebook is current")
    args = ap.parse_args()
    text = build()
    if args.check:
        current = NOTEBOOK.read_text(encoding="utf-8") if NOTEBOOK.is_file() else ""
        if current != text:
            print(f"{NOTEBOOK} is out of date: run python examples/build_notebook.py")
            return 1
        return 0
    NOTEBOOK.write_text(text, encoding="utf-8")
    print(f"wrote {NOTEBOOK}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

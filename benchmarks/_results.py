"""The benchmarks' results files: one JSON per run plan, a cache of computed cells.

A rerun loads the file, refuses one written for another setup, and computes only what it lacks;
the file is rewritten after every cell, so a long plan can be stopped and resumed.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def load_or_start(out: Path, setup: str, empty: dict) -> dict:
    """The results in ``out`` (exit if they are another setup's), or ``{"setup": setup, **empty}``."""
    if not out.exists():
        return {"setup": setup, **empty}
    previous = json.loads(out.read_text())
    if previous["setup"] != setup:
        sys.exit(f"{out} holds another setup ({previous['setup']}); pass --out")
    return previous


def save(out: Path, results: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


def mean_sd(values: list[float]) -> str:
    """``"mean ± sd"`` of a cell over seeds, ``(n=k)`` where fewer than 3; empty for none."""
    if not values:
        return ""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    n = "" if len(values) >= 3 else f" (n={len(values)})"
    return f"{statistics.mean(values):.1f} ± {sd:.1f}{n}"

"""The error along the stream, from a results file (matplotlib, written as a PNG).

One panel per (data, model, backend, bits, setting); in each, one line per method row: its error
on each visit of a domain, in stream order (a stream of several rounds visits each domain once a
round), averaged over seeds, with the mean over domains in the legend. Cells without per-batch
records (``measure.per_batch: false``) are drawn from their per-domain errors.
"""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path
from typing import Any

from .measure import stream_errors
from .results import Results
from .tables import _Index, _unique, refused


def _visits(cell: dict[str, Any]) -> list[tuple[str, float]]:
    """``(label, error %)`` of each domain visit of ``cell``, in stream order."""
    if cell.get("per_batch"):
        visits = stream_errors(tuple(b) for b in cell["per_batch"])
        several = len({r for r, _, _ in visits}) > 1
        return [(f"{d} ({r + 1})" if several else d, e) for r, d, e in visits]
    return list(cell.get("errors", {}).items())


def plot(results: Results, path: str | os.PathLike[str], *, max_panels: int = 12) -> Path:
    """Draw ``results`` to ``path`` (PNG); return the path. At most ``max_panels`` panels (the
    first ones in grid order; the title says when some were left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = _Index(results)
    index.cells = [c for c in index.cells if not refused(c)]  # no error to draw
    groups = index.groups("data", "model", "backend", "bits", "setting", "batch")
    if not groups:
        raise ValueError("the results hold no cell to plot")
    shown = groups[:max_panels]
    cols = min(2, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 3.8 * rows), squeeze=False)
    for ax, (data, model, backend, bits, setting, batch) in zip(axes.flat, shown, strict=False):
        cells = index.where(
            data=data, model=model, backend=backend, bits=bits, setting=setting, batch=batch
        )
        ticks: list[str] = []
        for label in _unique(c["row"] for c in cells):
            runs = [_visits(c) for c in cells if c["row"] == label]
            n = min(len(r) for r in runs)
            ys = [statistics.mean(r[i][1] for r in runs) for i in range(n)]
            ticks = ticks if len(ticks) >= n else [runs[0][i][0] for i in range(n)]
            mean = statistics.mean(c["error"] for c in cells if c["row"] == label)
            seeds = len(runs)
            ax.plot(
                range(n), ys, marker="o", ms=2.5, lw=1.2, label=f"{label} ({mean:.1f}; n={seeds})"
            )
        step = max(1, len(ticks) // 30)
        ax.set_xticks(range(0, len(ticks), step))
        ax.set_xticklabels([t.replace("_", " ") for t in ticks[::step]], rotation=70, fontsize=6)
        ax.set_ylabel("error (%)")
        where = f"{backend} {str(bits).upper()}" + (
            f" · batch {batch}" if batch is not None else ""
        )
        ax.set_title(f"{setting} · {data} · {model} · {where}", fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(shown) :]:
        ax.set_visible(False)
    title = f"{results.name}: error per domain along the stream (mean over seeds)"
    if len(groups) > len(shown):
        title += f"; first {len(shown)} of {len(groups)} panels"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


__all__ = ["plot"]

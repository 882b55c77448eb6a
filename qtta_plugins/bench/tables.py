"""Paper-style tables of a results file, as Markdown (rendered by :mod:`tabulate`).

* **summary**, per (data, model, setting): one row per method row (``<reconstruction> +
  <method>`` when the grid has several reconstructions), one column per backend and bit-width;
  each cell the mean error over domains as mean ± sd over seeds, marked ``(n=k)`` when fewer than
  3 seeds, and the time per batch as a ratio to plain inference (mean over seeds);
* **domains**, per (data, model, backend, bits, setting): the error on each domain in stream order
  and their mean, mean ± sd over seeds;
* **paired**, per (data, model, setting): for each ``tables.paired`` pair ``[a, b]``, the
  difference ``error(a) - error(b)`` taken seed by seed (the same stream), then its mean ± sd,
  and the per-seed differences;
* **rounds**, for streams of several rounds (the ``long`` setting): the mean error in each round,
  and whether the row collapsed (:func:`collapse_verdict`).

Standard deviations are the sample's (``statistics.stdev``); one seed shows ± 0.0 and ``(n=1)``.
Where the batch size is a grid axis, each backend and bit-width column is one per batch size
(``torchao W8A8 · batch 1``). A cell whose method refused the batch size (a ``refused`` record:
no error) shows ``refused`` where it has no figure, and is left out of every mean and difference.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .results import Results

TABLES = ("summary", "domains", "paired", "rounds")


@dataclass
class Table:
    """A titled table: ``headers`` and ``rows`` of strings."""

    title: str
    headers: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        from tabulate import tabulate

        body = tabulate(self.rows, self.headers, tablefmt="github", disable_numparse=True)
        return f"{self.title}\n\n{body}\n"


def mean_sd(values: Sequence[float], digits: int = 1) -> str:
    """``"mean ± sd"`` over seeds, with ``(n=k)`` where fewer than 3; empty for none."""
    if not values:
        return ""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    mark = "" if len(values) >= 3 else f" (n={len(values)})"
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}{mark}"


def signed_mean_sd(values: Sequence[float], digits: int = 1) -> str:
    """A paired difference: ``"+1.2 ± 0.3 (n=2): +1.0, +1.4"`` (the per-seed values last)."""
    if not values:
        return ""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    mark = "" if len(values) >= 3 else f" (n={len(values)})"
    each = ", ".join(f"{v:+.{digits}f}" for v in values)
    return f"{statistics.mean(values):+.{digits}f} ± {sd:.{digits}f}{mark}: {each}"


def _unique(values: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def row_label(cell: dict[str, Any], several_reconstructions: bool) -> str:
    """A cell's row: its method row, after its reconstruction when the grid has several."""
    if several_reconstructions:
        return f"{cell['reconstruct']} + {cell['method']}"
    return str(cell["method"])


def column_label(cell: dict[str, Any]) -> str:
    """A cell's column: its backend and bit-width, and its batch size where that is an axis."""
    label = f"{cell['backend']} {str(cell['bits']).upper()}"
    return label + (f" · batch {cell['batch']}" if cell.get("batch") is not None else "")


def refused(cell: dict[str, Any]) -> bool:
    """Whether ``cell`` is a method's refusal of its batch size (no error figure)."""
    return bool(cell.get("refused"))


def _figure(cells: list[dict[str, Any]], values: list[float], digits: int) -> str:
    """``mean_sd`` of ``values``; ``refused`` where there are none and a cell refused."""
    if not values and any(refused(c) for c in cells):
        return "refused"
    return mean_sd(values, digits)


class _Index:
    """The cells of a results file by their labels."""

    def __init__(self, results: Results) -> None:
        several = len(_unique(c["reconstruct"] for c in results.cells)) > 1
        # shallow copies with their row label (and batch: None where it is not an axis): the
        # results' own cells stay as they are
        self.cells = [
            {**c, "row": row_label(c, several), "batch": c.get("batch")} for c in results.cells
        ]

    def groups(self, *axes: str) -> list[tuple[Any, ...]]:
        return _unique(tuple(c[a] for a in axes) for c in self.cells)

    def where(self, **labels: Any) -> list[dict[str, Any]]:
        return [c for c in self.cells if all(c[k] == v for k, v in labels.items())]


def _digits(results: Results) -> int:
    return int(results.config.get("tables", {}).get("digits", 1))


def _group_title(setting: str, data: str, model: str) -> str:
    return f"**{setting}** · data {data} · model {model}"


def summary(results: Results) -> list[Table]:
    index, digits = _Index(results), _digits(results)
    tables = []
    for data, model, setting in index.groups("data", "model", "setting"):
        cells = index.where(data=data, model=model, setting=setting)
        columns = _unique(column_label(c) for c in cells)
        rows = []
        for label in _unique(c["row"] for c in cells):
            row = [label]
            for col in columns:
                these = [c for c in cells if c["row"] == label and column_label(c) == col]
                errors = [c["error"] for c in these if not refused(c)]
                ratios = [c["time_ratio"] for c in these if c.get("time_ratio") is not None]
                text = _figure(these, errors, digits)
                if ratios:
                    text += f" · {statistics.mean(ratios):.1f}x"
                row.append(text)
            rows.append(row)
        title = (
            f"{_group_title(setting, data, model)}: mean error % over domains (mean ± sd over "
            "seeds; (n=k): fewer than 3 seeds) · time per batch as a ratio to plain inference "
            "of the same quantized model (paired per batch; mean over seeds)"
        )
        tables.append(Table(title, ["row", *columns], rows))
    return tables


def domains(results: Results) -> list[Table]:
    index, digits = _Index(results), _digits(results)
    tables = []
    for data, model, backend, bits, setting, batch in index.groups(
        "data", "model", "backend", "bits", "setting", "batch"
    ):
        cells = index.where(
            data=data, model=model, backend=backend, bits=bits, setting=setting, batch=batch
        )
        names = _unique(d for c in cells for d in c.get("errors", {}))
        rows = []
        for label in _unique(c["row"] for c in cells):
            these = [c for c in cells if c["row"] == label]
            row = [label]
            for d in names:
                row.append(
                    _figure(
                        these, [c["errors"][d] for c in these if d in c.get("errors", {})], digits
                    )
                )
            row.append(_figure(these, [c["error"] for c in these if not refused(c)], digits))
            rows.append(row)
        where = f"{backend} {str(bits).upper()}" + (
            f" · batch {batch}" if batch is not None else ""
        )
        title = (
            f"{_group_title(setting, data, model)} · {where}: error % per "
            "domain in stream order, and their mean (mean ± sd over seeds)"
        )
        tables.append(Table(title, ["row", *names, "mean"], rows))
    return tables


def paired_differences(cells: list[dict[str, Any]], a: str, b: str) -> list[float]:
    """``error(a) - error(b)`` for each seed that has both rows (seed order; refused cells have
    no error and are left out)."""
    by = {(c["row"], c["seed"]): c["error"] for c in cells if not refused(c)}
    seeds = sorted({c["seed"] for c in cells})
    return [by[(a, s)] - by[(b, s)] for s in seeds if (a, s) in by and (b, s) in by]


def paired(results: Results) -> list[Table]:
    pairs = results.config.get("tables", {}).get("paired", [])
    if not pairs:
        return []
    index, digits = _Index(results), _digits(results)
    tables = []
    for data, model, setting in index.groups("data", "model", "setting"):
        cells = index.where(data=data, model=model, setting=setting)
        columns = _unique(column_label(c) for c in cells)
        rows = []
        for pair in pairs:
            a, b = pair[0], pair[1]
            note = pair[2] if len(pair) > 2 else ""
            values = [
                signed_mean_sd(
                    paired_differences([c for c in cells if column_label(c) == col], a, b), digits
                )
                for col in columns
            ]
            if any(values):
                rows.append([f"{a} - {b}", note, *values])
        if rows:
            title = (
                f"{_group_title(setting, data, model)}: error difference in points, paired seed "
                "by seed (mean ± sd over seeds, then each seed's)"
            )
            tables.append(Table(title, ["difference", "note", *columns], rows))
    return tables


def collapse_verdict(errors: Sequence[float], source: Sequence[float] | None) -> str:
    """Whether a row collapsed over the rounds of a long stream, and from which round.

    ``collapsed``: from the first round whose error is above the ``source`` row's in that round
    (adapting then does worse than not adapting); ``degrades``: its error rises more than 2
    points above its best round and is still so in the last round; otherwise ``stable``.
    """
    e = list(errors)
    worse = [r for r, x in enumerate(e) if source is not None and r < len(source) and x > source[r]]
    best = min(range(len(e)), key=e.__getitem__)
    # a lasting rise: the last round more than 2 points above the best one
    rising = [r for r in range(best + 1, len(e)) if e[r] > e[best] + 2.0]
    if worse:
        return f"collapsed: above source from round {worse[0] + 1}"
    if rising and e[-1] > e[best] + 2.0:
        return f"degrades: > 2 points above its best round ({best + 1}) from round {rising[0] + 1}"
    return "stable"


def rounds(results: Results) -> list[Table]:
    index, digits = _Index(results), _digits(results)
    cells = [c for c in index.cells if c.get("round_errors")]
    if not cells:
        return []
    tables = []
    for data, model, setting in _unique((c["data"], c["model"], c["setting"]) for c in cells):
        these = [
            c for c in cells if (c["data"], c["model"], c["setting"]) == (data, model, setting)
        ]
        source = {
            (column_label(c), c["seed"]): c["round_errors"] for c in these if c["row"] == "source"
        }
        n = max(len(c["round_errors"]) for c in these)
        rows = []
        for c in these:
            e = c["round_errors"]
            verdict = (
                ""
                if c["row"] == "source"
                else collapse_verdict(e, source.get((column_label(c), c["seed"])))
            )
            rows.append(
                [
                    column_label(c),
                    c["row"],
                    str(c["seed"]),
                    *[f"{x:.{digits}f}" for x in e],
                    *[""] * (n - len(e)),
                    f"{e[-1] - e[0]:+.{digits}f}",
                    verdict,
                ]
            )
        title = (
            f"{_group_title(setting, data, model)}: mean error % in each round (verdict against "
            "the source row of the same config and seed, where there is one)"
        )
        headers = ["config", "row", "seed", *[str(r + 1) for r in range(n)], "last - first"]
        tables.append(Table(title, [*headers, "verdict"], rows))
    return tables


def markdown(results: Results, which: Sequence[str] = TABLES) -> str:
    """The tables ``which`` of ``results`` as one Markdown text, under the results' name."""
    unknown = [w for w in which if w not in TABLES]
    if unknown:
        raise ValueError(f"unknown table(s) {unknown}; tables: {', '.join(TABLES)}")
    makers = {"summary": summary, "domains": domains, "paired": paired, "rounds": rounds}
    parts = [f"# {results.name}", ""]
    if results.description:
        parts += [results.description.strip(), ""]
    for name in which:
        for table in makers[name](results):
            parts += [table.markdown()]
    return "\n".join(parts)


__all__ = [
    "TABLES",
    "Table",
    "collapse_verdict",
    "domains",
    "markdown",
    "mean_sd",
    "paired",
    "paired_differences",
    "refused",
    "rounds",
    "signed_mean_sd",
    "summary",
]

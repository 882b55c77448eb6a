"""Running a config's grid: the cells to compute, in sequence or on Ray, into the cache and a
results file.

:func:`plan` expands the grid and looks each cell up in the cache; :func:`run` computes the
missing ones (:func:`qtta_plugins.bench.runner.run_cell`, one after another in this process by
default; with ``ray`` one Ray task each, :mod:`qtta_plugins.bench.ray_runner`), writing each to
the cache as it finishes, and returns (and writes) the results of the whole grid. A run stopped
partway keeps every finished cell; the next run computes only the rest, and a run of a grid
already computed computes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..progress import show_progress
from . import runner
from .cache import CellCache
from .config import Bench
from .grid import Cell, cell_key, cell_spec, expand
from .results import Results


@dataclass
class Planned:
    """A cell of the grid with its spec, cache key and whether the cache holds it."""

    cell: Cell
    spec: dict[str, Any]
    key: str
    cached: bool


def plan(bench: Bench, cache: CellCache | None = None) -> list[Planned]:
    """Every cell of ``bench`` in run order, looked up in ``cache`` (default: the config's)."""
    cache = cache or CellCache(bench.config.cache)
    out = []
    for cell in expand(bench):
        spec = cell_spec(bench, cell)
        key = cell_key(spec)
        out.append(Planned(cell, spec, key, key in cache))
    return out


def missing_files(bench: Bench) -> list[str]:
    """The files and folders a config names that are not there (a ``--dry-run`` lists them; a
    run would stop at the first, naming it)."""
    out = []
    for m in bench.models:
        if m.weights and not Path(m.weights).is_file():
            out.append(f"model {m.name!r}: weights file {m.weights} does not exist")
    for d in [*bench.data, bench.config.calibration]:
        what = f"data {d.name!r}" if hasattr(d, "name") else "calibration"
        for key in ("root", "image_list"):
            value = getattr(d, key, None)
            if value and not os.path.exists(value):
                out.append(f"{what}: {key} {value} does not exist")
    return out


def default_out(bench: Bench) -> Path | None:
    """The results file: the config's ``out`` (``""``: none), else ``<name>.results.json`` here."""
    if bench.config.out == "":
        return None
    if bench.config.out:
        return Path(bench.config.out).expanduser()
    return Path(f"{bench.config.name}.results.json")


def collect(bench: Bench, planned: list[Planned], cache: CellCache) -> Results:
    """The results of the cells the cache holds, in grid order, labelled as this config names
    them (a cached cell may have been computed under another row name)."""
    cells = []
    for p in planned:
        record = cache.get(p.key)
        if record is not None:
            cells.append({**record, **p.cell.labels(), "key": p.key})
    return Results(bench.config.name, bench.as_dict(), cells, description=bench.config.description)


def run(
    bench: Bench,
    *,
    out: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
    ray: str | None = None,
    echo: Callable[[str], None] | None = None,
) -> Results:
    """Compute every cell of ``bench`` the cache lacks, then write and return the results.

    ``out``: the results file (default :func:`default_out`; ``""`` writes none). ``ray``: a Ray
    address (``"local"`` starts a Ray instance here; ``"auto"`` joins the cluster this machine is
    part of) to run the cells on, one task each; default the config's ``ray.address``, else here
    in sequence. ``progress``: a bar over the cells (default: on a terminal, unless
    ``QTTA_QUIET``). ``echo``: called with one line per computed cell.

    The results file is written when the run ends, and also when it stops on an error or an
    interruption (with the cells finished so far); the cache has each cell as it finishes.
    """
    config = bench.config
    if config.threads is not None:
        import torch

        torch.set_num_threads(config.threads)
    cache = CellCache(config.cache)
    planned = plan(bench, cache)
    todo = [p for p in planned if not p.cached]
    address = ray if ray is not None else config.ray.address
    from ..plugins import available_backends

    absent = sorted({p.cell.backend for p in todo} - set(available_backends()))
    if absent and not address:  # on Ray, the nodes' installs are what count
        raise ValueError(
            f"the grid has cells on backend(s) {', '.join(absent)}, not installed here: pip "
            f"install 'qtta-plugins[{','.join(absent)}]', or override backends=[...]"
        )
    if todo and config.device.startswith("cuda") and not address:
        import torch

        if not torch.cuda.is_available():
            raise ValueError(
                f"the config asks for device {config.device!r}, but torch sees no CUDA device "
                "here: run it where there is one (or on Ray, --ray ADDRESS), or override device=cpu"
            )
    out_path = default_out(bench) if out is None else (Path(out) if out else None)
    if todo and address:
        from .ray_runner import import_ray

        import_ray()  # a missing extra is an error before anything runs (or is written)
    try:
        if todo and address:
            from .ray_runner import run_cells

            run_cells(bench, todo, cache, address, progress=progress, echo=echo)
        elif todo:
            _run_here(bench, todo, cache, len(planned), progress, echo)
    finally:
        results = collect(bench, planned, cache)
        if out_path is not None:
            results.save(out_path)
    return results


def _run_here(
    bench: Bench,
    todo: list[Planned],
    cache: CellCache,
    total: int,
    progress: bool | None,
    echo: Callable[[str], None] | None,
) -> None:
    bar = tqdm(
        total=total,
        initial=total - len(todo),
        desc=f"qtta bench {bench.config.name}",
        unit="cell",
        disable=not show_progress(progress),
    )
    try:
        for p in todo:
            bar.set_postfix_str(str(p.cell), refresh=False)
            # through the module attribute: a test (or a profiler) can wrap it
            record = runner.run_cell(bench, p.cell, p.spec)
            cache.put(p.key, record)
            bar.update()
            if echo is not None:
                echo(describe(p.cell, record))
    finally:
        bar.close()


def describe(cell: Cell, record: dict[str, Any]) -> str:
    """One line for a computed cell: its labels, error, time ratio, memory and seconds (a
    refused cell: the error class that refused it)."""
    if record.get("refused"):
        return f"{cell}  refused ({record['refused']['error']})  ({record['seconds']:.1f} s)"
    ratio = record.get("time_ratio")
    mem = record.get("peak_extra_mb")
    return (
        f"{cell}  error {record['error']:5.1f}%"
        + (f"  time x{ratio:5.2f}" if ratio is not None else "")
        + (f"  mem +{mem:.0f} MB" if mem is not None else "")
        + f"  ({record['seconds']:.1f} s)"
    )


__all__ = ["Planned", "collect", "default_out", "describe", "missing_files", "plan", "run"]

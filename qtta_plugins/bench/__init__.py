"""``qtta bench``: one harness for every benchmark, from a config file.

A YAML config (:mod:`.config`) names the data (any :func:`qtta_plugins.data.make_stream` source,
in memory or on disk), the model (trained here or loaded from a local checkpoint), backends x
bits, reconstructions, methods with their options, stream settings, seeds, batch size and device.
The grid of independent cells it spans (:mod:`.grid`) runs one cell at a time here or one Ray
task each (:mod:`.ray_runner`); each cell is cached under a key of everything that determines it
(:mod:`.cache`), so a stopped run resumes and a rerun computes nothing. Results go to one JSON
format (:mod:`.results`), rendered as paper-style Markdown tables (:mod:`.tables`) and plots
(:mod:`.plots`). Time per batch is measured one way, as a ratio to plain inference of the same
quantized model paired batch by batch; peak memory without a polling thread (:mod:`.measure`).

.. code-block:: python

    from qtta_plugins import bench

    config = bench.load_config("benchmarks/configs/smoke.yaml", ["seeds=[0,1]"])
    results = bench.run(config, out="smoke.json")
    print(bench.markdown(results))

The same from the shell: ``qtta bench benchmarks/configs/smoke.yaml seeds=[0,1] --render``.
Needs the ``bench`` extra (OmegaConf, tabulate); Ray the ``ray`` extra.
"""

from __future__ import annotations

from .cache import CellCache
from .config import Bench, BenchConfig, BenchConfigError, load_config
from .grid import Cell, cell_key, cell_spec, expand
from .harness import Planned, collect, default_out, missing_files, plan, run
from .measure import PeakMemory, run_row
from .plots import plot
from .results import Results, merge
from .tables import markdown

__all__ = [
    "Bench",
    "BenchConfig",
    "BenchConfigError",
    "Cell",
    "CellCache",
    "PeakMemory",
    "Planned",
    "Results",
    "cell_key",
    "cell_spec",
    "collect",
    "default_out",
    "expand",
    "load_config",
    "markdown",
    "merge",
    "missing_files",
    "plan",
    "plot",
    "run",
    "run_row",
]

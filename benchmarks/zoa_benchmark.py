"""Removed: ZOA's Fashion-MNIST-C benchmark is ``benchmarks/configs/zoa_benchmark.yaml``
(``qtta bench benchmarks/configs/zoa_benchmark.yaml --render``); the script that wrote
``benchmarks/results/zoa.json`` is ``git show a26e102:benchmarks/zoa_benchmark.py``.

This module stays only as the import that ``baselines.py``, ``architectures.py`` and
``foa_fidelity.py`` still make (``from zoa_benchmark import run_row, round_errors``): both are the
harness's (``qtta_plugins.bench.measure``). Delete it once they import that module directly.
"""

from __future__ import annotations

from collections.abc import Iterable

from qtta_plugins.bench.measure import round_errors as _round_errors
from qtta_plugins.bench.measure import run_row


def round_errors(per_batch: Iterable[tuple[int, str, int, int]], rounds: int | None = None):
    """Mean over domains of the error (%) in each round (``rounds`` is not needed: the records
    say which round each batch is in)."""
    return _round_errors(per_batch)


__all__ = ["round_errors", "run_row"]

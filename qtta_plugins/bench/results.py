"""One results format for every benchmark: a JSON file of the config and its cells.

.. code-block:: text

    {
      "format": "qtta-bench-results/1",
      "name": "...", "description": "...",
      "config": {... the validated config ...},
      "created": "2026-12-06T10:00:00+00:00",
      "cells": [
        {"data": ..., "model": ..., "backend": ..., "bits": "w4a4", "reconstruct": ..., "method": ...,
         "setting": ..., "seed": 0, "key": "<cache key>",
         "error": 31.2, "errors": {"gaussian_noise": 40.1, ...}, "round_errors": null | [...],
         "time_ratio": 2.1, "total_time_ratio": 2.0, "passes_per_batch": 2.0,
         "step_seconds": ..., "plain_seconds": ..., "peak_extra_mb": 12.5, "peak_mb": ...,
         "memory_method": "VmHWM", "batches": 30, "images": 960, "restarts": 0,
         "predictions_sha256": "...", "predictions": [...] (optional),
         "per_batch": [[round, domain, wrong, n], ...] (optional),
         "reconstruct_seconds": null | s, "adapt_seconds": s, "seconds": s,
         "environment": {"device": "cpu", "threads": 2, ...}, "spec": {... what determines it ...}},
        ...
      ]
    }

A cell whose method refused the batch size (:class:`qtta_plugins.SmallBatchError`) has
``"error": null``, ``"errors": {}`` and ``"refused": {"error": "SmallBatchError", "message":
"..."}`` (its labels, spec, times and environment as any cell's); where the batch size is a grid
axis every cell also has a ``"batch"`` label.

Errors are in percent. ``time_ratio`` is the median adaptation step over the median plain
inference of the same quantized model, paired batch by batch (:mod:`qtta_plugins.bench.measure`).
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cache import write_json_atomic
from .grid import AXES

FORMAT = "qtta-bench-results/1"


@dataclass
class Results:
    """A results file in memory: ``cells`` are records as above, in grid order."""

    name: str
    config: dict[str, Any]
    cells: list[dict[str, Any]] = field(default_factory=list)
    description: str = ""
    created: str = field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        )
    )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "name": self.name,
            "description": self.description,
            "created": self.created,
            "config": self.config,
            "cells": self.cells,
        }

    @classmethod
    def from_dict(cls, payload: dict[str, Any], where: str = "results") -> Results:
        """Read a results dict; a file of another format is an error naming it."""
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
            raise ValueError(
                f"{where} is not a qtta bench results file (format {found!r}, expected {FORMAT!r})"
            )
        cells = payload.get("cells", [])
        for i, c in enumerate(cells):
            missing = [a for a in (*AXES, "error") if a not in c]
            if missing:
                raise ValueError(f"{where}: cell {i} lacks {', '.join(missing)}")
        return cls(
            name=payload.get("name", ""),
            config=payload.get("config", {}),
            cells=cells,
            description=payload.get("description", ""),
            created=payload.get("created", ""),
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the file whole or not at all (a temporary file, then a rename)."""
        out = Path(path)
        write_json_atomic(out, self.to_dict())
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Results:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"results file {path} does not exist")
        try:
            payload = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"{path} is not JSON: {err}") from None
        return cls.from_dict(payload, str(path))

    def select(self, **labels: Any) -> list[dict[str, Any]]:
        """The cells whose labels equal ``labels`` (e.g. ``method="tent", seed=0``)."""
        return [c for c in self.cells if all(c.get(k) == v for k, v in labels.items())]


def merge(results: list[Results]) -> Results:
    """Several results files as one (parts of a grid run apart): their cells, the first one's
    name and config; a cell two files share (same key) is kept once."""
    if not results:
        raise ValueError("no results to merge")
    seen: set[str] = set()
    cells = []
    for r in results:
        for c in r.cells:
            key = c.get("key") or json.dumps([c.get(a) for a in AXES])
            if key not in seen:
                seen.add(key)
                cells.append(c)
    first = results[0]
    return Results(first.name, first.config, cells, first.description, first.created)


__all__ = ["FORMAT", "Results", "merge"]

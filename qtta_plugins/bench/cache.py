"""The harness's cache: one JSON file per computed cell, named by the cell's key.

A cell is written when it finishes, through a temporary file in the same folder and
:func:`os.replace`, so that a stopped run leaves only whole cells, and two processes filling the
same cache (a second local run, Ray's driver) never read half a file. A rerun looks each cell up
by its key (:func:`qtta_plugins.bench.grid.cell_key`) and computes only the missing ones.

Default folder: ``<cache_dir()>/bench`` (``$QTTA_CACHE_DIR`` or ``~/.cache/qtta-plugins``), where
the source models and corrupted sets are cached too; a config's ``cache:`` key names another.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def default_cache_dir() -> Path:
    from ..data import cache_dir

    return Path(cache_dir()) / "bench"


def write_json_atomic(path: Path, payload: Any) -> None:
    """``payload`` as JSON at ``path``, written whole or not at all (a temporary file in the same
    folder, then :func:`os.replace`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide a shared cache from others
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1, allow_nan=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_results_or_start(path: Path, setup: str, key: str) -> dict[str, Any]:
    """A script's results file at ``path`` to resume (exit if it holds another ``setup``), or a new
    ``{"setup": setup, key: []}``: a rerun computes only what the file lacks."""
    if not path.exists():
        return {"setup": setup, key: []}
    previous = json.loads(path.read_text())
    if previous["setup"] != setup:
        raise SystemExit(f"{path} holds another setup ({previous['setup']}); pass --out")
    return previous


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class CellCache:
    """Cells by key under ``folder`` (``cells/<key[:2]>/<key>.json``: a few hundred files per
    folder at most, for grids of tens of thousands of cells)."""

    def __init__(self, folder: str | os.PathLike[str] | None = None) -> None:
        self.folder = Path(folder).expanduser() if folder is not None else default_cache_dir()

    def path(self, key: str) -> Path:
        return self.folder / "cells" / key[:2] / f"{key}.json"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def get(self, key: str) -> dict[str, Any] | None:
        """The cached record of ``key``, or ``None`` (also for a file that does not parse: it is
        computed again rather than trusted)."""
        path = self.path(key)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and record.get("key") == key else None

    def put(self, key: str, record: dict[str, Any]) -> None:
        write_json_atomic(self.path(key), {**record, "key": key})

    def models_dir(self) -> Path:
        """Where reconstructed models are kept (their state dicts, keyed like the cells)."""
        return self.folder / "models"


__all__ = ["CellCache", "default_cache_dir", "load_results_or_start", "write_json_atomic"]

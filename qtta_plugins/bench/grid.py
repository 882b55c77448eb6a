"""A config's grid: its independent cells, and the key that says what each one computes.

A cell is one adaptation run: data x model x backend x bits x reconstruction x method (with its
options) x setting x seed, and x batch size when ``batch_size`` is a list (then, and only then, a
cell carries a ``batch`` label: a config of one batch size has the cells and keys it had before
the axis existed). Without a ``plan`` the cells are the product of the config's axes; a
``plan`` is a list of blocks, each a product over the axes it names (the others: all of the
config's), and the grid is their union in block order (a cell two blocks share runs once).

:func:`cell_spec` resolves a cell into everything that determines its result (the data's files
and options, the model's spec and a digest of its weights file, the calibration, the quantization,
the reconstruction and method configs with every default filled in, the versions of this package,
torch and the backend); :func:`cell_key` is the digest of that, the cell's name in the cache. Row
names are labels, not part of the key: renaming a row finds its cells again.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

from .config import SCHEMA_VERSION, Bench

AXES = ("data", "model", "backend", "bits", "reconstruct", "method", "setting", "seed")
"""A cell's coordinates, in the order the tables and the results list them."""

OPTIONAL_AXES = ("batch",)
"""Coordinates a cell has only in some grids: ``batch`` where the batch size is a grid axis."""


@dataclass(frozen=True, order=True)
class Cell:
    """One cell of the grid: names of its data, model, reconstruction and method rows, the
    backend, the bit-width (lower case, ``w4a4``), the stream setting and the seed; ``batch``,
    the batch size, where it is a grid axis (``None``: the config's one ``batch_size``)."""

    data: str
    model: str
    backend: str
    bits: str
    reconstruct: str
    method: str
    setting: str
    seed: int
    batch: int | None = None

    def labels(self) -> dict[str, Any]:
        labels = {a: getattr(self, a) for a in AXES}
        if self.batch is not None:
            labels["batch"] = self.batch
        return labels

    def __str__(self) -> str:
        return (
            f"{self.data} | {self.model} | {self.backend} {self.bits.upper()} | "
            f"{self.reconstruct} + {self.method} | {self.setting} | seed {self.seed}"
            + (f" | batch {self.batch}" if self.batch is not None else "")
        )


def expand(bench: Bench) -> list[Cell]:
    """The cells of ``bench``, in run order: those that share a quantized model together (model,
    backend, bits, seed, reconstruction outermost), so that a run builds each model once."""
    config = bench.config
    full = {
        "data": [d.name for d in bench.data],
        "model": [m.name for m in bench.models],
        "backends": list(config.backends),
        "bits": [str(b).lower() for b in config.bits],
        "reconstruct": list(bench.reconstruct),
        "methods": list(bench.methods),
        "settings": list(config.settings),
        "seeds": list(config.seeds),
        "batch_size": bench.batch_sizes() if bench.batch_axis else [None],
    }
    blocks = config.plan or [{}]
    cells: dict[Cell, None] = {}
    for block in blocks:
        axes = {**full, **{k: list(v) for k, v in block.items()}}
        axes["bits"] = [str(b).lower() for b in axes["bits"]]
        for cell in _product(axes):
            cells.setdefault(cell, None)
    return list(cells)


def _product(axes: dict[str, list[Any]]) -> Iterator[Cell]:
    for model in axes["model"]:
        for backend in axes["backends"]:
            for bits in axes["bits"]:
                for seed in axes["seeds"]:
                    for rec in axes["reconstruct"]:
                        for data in axes["data"]:
                            for batch in axes["batch_size"]:
                                for setting in axes["settings"]:
                                    for method in axes["methods"]:
                                        yield Cell(
                                            data,
                                            model,
                                            backend,
                                            bits,
                                            rec,
                                            method,
                                            setting,
                                            int(seed),
                                            None if batch is None else int(batch),
                                        )


# --------------------------------------------------------------------------------------------
# what a cell computes
# --------------------------------------------------------------------------------------------


def cell_spec(bench: Bench, cell: Cell) -> dict[str, Any]:
    """Everything that determines ``cell``'s result, as plain data (see the module doc)."""
    config = bench.config
    data = asdict(bench.data_spec(cell.data))
    data.pop("name")
    data.pop("num_workers")  # how many processes decode the images changes no image
    if data["split_seed"] is None:  # the default: the keys of configs without it stay as they were
        data.pop("split_seed")
    model = asdict(bench.model_spec(cell.model))
    model.pop("name")
    model["weights_sha256"] = file_digest(model["weights"]) if model["weights"] else None
    if Path(model["spec"]).is_file():  # a whole pickled module
        model["spec_sha256"] = file_digest(model["spec"])
    if ":" in model["spec"] or Path(model["spec"]).is_file():
        model.pop("train")  # loaded, not trained
    calibration = asdict(config.calibration)
    if calibration["draw"] == "seeded":
        calibration["seed"] = cell.seed
    return {
        "schema": SCHEMA_VERSION,
        "versions": versions(cell.backend),
        "data": data,
        "model": model,
        "calibration": calibration,
        "quantize": quantize_spec(cell.backend, cell.bits, config.quantize),
        "reconstruct": reconstruct_spec(bench, cell),
        "method": method_spec(bench, cell),
        "setting": cell.setting,
        "seed": cell.seed,
        "batch_size": cell_batch_size(bench, cell),
        "device": config.device,
        "measure": asdict(config.measure),
    }


def quantize_spec(backend: str, bits: str, options: dict[str, Any]) -> dict[str, Any]:
    """The quantize options of a cell's key. ``act_ranges`` is named only where it changes what
    is computed from what cells computed before it existed: below 8 bit ``"search"`` (the
    default) or another rule is named; ``"percentile"`` (what every activation below 8 bit had
    before) never is, so the cells computed then keep their keys."""
    from ..config import QuantConfig, parse_bits

    spec = {"backend": backend, "bits": bits, **options}
    w, a = parse_bits(bits)
    config = QuantConfig(backend=backend, weight_bits=w, act_bits=a, **options)
    spec.pop("act_ranges", None)
    if config.applies_act_ranges:
        spec["act_ranges"] = config.act_ranges
    return spec


def cell_batch_size(bench: Bench, cell: Cell) -> int:
    """The batch size of ``cell``'s stream: its ``batch`` label, else the config's one."""
    return cell.batch if cell.batch is not None else int(bench.config.batch_size)


def reconstruct_spec(bench: Bench, cell: Cell) -> dict[str, Any] | None:
    """The reconstruction's config with its defaults (``seed``: the cell's unless given)."""
    row = bench.reconstruct[cell.reconstruct]
    if row.method is None:
        return None
    from ..plugins import available_methods

    options = {"seed": cell.seed, **row.options}
    config = available_methods("reconstruct")[row.method].config_cls(method=row.method, **options)
    return _plain(config)


def method_config(bench: Bench, cell: Cell) -> Any:
    """The adaptation method's config object of ``cell`` (``seed``: the row's own, else the
    config's ``method_seed``, else the cell's seed)."""
    from ..plugins import available_methods

    row = bench.methods[cell.method]
    seed = bench.config.method_seed if bench.config.method_seed is not None else cell.seed
    options = {"seed": seed, **row.options}
    return available_methods("adapt")[row.method].config_cls(method=row.method, **options)


def method_spec(bench: Bench, cell: Cell) -> dict[str, Any]:
    row = bench.methods[cell.method]
    spec = {"config": _plain(method_config(bench, cell)), "reset_every": row.reset_every}
    if row.window is not None:  # only then: the keys of rows without a window stay as they were
        # 16 and {length: 16}: one key; the default statistics as they resolve today, so that a
        # change of the default computes such cells afresh
        from ..window import DEFAULT_STATISTICS

        window = asdict(row.window_config())
        window["statistics"] = window["statistics"] or DEFAULT_STATISTICS
        spec["window"] = window
    guard = row.guard_config()
    if guard is not None:  # likewise: rows without a guard keep their keys
        spec["guard"] = asdict(guard)  # true and {window: 256, drop: 0.5}: one key
    return spec


def _plain(config: Any) -> dict[str, Any]:
    """A method config's fields as JSON-able data (an embedded config, such as ``abl``'s
    ``ABLConfig``, as its own fields; another object option by its type's name)."""
    out: dict[str, Any] = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value) and not isinstance(value, type):
            out[f.name] = _plain(value)
            continue
        out[f.name] = (
            value
            if value is None or isinstance(value, str | int | float | bool | list | dict | tuple)
            else f"<{type(value).__name__}>"
        )
    return out


def cell_key(spec: dict[str, Any]) -> str:
    """The cache key of a cell spec: SHA-256 of its canonical JSON (sorted keys), 24 hex digits."""
    text = json.dumps(spec, sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_digest(path: str) -> str:
    """SHA-256 of a file's bytes (memoised by path, size and mtime: a checkpoint is read once per
    process); ``"missing"`` for a file that is not there (a ``--dry-run`` of a config whose
    checkpoint is still to be filled in lists its cells; running one names the missing file)."""
    try:
        stat = os.stat(path)
    except OSError:
        return "missing"
    return _digest(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


def versions(backend: str) -> dict[str, str]:
    """This package's, torch's and the backend's versions: a new release may compute differently."""
    from .. import __version__

    out = {"qtta_plugins": __version__}
    for dist in ("torch", backend):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


__all__ = [
    "AXES",
    "OPTIONAL_AXES",
    "Cell",
    "cell_batch_size",
    "cell_key",
    "cell_spec",
    "expand",
    "file_digest",
    "method_config",
]

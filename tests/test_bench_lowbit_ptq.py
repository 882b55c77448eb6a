"""benchmarks/configs/lowbit_ptq_bncnn.yaml (benchmarks/lowbit_ptq.py's plan, whose cache of
reconstructed models, benchmarks/_ptq.py, was tested here before as tests/test_lowbit_ptq_report.py):
a cell of the config as shipped, its reconstruction shortened to 2 iterations; the reconstruction
kept on disk gives the same model when the cell is computed again from an empty cell cache and
empty memos."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("omegaconf")
pytest.importorskip("torchao")

from qtta_plugins import bench
from qtta_plugins.bench import runner

torch.set_num_threads(1)
CONFIG = Path(__file__).resolve().parent.parent / "benchmarks" / "configs" / "lowbit_ptq_bncnn.yaml"


def test_a_kept_reconstruction_is_the_same_model(tmp_path):
    overrides = [
        "reconstruct.qdrop.iters=2",
        "calibration.n=128",
        "plan=[{backends: [torchao], bits: [w2a4], reconstruct: [qdrop], seeds: [1]}]",
        f"cache={tmp_path / 'cache'}",
        "out=''",
    ]
    config = bench.load_config(CONFIG, overrides)
    (cell,) = bench.expand(config)
    assert (cell.data, cell.method, cell.reconstruct) == ("clean", "source", "qdrop")
    spec = bench.cell_spec(config, cell)
    assert spec["data"]["split_seed"] == 0 and spec["calibration"]["seed"] == 1
    first = bench.run(config, progress=False).cells[0]
    assert first["reconstruct_seconds"] > 0 and first["images"] == 500
    models = list((tmp_path / "cache" / "models").glob("*.pt"))
    assert len(models) == 1
    # computed again: no cell cached, no model in memory, the reconstruction read from disk
    for path in (tmp_path / "cache" / "cells").rglob("*.json"):
        path.unlink()
    runner.clear_memos()
    again = bench.run(config, progress=False).cells[0]
    assert again["reconstruct_seconds"] is None
    assert again["predictions_sha256"] == first["predictions_sha256"]
    assert again["error"] == first["error"]

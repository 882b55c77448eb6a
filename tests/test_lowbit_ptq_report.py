"""benchmarks/lowbit_ptq.py's plot, and its cache of reconstructed models (benchmarks/_ptq.py) on a
small untrained CNN. (The TTAQ benchmark's report, tested here before, is the harness's now:
tests/test_bench_ttaq_configs.py.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _ptq


def test_a_cached_reconstruction_is_the_same_model(tmp_path, monkeypatch):
    pytest.importorskip("torchao")
    monkeypatch.setenv("QTTA_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    # a small untrained model: the cache's job is the round trip, not the accuracy
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 10),
    ).eval()
    calib = _ptq.calibration(torch.rand(128, 1, 16, 16), 64, seed=0)
    first, cached = _ptq.ptq_model(model, "toy", "torchao", "w4a4", calib, "qdrop", seed=0, iters=5)
    assert not cached
    assert len(list((tmp_path / "ptq").glob("*.pt"))) == 1
    again, cached = _ptq.ptq_model(model, "toy", "torchao", "w4a4", calib, "qdrop", seed=0, iters=5)
    assert cached
    x = torch.rand(8, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(first(x), again(x))
    # another seed (or other calibration images) is another entry
    _ptq.ptq_model(model, "toy", "torchao", "w4a4", calib, "qdrop", seed=1, iters=5)
    assert len(list((tmp_path / "ptq").glob("*.pt"))) == 2


def test_the_lowbit_plot_draws_one_panel_per_file(tmp_path):
    import lowbit_ptq

    def results(acc: float) -> dict:
        rows = [
            {"backend": b, "bits": bits, "ptq": p, "seed": s, "clean_accuracy": acc + s}
            for b in ("brevitas", "nncf", "torchao")
            for bits, p in (("W4A4", "min-max"), ("W2A4", "min-max"), ("W2A4", "qdrop"))
            for s in (0, 1, 2)
        ]
        return {"setup": "m; x", "float_clean_accuracy": 90.0, "rows": rows}

    path = tmp_path / "lowbit.png"
    fig = lowbit_ptq.plot({"a": results(80.0), "b": results(60.0)}, str(path))
    assert [ax.get_title() for ax in fig.axes] == ["a", "b"]
    assert len(fig.axes[0].patches) == 3 * 3  # backends x (bits, ptq) groups
    assert fig.axes[0].get_xticklabels()[0].get_text() == "W4A4\nmin-max"
    assert path.stat().st_size > 0

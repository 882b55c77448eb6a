"""The TTAQ benchmark's report (benchmarks/ttaq_benchmark.py) on synthetic cells, and the benchmarks'
cache of reconstructed models (benchmarks/_ptq.py) on the small digits CNN."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _ptq
import ttaq_benchmark

SETUP = "resnet18 on fashion-mnist; synthetic"


def row(name: str, seed: int, error: float, stream: str = "iid", backend: str = "torchao") -> dict:
    return {
        "backend": backend,
        "bits": "W2A4",
        "row": name,
        "stream": stream,
        "seed": seed,
        "mean_error": error,
        "errors": {"mean": error},
    }


def results(rows: list[dict], ptq: list[dict] | None = None) -> dict:
    return {"setup": SETUP, "float_clean_accuracy": 88.0, "ptq": ptq or [], "rows": rows}


def test_the_target_is_paired_seed_by_seed():
    # TTAQ + Tent + ABL is 3.5 points below QDrop + Tent on every seed; the seeds differ by 10
    rows = [row("BRECQ/QDrop + Tent", s, 40.0 + 10 * s) for s in range(3)]
    rows += [row("TTAQ + Tent + ABL", s, 36.5 + 10 * s) for s in range(3)]
    diffs = ttaq_benchmark.paired(results(rows), "TTAQ + Tent + ABL", "BRECQ/QDrop + Tent")
    assert diffs == {("torchao", "W2A4", "iid"): pytest.approx([-3.5, -3.5, -3.5])}
    # a seed one row lacks is left out of the pairs
    rows.append(row("TTAQ + Tent + ABL", 3, 0.0))
    diffs = ttaq_benchmark.paired(results(rows), "TTAQ + Tent + ABL", "BRECQ/QDrop + Tent")
    assert len(diffs[("torchao", "W2A4", "iid")]) == 3


def test_the_tables_give_mean_and_sd_and_flag_short_cells():
    rows = [row("BRECQ/QDrop + Tent", s, e) for s, e in enumerate([40.0, 42.0, 44.0])]
    rows += [row("TTAQ + Tent + ABL", s, e) for s, e in enumerate([37.0, 38.0, 42.0])]
    rows.append(row("TTAQ -PEM + Tent + ABL", 0, 37.5, "dirichlet"))
    ptq = [
        {"backend": "torchao", "bits": "W2A4", "ptq": "qdrop", "seed": s, "clean_accuracy": a}
        for s, a in enumerate([84.0, 84.5, 83.5])
    ]
    text = ttaq_benchmark.markdown(results(rows, ptq))
    assert "| torchao | W2A4 | qdrop | 84.0 ± 0.5 |" in text
    assert "| torchao | W2A4 | BRECQ/QDrop + Tent | 42.0 ± 2.0 |  |" in text
    # the target's paired differences: -3, -4, -2
    assert "| target: TTAQ + Tent + ABL - QDrop + Tent | torchao | W2A4 | -3.0 ± 1.0 |  |" in text
    assert "| TTAQ -PEM + Tent + ABL |  | 37.5 ± 0.0 (n=1) |" in text


def test_parts_merge_and_another_setup_is_refused():
    a = results([row("TTAQ + Tent", 0, 40.0, backend="torchao")])
    b = results([row("TTAQ + Tent", 0, 45.0, backend="nncf"), row("TTAQ + Tent", 0, 1.0)])
    merged = ttaq_benchmark.merge([a, b])
    # the torchao cell is the first file's
    assert sorted((r["backend"], r["mean_error"]) for r in merged["rows"]) == [
        ("nncf", 45.0),
        ("torchao", 40.0),
    ]
    with pytest.raises(SystemExit, match="another setup"):
        ttaq_benchmark.merge([a, {**b, "setup": "bncnn"}])


def test_old_files_without_seeds_render():
    old = results([row("TTAQ + Tent", 0, 40.0)])
    del old["rows"][0]["seed"]
    assert "| torchao | W2A4 | TTAQ + Tent | 40.0 ± 0.0 (n=1) |" in ttaq_benchmark.markdown(old)


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


def test_headroom_is_measured_against_w8a8_with_the_same_adaptation():
    rows = [row("BRECQ/QDrop + Tent", s, 35.0 + s) for s in range(3)]
    rows += [{**row("min-max + Tent", s, 33.0 + s), "bits": "W8A8"} for s in range(3)]
    # another adaptation at W8A8 is not the reference
    rows += [{**row("min-max + no adaptation", s, 50.0), "bits": "W8A8"} for s in range(3)]
    room = ttaq_benchmark.headroom(results(rows))
    assert room == {("BRECQ/QDrop + Tent", "torchao", "W2A4"): {"iid": pytest.approx([2.0] * 3)}}
    assert "| BRECQ/QDrop + Tent | torchao | W2A4 | 2.0 ± 0.0 |  |" in ttaq_benchmark.markdown(
        results(rows)
    )


def test_files_of_other_iterations_merge_only_for_other_bit_widths():
    w2 = {**results([row("TTAQ + Tent", 0, 40.0)]), "setup": "m; calib, 200 iterations per block"}
    w4 = {
        **results([{**row("TTAQ + Tent", 0, 30.0), "bits": "W4A4"}]),
        "setup": "m; calib, 50 iterations per block",
    }
    merged = ttaq_benchmark.merge([w2, w4])
    assert merged["setup"] == "m; calib; iterations per block: W2A4 200, W4A4 50"
    assert len(merged["rows"]) == 2
    w2_again = {**w2, "setup": "m; calib, 50 iterations per block"}
    with pytest.raises(SystemExit, match="W2A4 is in files of 200 and 50"):
        ttaq_benchmark.merge([w2, w2_again])
    with pytest.raises(SystemExit, match="another setup"):
        ttaq_benchmark.merge([w2, {**w4, "setup": "other; calib, 50 iterations per block"}])


def test_the_plot_draws_every_bit_width_and_stream(tmp_path):
    rows = []
    for bits in ("W2A4", "W4A4"):
        for stream in ("iid", "dirichlet"):
            for name in ("min-max + Tent", "BRECQ/QDrop + Tent", "TTAQ + Tent + ABL"):
                rows += [{**row(name, s, 30.0 + s, stream), "bits": bits} for s in range(3)]
            # not drawn: its 80% must not stretch the panel
            rows += [{**row("TTAQ + no adaptation", 0, 80.0, stream), "bits": bits}]
    path = tmp_path / "ttaq.png"
    fig = ttaq_benchmark.plot(results(rows), str(path))
    assert path.stat().st_size > 10_000
    assert len(fig.axes) == 4
    for ax in fig.axes:
        low, high = ax.get_ylim()
        assert low < 30.0 and 32.0 < high < 40.0, ax.get_title()


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

"""The RTF-Q benchmark's report (benchmarks/rtfq_benchmark.py) on synthetic runs: targets as
paired differences over seeds, merging with the first, single-seed files."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import rtfq_benchmark as rb

NAMES = {  # subnet -> MACs
    "x0.5-24px-W4A4": 10.0,
    "x0.5-32px-W6A6": 30.0,
    "x1-32px-W8A8": 100.0,
}


def bank(shift: float) -> dict:
    return {
        "seconds": 1.0,
        "rows": [
            {"name": n, "macs": m, "bitops": m, "bytes": m, "accuracy": 80.0 + shift}
            for n, m in NAMES.items()
        ],
    }


def run(seed: int, offset: float, task: str = "mnist->digits") -> dict:
    """A seed whose every figure moves by ``offset``: paired differences do not see it."""
    return {
        "task": task,
        "seed": seed,
        "source_only": 10.0,
        "float_uda": 81.0 + offset,
        "rows": [{"kind": "separate", "name": "x0.5-24px-W4A4", "accuracy": 40.0 + offset}],
        "distilled": [{"kind": "distilled", "name": "x0.5-24px-W4A4", "accuracy": 79.0 + offset}],
        "banks": {
            rb.MAIN: bank(offset),
            "ablation: single-bit": bank(offset - 0.5),
            "ablation: no SandwichQ": bank(offset - 2.0),
        },
    }


def test_targets_pair_seeds_and_take_the_better_separate_baseline():
    runs = [run(s, 10.0 * s) for s in range(3)]
    got = dict(rb.targets(runs))
    multi = next(v for k, v in got.items() if k.startswith("multi-bit"))
    sandwich = next(v for k, v in got.items() if k.startswith("SandwichQ"))
    full = next(v for k, v in got.items() if k.startswith("full subnet x1-32px-W8A8"))
    assert multi == pytest.approx([0.5] * 3) and sandwich == pytest.approx([2.0] * 3)
    assert full == pytest.approx([-1.0] * 3)
    small = [k for k in got if "of the MACs" in k]
    # x0.5-32px-W6A6 is at 30% of the MACs: not a <= 25% subnet
    assert len(small) == 1 and small[0].startswith("x0.5-24px-W4A4 (10% of the MACs)")
    # against the distilled run (79), not the plain separate one (40)
    assert got[small[0]] == pytest.approx([1.0] * 3)


def test_the_report_shows_means_over_seeds():
    text = rb.markdown(
        {"setup": "resnet18, synthetic", "runs": [run(s, float(s)) for s in range(3)]}
    )
    assert "Seeds 0, 1, 2. Source only (float): 10.0 ± 0.0%. Float UDA: 82.0 ± 1.0%." in text
    assert "| x0.5-24px-W4A4 | 10 | 41.0 ± 1.0 | 80.0 ± 1.0 | 81.0 ± 1.0 | |" in text
    assert "| multi-bit: bank - single-bit, mean over subnets (target >= +1) | 0.5 ± 0.0 |" in text


def test_first_format_files_merge_as_runs_of_their_seed():
    old = {
        "setup": "300 steps, batch 64 + 64, seed 1",
        "tasks": {
            "mnist->digits": {k: v for k, v in run(1, 0.0).items() if k not in ("task", "seed")}
        },
    }
    new = {"setup": "300 steps, batch 64 + 64", "runs": [run(0, 0.0), run(1, 5.0)]}
    merged = rb.merge([old, new])
    assert sorted((r["seed"], r["float_uda"]) for r in merged["runs"]) == [(0, 81.0), (1, 81.0)]
    with pytest.raises(SystemExit, match="another setup"):
        rb.merge([new, {"setup": "bncnn", "runs": []}])


def test_the_frontier_plot_is_written(tmp_path):
    path = tmp_path / "frontier.png"
    rb.plot({"setup": "synthetic", "runs": [run(s, float(s)) for s in range(3)]}, str(path))
    assert path.stat().st_size > 10_000


def test_a_stopped_run_keeps_the_pieces_it_finished(tmp_path, monkeypatch, float_cnn, digits):
    """Each trained piece is saved as it ends: a run stopped in its third subnet keeps float UDA
    and the first two, and the rerun trains only what is missing."""
    import json

    train, test = digits
    data = {
        "source": (train.x[:256], train.y[:256]),
        "target": train.x[256:512],
        "test": (test.x[:64], test.y[:64]),
        "model": float_cnn,
    }
    monkeypatch.setattr(rb, "task_data", lambda *a, **k: data)
    real, calls = rb.train_bank, []

    def stopped_in_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(rb, "train_bank", stopped_in_the_third)
    out = tmp_path / "rtfq.json"
    argv = ["--model", "bncnn", "--seeds", "0", "--tasks", "mnist->digits", "--steps", "2"]
    argv += ["--threads", str(torch.get_num_threads()), "--backends", "--out", str(out)]
    with pytest.raises(KeyboardInterrupt):
        rb.main(argv)
    (entry,) = json.loads(out.read_text())["runs"]
    assert "float_uda" in entry
    assert [r["name"] for r in entry["rows"]] == [s.name for s in rb.SEPARATE[:2]]
    calls.clear()
    rb.main([*argv, "--no-distilled", "--banks"])  # the separate subnets only
    (entry,) = json.loads(out.read_text())["runs"]
    assert len(calls) == len(rb.SEPARATE) - 2
    assert [r["name"] for r in entry["rows"]] == [s.name for s in rb.SEPARATE]

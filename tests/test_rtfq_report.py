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

    import torch

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


def test_the_orders_report_pairs_each_run_and_joins_the_taught_bank(tmp_path):
    import json

    import rtfq_orders

    def cell(fl: float, bank_full: float, small: float, distilled: float) -> dict:
        return {
            "float_uda": fl,
            "separate_full": fl - 1.0,
            "distilled_small": distilled,
            "bank_full": bank_full,
            "bank_small": small,
            "bank_mean": 40.0,
        }

    runs = tmp_path / "runs.json"
    runs.write_text(
        json.dumps(
            {
                "setup": "s",
                "cells": {"0/0": cell(40.0, 44.0, 38.0, 37.0), "0/1": cell(42.0, 40.0, 33.0, 36.0)},
            }
        )
    )
    taught = tmp_path / "taught.json"
    taught.write_text(
        json.dumps(
            {
                "setup": "s",
                "cells": {},
                "teacher": {
                    "0/1": {
                        "float_uda": 42.0,
                        "teacher_full": 43.0,
                        "teacher_small": 35.5,
                        "teacher_mean": 39.0,
                    }
                },
            }
        )
    )
    text = rtfq_orders.render([str(runs), str(taught)])
    # bank - float UDA per run (+4.0, -2.0) and over runs; smallest - distilled (+1.0, -3.0)
    assert "| +4.0 |" in text and "| -2.0 |" in text
    assert "bank full - float UDA, all 2 runs: +1.0 ± 4.2 (1 of 2 at or above zero)" in text
    assert "bank smallest - distilled, all 2 runs: -1.0 ± 2.8" in text
    # the taught bank is paired with the same seed and order's distilled subnet and default bank
    assert "| 0 | 1 | 42.0 | 43.0 | 35.5 | 39.0 | -0.5 | +2.5 |" in text
    assert "its smallest - the distilled subnet, 1 runs: -0.5 ± 0.0" in text


def test_the_orders_run_reads_order_zero_from_the_reported_file(tmp_path):
    import json

    import rtfq_orders

    reported = tmp_path / "reported.json"
    names = ("x1-32px-W8A8", "x0.5-24px-W4A4")
    reported.write_text(
        json.dumps(
            {
                "setup": "s",
                "runs": [
                    {
                        "task": "fashion->fashion-fog",
                        "seed": 2,
                        "float_uda": 48.0,
                        "rows": [{"name": "x1-32px-W8A8", "accuracy": 41.0}],
                        "distilled": [{"name": "x0.5-24px-W4A4", "accuracy": 43.2}],
                        "banks": {
                            rb.MAIN: {
                                "rows": [
                                    {"name": n, "accuracy": a}
                                    for n, a in zip(names, (42.6, 36.0), strict=True)
                                ]
                            }
                        },
                    }
                ],
            }
        )
    )
    row = rtfq_orders.reported(reported, "fashion->fashion-fog", 2)
    assert row == {
        "float_uda": 48.0,
        "separate_full": 41.0,
        "distilled_small": 43.2,
        "bank_full": 42.6,
        "bank_small": 36.0,
        "bank_mean": pytest.approx(39.3),
    }
    assert rtfq_orders.reported(reported, "fashion->fashion-fog", 1) is None


def test_the_orders_report_pairs_the_ablation_banks_with_the_same_order(tmp_path):
    import json

    import rtfq_orders

    def cell(mean: float) -> dict:
        return {
            "float_uda": 40.0,
            "separate_full": 40.0,
            "distilled_small": 35.0,
            "bank_full": 40.0,
            "bank_small": 35.0,
            "bank_mean": mean,
        }

    runs = tmp_path / "runs.json"
    runs.write_text(json.dumps({"setup": "s", "cells": {"1/1": cell(40.0), "1/2": cell(38.0)}}))
    ablated = tmp_path / "ablated.json"
    ablated.write_text(
        json.dumps(
            {
                "setup": "s",
                "cells": {},
                "ablations": {
                    "1/1": {"no_sandwich_mean": 37.0, "single_bit_mean": 39.5},
                    "1/2": {"no_sandwich_mean": 38.5, "single_bit_mean": 36.0},
                    "2/1": {"no_sandwich_mean": 30.0, "single_bit_mean": 30.0},  # no default bank
                },
            }
        )
    )
    text = rtfq_orders.render([str(runs), str(ablated)])
    assert "| 1 | 1 | 40.0 | 37.0 | 39.5 | +3.0 | +0.5 |" in text
    assert "| 1 | 2 | 38.0 | 38.5 | 36.0 | -0.5 | +2.0 |" in text
    assert "| 2 | 1 |" not in text.split("ablation banks")[1]
    assert "- SandwichQ, 2 runs: +1.2 ± 2.5 (1 of 2 at or above +1)" in text
    assert "- multi-bit, 2 runs: +1.2 ± 1.1 (1 of 2 at or above +1)" in text


def test_the_orders_run_fills_what_it_lacks_and_takes_order_zero_from_the_report(
    tmp_path, monkeypatch
):
    import json

    import rtfq_orders

    reported = tmp_path / "reported.json"
    banks = {
        label: {"rows": [{"name": n, "accuracy": acc} for n in ("x1-32px-W8A8", "x0.5-24px-W4A4")]}
        for label, acc in (
            (rb.MAIN, 40.0),
            ("ablation: no SandwichQ", 37.0),
            ("ablation: single-bit", 38.0),
        )
    }
    run = {
        "task": "fashion->fashion-fog",
        "seed": 2,
        "float_uda": 41.0,
        "rows": [],
        "distilled": [],
    }
    reported.write_text(json.dumps({"setup": "s", "runs": [{**run, "banks": banks}]}))
    calls = []

    def fake_run(data, steps, seed, im):
        calls.append(seed)
        return {"no_sandwich_mean": 30.0, "single_bit_mean": 31.0, "seconds": 0.0}

    monkeypatch.setitem(rtfq_orders.PARTS, "ablations", (fake_run, lambda c: "x"))
    monkeypatch.setattr(rtfq_orders, "task_data", lambda *a: {})
    out = tmp_path / "out.json"
    argv = ["--ablations", "--seeds", "2", "--orders", "1", "--reported", str(reported)]
    argv += ["--threads", str(torch.get_num_threads()), "--out", str(out)]  # the suite's count
    rtfq_orders.main(argv)
    saved = json.loads(out.read_text())
    assert saved["ablations"]["2/0"] == {"no_sandwich_mean": 37.0, "single_bit_mean": 38.0}
    assert saved["ablations"]["2/1"]["no_sandwich_mean"] == 30.0
    assert calls == [2 + 1000]  # order 1 trains with seed + 1000
    assert "teacher" not in saved and saved["cells"] == {}  # only the part asked for
    rtfq_orders.main(argv)
    assert calls == [1002]  # a rerun computes nothing it has

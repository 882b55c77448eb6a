"""``qtta bench`` (qtta_plugins.bench): a grid on tiny data runs, caches, reruns computing nothing,
resumes after a stop; results JSON, tables, config errors, CLI overrides; and data in every disk
layout with a torchvision and a timm checkpoint through ``qtta bench`` on every backend, with
predictions identical to the Python API's on the same data."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
import types
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("omegaconf")
pytest.importorskip("tabulate")

# tests/test_disk_data.py's tiny data sets in every layout (module fixtures, under new names)
from test_disk_data import cifar as cifar_npy  # noqa: F401
from test_disk_data import folder as domain_folder  # noqa: F401
from test_disk_data import image_list, vision
from test_disk_data import imagenet as imagenet_tree  # noqa: F401

import qtta_plugins
from qtta_plugins import bench
from qtta_plugins.app.cli import main
from qtta_plugins.bench import runner
from qtta_plugins.bench.config import BenchConfigError

torch.set_num_threads(1)
RUN_CELL = runner.run_cell  # the real one, whatever a test has put in its place


def digits_config(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    """2 corruptions x 16 digits at severity 5, batch 8 (4 batches a cell), the shipped digits
    BN CNN at torchao W8A8 (quantized once per session: the runner's memo), 2 methods x 2 seeds."""
    config: dict[str, Any] = {
        "name": "tiny",
        "data": {"source": "digits", "corruptions": ["gaussian_noise", "fog"], "per_domain": 16},
        "model": {"spec": "bncnn", "train": {"source": "digits"}},
        "calibration": {"n": 64, "batch_size": 32},
        "backends": ["torchao"],
        "bits": ["w8a8"],
        "methods": {"source": {}, "norm": {}},
        "seeds": [0, 1],
        "batch_size": 8,
        "threads": 1,
        "cache": str(tmp_path / "cache"),
        "out": str(tmp_path / "tiny.json"),
    }
    config.update(changes)
    return config


class Stop(Exception):
    """The interruption a test simulates (pytest reserves KeyboardInterrupt for itself)."""


class Counting:
    """Wraps ``runner.run_cell``: counts the cells computed, and raises after ``stop_after``."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.calls = 0
        self.stop_after = stop_after

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if self.stop_after is not None and self.calls >= self.stop_after:
            raise Stop("stopped by the test")
        self.calls += 1
        return RUN_CELL(*args, **kwargs)


def errors_by_cell(results: bench.Results) -> dict[tuple, tuple]:
    return {
        tuple(c[a] for a in bench.grid.AXES): (c["errors"], c["predictions_sha256"])
        for c in results.cells
    }


# ----------------------------------------------------------------------------- grid and cache


def test_a_grid_runs_caches_and_a_rerun_computes_nothing(tmp_path, monkeypatch):
    config = bench.load_config(digits_config(tmp_path))
    assert [str(c) for c in bench.expand(config)][:2] == [
        "digits | bncnn | torchao W8A8 | none + source | continual | seed 0",
        "digits | bncnn | torchao W8A8 | none + norm | continual | seed 0",
    ]
    counting = Counting()
    monkeypatch.setattr(runner, "run_cell", counting)
    first = bench.run(config, progress=False)
    assert counting.calls == 4 and len(first.cells) == 4
    cell = first.select(method="norm", seed=1)[0]
    assert set(cell["errors"]) == {"gaussian_noise", "fog"} and cell["batches"] == 4
    assert cell["images"] == 32 and cell["passes_per_batch"] == 1.0
    assert cell["time_ratio"] > 0 and cell["memory_method"] in ("VmHWM", "ru_maxrss")
    assert cell["peak_extra_mb"] >= 0 and len(cell["per_batch"]) == 4
    assert first.select(method="source", seed=0)[0]["error"] != cell["error"]
    again = bench.run(config, progress=False)  # everything cached: nothing computed
    assert counting.calls == 4
    assert errors_by_cell(again) == errors_by_cell(first)
    assert bench.Results.load(tmp_path / "tiny.json").cells == again.cells
    # a third seed computes only its own two cells; a renamed row finds its cells again
    renamed = digits_config(tmp_path, seeds=[0, 1, 2])
    renamed["methods"] = {"source": {}, "BN-adapt": {"method": "norm"}}
    more = bench.run(bench.load_config(renamed), progress=False)
    assert counting.calls == 6 and len(more.cells) == 6
    assert more.select(method="BN-adapt", seed=1)[0]["errors"] == cell["errors"]


def test_a_stopped_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    config = bench.load_config(digits_config(tmp_path, seeds=[0, 1, 2]))
    stopping = Counting(stop_after=2)
    monkeypatch.setattr(runner, "run_cell", stopping)
    with pytest.raises(Stop):
        bench.run(config, progress=False)
    partial = bench.Results.load(tmp_path / "tiny.json")  # written on the way out
    assert len(partial.cells) == 2 and [p.cached for p in bench.plan(config)].count(True) == 2
    resuming = Counting()
    monkeypatch.setattr(runner, "run_cell", resuming)
    done = bench.run(config, progress=False)
    assert resuming.calls == 4 and len(done.cells) == 6
    assert [c["seed"] for c in done.cells] == [0, 0, 1, 1, 2, 2]  # grid order, not run order


def test_the_same_config_gives_the_same_results_from_an_empty_cache(tmp_path):
    a = bench.run(bench.load_config(digits_config(tmp_path / "a")), progress=False)
    runner.clear_memos()  # the quantized model built again: results are functions of the key
    b = bench.run(bench.load_config(digits_config(tmp_path / "b")), progress=False)
    assert errors_by_cell(a) == errors_by_cell(b)
    assert [c["key"] for c in a.cells] == [c["key"] for c in b.cells]


# ----------------------------------------------------------------------------- results, tables


def synthetic(paired: list | None = None) -> bench.Results:
    """Results of 2 rows x 3 seeds on torchao, 1 seed on NNCF; made up, no run."""
    cells = []
    errors = {"tent": [30.0, 32.0, 34.0], "norm": [31.0, 31.5, 37.0]}
    for method, values in errors.items():
        for seed, e in enumerate(values):
            cells.append(cell("torchao", method, seed, e))
        cells.append(cell("nncf", method, 0, values[0] + 1))
    config = {"tables": {"paired": paired or [], "digits": 1}}
    return bench.Results("synthetic", config, cells)


def cell(backend: str, method: str, seed: int, error: float) -> dict[str, Any]:
    return {
        "data": "digits",
        "model": "bncnn",
        "backend": backend,
        "bits": "w4a4",
        "reconstruct": "none",
        "method": method,
        "setting": "continual",
        "seed": seed,
        "error": error,
        "errors": {"fog": error - 1, "snow": error + 1},
        "time_ratio": 2.0,
        "round_errors": None,
    }


def test_results_round_trip_and_refuse_another_format(tmp_path):
    results = synthetic([["tent", "norm", "Tent's step"]])
    path = results.save(tmp_path / "r.json")
    back = bench.Results.load(path)
    assert back.to_dict() == results.to_dict()
    assert bench.markdown(back) == bench.markdown(results)
    (tmp_path / "other.json").write_text(json.dumps({"setup": "x", "cells": []}))
    with pytest.raises(ValueError, match=r"other\.json is not a qtta bench results file"):
        bench.Results.load(tmp_path / "other.json")
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        bench.Results.load(tmp_path / "nope.json")


def test_tables_show_mean_sd_with_seed_counts_and_paired_differences():
    text = bench.markdown(synthetic([["tent", "norm", "Tent's step"]]))
    # summary: 3 seeds unmarked; one seed marked (n=1)
    assert "| tent  | 32.0 ± 2.0 · 2.0x | 31.0 ± 0.0 (n=1) · 2.0x |" in text
    assert "| norm  | 33.2 ± 3.3 · 2.0x | 32.0 ± 0.0 (n=1) · 2.0x |" in text
    # per domain, stream order, and the mean
    assert "| row   | fog              | snow             | mean             |" in text
    # paired seed by seed: -1.0, +0.5, -3.0 -> mean -1.2, sd 1.8; per seed after
    assert (
        "| tent - norm  | Tent's step | -1.2 ± 1.8: -1.0, +0.5, -3.0 | -1.0 ± 0.0 (n=1): -1.0 |"
        in text
    )
    assert bench.tables.mean_sd([1.0, 2.0]) == "1.5 ± 0.7 (n=2)"
    with pytest.raises(ValueError, match="unknown table"):
        bench.markdown(synthetic(), which=["nope"])


def test_the_rounds_table_gives_each_row_a_collapse_verdict_naming_the_round():
    def long_cell(method: str, rounds: list[float], seed: int = 0) -> dict[str, Any]:
        return {
            **cell("torchao", method, seed, sum(rounds) / len(rounds)),
            "setting": "long",
            "round_errors": rounds,
        }

    cells = [
        long_cell("source", [50.0] * 5),
        long_cell("tent", [30.0, 35.0, 45.0, 55.0, 80.0]),  # above source from round 4
        long_cell("sar", [30.0, 29.0, 30.5, 32.0, 33.0]),  # > 2 points above its best from round 4
        long_cell("eata", [30.0, 29.5, 30.5, 30.0, 29.0]),  # stable
        long_cell("cotta", [30.0, 29.0, 31.5, 30.0, 30.5]),  # rose, but not in the last round
        long_cell("tent", [30.0, 60.0, 30.0, 30.0, 30.0], seed=1),  # seed 1 has no source row
    ]
    [table] = bench.tables.rounds(bench.Results("long", {"tables": {"digits": 1}}, cells))
    verdict = {(r[1], r[2]): r[-1] for r in table.rows}
    assert verdict[("tent", "0")] == "collapsed: above source from round 4"
    assert verdict[("sar", "0")].startswith("degrades") and "from round 4" in verdict[("sar", "0")]
    assert verdict[("eata", "0")] == verdict[("cotta", "0")] == "stable"
    assert verdict[("tent", "1")] == "stable"  # no source to compare with: only its own rise
    assert verdict[("source", "0")] == ""


def test_a_plot_draws_the_error_along_the_stream(tmp_path):
    path = bench.plot(synthetic(), tmp_path / "p.png")
    assert path.stat().st_size > 5000


# ----------------------------------------------------------------------------- split, window, batch


def test_split_seed_fixes_the_test_split_and_the_seed_draws_the_rest(tmp_path):
    """data.split_seed: every seed's stream holds the same test images (the seed still orders
    them and draws the corruption); with split_seed equal to the seed it is make_stream's stream,
    batch for batch; and a config without it keeps its cells' keys (no split_seed in the spec)."""
    data = {"source": "digits", "corruptions": ["clean", "fog"]}  # the whole split: 500 images
    plain = bench.load_config(digits_config(tmp_path, data=data, seeds=[0, 1]))
    fixed = bench.load_config(digits_config(tmp_path, data={**data, "split_seed": 0}, seeds=[0, 1]))
    assert "split_seed" not in bench.cell_spec(plain, bench.expand(plain)[0])["data"]
    assert bench.cell_spec(fixed, bench.expand(fixed)[0])["data"]["split_seed"] == 0

    def images(config: bench.Bench, seed: int, domain: str) -> tuple[list, list]:
        cell = next(c for c in bench.expand(config) if c.seed == seed)
        stream = runner.cell_stream(config, cell, None, 1)
        batches = [b for b in stream if b.domain == domain]
        x = torch.cat([b.x for b in batches])
        return sorted(x.flatten(1).sum(1).tolist()), [b.y.tolist() for b in batches]

    # without split_seed the seeds draw other test images (on digits, seed 1's split holds images
    # of seed 0's training split); with it, the same images in another order
    assert images(plain, 0, "clean")[0] != images(plain, 1, "clean")[0]
    clean0, order0 = images(fixed, 0, "clean")
    clean1, order1 = images(fixed, 1, "clean")
    assert clean0 == clean1 and order0 != order1
    # the cell's seed still draws the corruption: fog of seed 1 on the same images differs
    assert images(fixed, 0, "fog")[0] != images(fixed, 1, "fog")[0]
    # split_seed == seed: make_stream's own stream (per_domain: a subset the seed draws)
    data = {**data, "per_domain": 16}
    same = bench.load_config(digits_config(tmp_path, data={**data, "split_seed": 1}, seeds=[1]))
    one = bench.load_config(digits_config(tmp_path, data=data, seeds=[1]))
    for setting in ("continual", "gradual", "mixed"):
        cell = bench.expand(one)[0]
        cell = bench.grid.Cell(**{**cell.labels(), "setting": setting})
        got = list(runner.cell_stream(same, cell, None, 1))
        want = list(runner.cell_stream(one, cell, None, 1))
        assert [b.domain for b in got] == [b.domain for b in want]
        assert all(
            torch.equal(g.x, w.x) and torch.equal(g.y, w.y) for g, w in zip(got, want, strict=True)
        )


def test_a_clean_error_on_one_split_is_the_same_for_every_seed(tmp_path):
    """lowbit_ptq's cells: 'source' on the clean domain of one split (split_seed) gives one error
    whatever the seed (the seed only orders the images); each seed's own split gives others."""
    data = {"source": "digits", "corruptions": ["clean"], "split_seed": 0}
    changes = {"methods": {"source": {}}, "seeds": [0, 1, 2], "batch_size": 64}
    results = bench.run(bench.load_config(digits_config(tmp_path, data=data, **changes)))
    errors = [c["error"] for c in results.cells]
    assert len(errors) == 3 and len(set(errors)) == 1 and results.cells[0]["images"] == 500


def test_a_window_a_refused_batch_size_and_a_batch_size_axis(tmp_path, monkeypatch):
    """batch_size as a list is a grid axis with a 'batch' label; a row's window goes to adapt; a
    method that refuses the batch size is a refused cell (error class and message, no error),
    the grid goes on, and the tables say 'refused'. A config of one batch size has no label, and
    its cell has the key of the same cell in the axis."""
    data = {"source": "digits", "corruptions": ["fog"], "per_domain": 10}
    methods = {"norm": {}, "norm w4": {"method": "norm", "window": 4}}
    plan = [
        {"methods": ["norm"], "batch_size": [10, 1]},
        {"methods": ["norm w4"], "batch_size": [1]},
    ]
    config = bench.load_config(
        digits_config(
            tmp_path, data=data, methods=methods, seeds=[0], batch_size=[10, 1], plan=plan
        )
    )
    assert [str(c).rsplit("|", 1)[1].strip() for c in bench.expand(config)] == [
        "batch 10",
        "batch 1",
        "batch 1",
    ]
    lines: list[str] = []
    results = bench.run(config, progress=False, echo=lines.append)
    by = {(c["method"], c["batch"]): c for c in results.cells}
    refused = by[("norm", 1)]
    assert refused["error"] is None and refused["errors"] == {}
    assert refused["refused"]["error"] == "SmallBatchError"
    assert "batch of 1 sample" in refused["refused"]["message"]
    assert "refused (SmallBatchError)" in lines[1]
    assert by[("norm", 10)]["error"] is not None and by[("norm", 10)]["batches"] == 1
    windowed = by[("norm w4", 1)]
    assert windowed["batches"] == 10 and windowed["spec"]["method"]["window"] == {
        "length": 4,
        "update_every": None,
        "statistics": "window",  # the default as it resolved: a new default is a new cell
        "decay": 0.95,
    }
    # the window is adapt's: the same predictions as the Python API with window=4
    qmodel = runner._QUANT.items[next(reversed(runner._QUANT.items))]
    stream = runner.cell_stream(config, bench.expand(config)[2], None, 1)
    api = qtta_plugins.adapt(qmodel, list(stream), "norm", window=4, progress=False, seed=0)
    sha = hashlib.sha256(api.predictions.to(torch.int64).numpy().tobytes()).hexdigest()
    assert windowed["predictions_sha256"] == sha
    text = bench.markdown(results)
    assert "torchao W8A8 · batch 1" in text and "| refused " in text
    # one batch size: no label, and the key of the axis's batch-10 cell (the cache is shared)
    single = bench.load_config(
        digits_config(tmp_path, data=data, methods={"norm": {}}, seeds=[0], batch_size=10)
    )
    cell = bench.expand(single)[0]
    assert cell.batch is None and "batch" not in cell.labels()
    assert bench.plan(single)[0].key == by[("norm", 10)]["key"]
    # refused cells are results: the rerun computes nothing, and a results file renders them
    counting = Counting()
    monkeypatch.setattr(runner, "run_cell", counting)
    bench.run(config, progress=False)
    assert counting.calls == 0
    assert "refused" in bench.markdown(bench.Results.load(tmp_path / "tiny.json"))
    bench.plot(results, tmp_path / "p.png")


def test_a_guarded_row_goes_to_adapt_and_records_its_restarts(tmp_path):
    """A row's guard is adapt's (the same predictions as the Python API with guard=...), its cell
    records guard_restarts, its key names the guard's fields, and rows without one keep theirs."""
    data = {"source": "digits", "corruptions": ["fog"], "per_domain": 40}
    methods = {"norm": {}, "norm g": {"method": "norm", "guard": {"window": 8}}}
    config = bench.load_config(
        digits_config(tmp_path, data=data, methods=methods, seeds=[0], batch_size=8)
    )
    plain, guarded = bench.expand(config)
    assert "guard" not in bench.cell_spec(config, plain)["method"]
    assert bench.cell_spec(config, guarded)["method"]["guard"] == {"window": 8, "drop": 0.5}
    results = bench.run(config, progress=False)
    by = {c["method"]: c for c in results.cells}
    assert "guard_restarts" not in by["norm"] and by["norm g"]["guard_restarts"] == []
    qmodel = runner._QUANT.items[next(reversed(runner._QUANT.items))]
    stream = runner.cell_stream(config, guarded, None, 1)
    api = qtta_plugins.adapt(qmodel, list(stream), "norm", guard={"window": 8}, progress=False)
    sha = hashlib.sha256(api.predictions.to(torch.int64).numpy().tobytes()).hexdigest()
    assert by["norm g"]["predictions_sha256"] == sha


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"batchsize": 8}, r"'batchsize'.*Did you mean: 'batch_size'"),
        ({"batch_size": "eight"}, r"'batch_size' must be an int >= 1, got 'eight'"),
        ({"batch_size": [8, 0]}, r"'batch_size\[1\]' must be an int >= 1, got 0"),
        ({"batch_size": [8, 8]}, r"'batch_size': \[8, 8\] names a batch size twice"),
        (
            {"methods": {"norm": {"window": 0}}},
            r"'methods\.norm\.window': window must be a number of samples >= 1",
        ),
        (
            {"methods": {"norm": {"window": {"length": 4, "every": 2}}}},
            r"'methods\.norm\.window\.every': not a field of WindowConfig",
        ),
        (
            {"methods": {"norm": {"guard": {"window": 1}}}},
            r"'methods\.norm\.guard': GuardConfig.window must be a number of predictions >= 2",
        ),
        (
            {"methods": {"norm": {"guard": "on"}}},
            r"'methods\.norm\.guard': guard must be True, False, None, a dict",
        ),
        (
            {"data": {"source": "cifar10-c", "root": "/d", "split_seed": 0}},
            r"'data\.split_seed': not taken here",
        ),
        ({"data": {"source": "digits", "split_seed": -1}}, r"'data\.split_seed' must be an int"),
        (
            {"data": {"source": "digits", "sevrity": 5}},
            r"'data\.sevrity'.*Did you mean: 'severity'",
        ),
        (
            {"data": {"source": "cifar10c"}},
            r"'data\.source': 'cifar10c' is not one of .*did you mean 'cifar10-c'",
        ),
        (
            {"data": {"source": "cifar10-c", "root": "/d", "n_test": 5}},
            r"'data\.n_test': not taken here",
        ),
        ({"settings": ["continual", "gradul"]}, r"'settings\[1\]': 'gradul' is not one of"),
        ({"bits": ["w4a4", "4bit"]}, r"'bits\[1\]': bits '4bit' is not of the form"),
        ({"backends": ["tensorrt"]}, r"'backends\[0\]': unknown backend 'tensorrt'"),
        (
            {"methods": {"tent": {"lrr": 1e-3}}},
            r"'methods\.tent\.lrr': not an option of TentConfig \(did you mean 'lr'",
        ),
        (
            {"methods": {"tent": {"lr": -1.0}}},
            r"'methods\.tent': TentConfig\.lr must be a positive",
        ),
        (
            {"methods": {"tnet": {}}},
            r"'methods\.tnet': no installed plugin .* 'tnet' \(did you mean 'tent'",
        ),
        (
            {"reconstruct": {"q": {"method": "qdorp"}}},
            r"'reconstruct\.q': no installed plugin provides reconstruction method 'qdorp'",
        ),
        (
            {"quantize": {"first_last_bit": 8}},
            r"'quantize\.first_last_bit'.*did you mean 'first_last_bits'",
        ),
        ({"plan": [{"methods": ["tent"]}]}, r"'plan\[0\]\.methods\[0\]': 'tent' is not defined"),
        (
            {"plan": [{"method": ["norm"]}]},
            r"'plan\[0\]\.method': not a grid axis \(did you mean 'methods'",
        ),
        ({"device": "tpu"}, r"'device': 'tpu' is not one of cpu, cuda"),
        (
            {"calibration": {"draw": "random"}},
            r"'calibration\.draw': 'random' is not one of first, seeded",
        ),
        ({"model": {"spec": "bnncn"}}, r"'model\.spec': 'bnncn' is neither .*did you mean bncnn"),
        (
            {"model": {"spec": "timm:x", "transform": "pil"}},
            r"'model\.transform\.kind': 'pil' is not one of",
        ),
        ({"tables": {"paired": [["tent"]]}}, r"'tables\.paired\[0\]' must be \[row a, row b\]"),
        ({"data": None}, r"'data' is missing"),
    ],
)
def test_a_bad_key_or_value_is_an_error_naming_it(tmp_path, change, message):
    with pytest.raises(BenchConfigError, match=message):
        bench.load_config(digits_config(tmp_path, **change))


def test_overrides_and_their_errors(tmp_path):
    base = digits_config(tmp_path)
    config = bench.load_config(
        base, ["seeds=[3,4]", "methods.tent.lr=1e-3", "data.per_domain=8", "reconstruct.none=null"]
    )
    assert config.config.seeds == [3, 4] and config.data[0].per_domain == 8
    assert config.methods["tent"].options == {"lr": 1e-3}
    listed = bench.load_config(
        {**base, "data": [base["data"], {**base["data"], "name": "other"}]}, ["data.1.severity=3"]
    )
    assert [d.severity for d in listed.data] == [None, 3]
    with pytest.raises(BenchConfigError, match="override 'seeds' is not KEY=VALUE"):
        bench.load_config(base, ["seeds"])
    with pytest.raises(BenchConfigError, match=r"'methods\.norm\.lr': not an option of NormConfig"):
        bench.load_config(base, ["methods.norm.lr=0.1"])
    with pytest.raises(FileNotFoundError, match=r"config file .*nope\.yaml does not exist"):
        bench.load_config(tmp_path / "nope.yaml")


# ----------------------------------------------------------------------------- the command


def write_yaml(path: Path, config: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(config, sort_keys=False))  # rows in the order written
    return path


def test_qtta_bench_runs_a_config_with_overrides_and_renders(tmp_path, capsys):
    cfg = write_yaml(tmp_path / "tiny.yaml", digits_config(tmp_path, seeds=[0]))
    assert main(["bench", str(cfg), "--dry-run", "seeds=[0,1]", "-q"]) == 0
    out = capsys.readouterr().out
    assert "4 cells: 0 cached, 4 to run" in out and "| norm " in out
    plot = tmp_path / "plot.png"
    code = main(["bench", str(cfg), "methods.tent={}", "-q", "--render", "--plot", str(plot)])
    assert code == 0 and plot.is_file()
    out = capsys.readouterr().out
    assert "| tent   | " in out and "(n=1)" in out
    results = bench.Results.load(tmp_path / "tiny.json")
    assert [c["method"] for c in results.cells] == ["source", "norm", "tent"]
    assert main(["bench", str(cfg), "methods.tent={}", "--dry-run"]) == 0
    assert "3 cells: 3 cached, 0 to run" in capsys.readouterr().out
    assert main(["bench", str(tmp_path / "tiny.json")]) == 0  # a results file: rendered
    assert "**continual** · data digits · model bncnn" in capsys.readouterr().out
    assert main(["bench", str(cfg), "batch_size=0", "-q"]) == 2
    assert "qtta: error: config key 'batch_size' must be an int >= 1" in capsys.readouterr().err


# ----------------------------------------------------------------------------- disk layouts


def layout_data(roots: dict[str, Path], images: Path) -> list[dict[str, Any]]:
    """The bench's view of each layout of tests/test_disk_data.py's fixtures, one batch of 3-4
    images a domain: RobustBench's CIFAR-10-C .npy files, an ImageNet-C tree of JPEGs, a folder
    of domains, an image list."""
    return [
        {"name": "cifar", "source": "cifar10-c", "root": str(roots["cifar"]),
         "corruptions": ["fog", "contrast"], "severity": 3, "per_domain": 3},
        {"name": "imagenet", "source": "imagenet-c", "root": str(roots["imagenet"]),
         "corruptions": ["fog", "contrast"], "severity": 5, "per_domain": 3},
        {"name": "folder", "source": "folder", "root": str(roots["folder"])},
        {"name": "list", "source": "image-list", "root": str(roots["folder"]),
         "image_list": str(images)},
    ]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, dict[str, Any]]:
    """A torchvision ResNet-18 and a timm ResNet-10t with 3 classes, saved as checkpoint files (the
    timm one inside a training checkpoint dict), as bench model specs with their preprocessing."""
    tv, timm = vision("torchvision"), vision("timm")
    where = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    resnet = tv.models.resnet18(num_classes=3).eval()
    torch.save(resnet.state_dict(), where / "resnet18.pth")
    torch.manual_seed(1)
    small = timm.create_model("resnet10t", pretrained=False, num_classes=3).eval()
    for m in small.modules():  # as trained: timm starts each block's last BN at gamma 0
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    torch.save({"epoch": 1, "state_dict": small.state_dict()}, where / "resnet10t.pth")
    imagenet_eval = {
        "kind": "eval",
        "size": 16,
        "crop": 16,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }
    return {
        "tv": {
            "name": "tv",
            "spec": "torchvision:resnet18",
            "weights": str(where / "resnet18.pth"),
            "transform": imagenet_eval,
        },
        "timm": {
            "name": "timm",
            "spec": "timm:resnet10t",
            "weights": str(where / "resnet10t.pth"),
            "transform": {"kind": "timm", "input_size": [3, 16, 16]},
        },
    }


def api_transform(spec: dict[str, Any], model: torch.nn.Module):
    """The same preprocessing, built by hand with torchvision / timm."""
    if spec["transform"]["kind"] == "timm":
        return qtta_plugins.data.timm_transform(model, input_size=(3, 16, 16))
    T = vision("torchvision").transforms
    t = spec["transform"]
    return T.Compose(
        [T.Resize(16), T.CenterCrop(16), T.ToTensor(), T.Normalize(t["mean"], t["std"])]
    )


class SameInputsQuantizeOnce:
    """``qtta_plugins.quantize`` that computes once per identical inputs (the float model's
    state, backend, bits, the calibration tensors' bytes, options) and hands out copies: the
    Python API's call on the same inputs as the harness's then costs nothing (a ResNet-18 export
    takes 8 s here), and a hit is itself the check that the harness quantized exactly what the
    API quantizes. ``hits`` counts them."""

    def __init__(self) -> None:
        self.real = qtta_plugins.quantize
        self.done: dict[str, torch.nn.Module] = {}
        self.hits = 0

    def __call__(
        self, model: torch.nn.Module, backend: str, bits: str, calib: list, **options: Any
    ) -> torch.nn.Module:
        digest = hashlib.sha256(repr((backend, bits, sorted(options.items()))).encode())
        for name, t in model.state_dict().items():
            digest.update(name.encode() + t.detach().cpu().numpy().tobytes())
        for x in calib:
            digest.update(repr(tuple(x.shape)).encode() + x.detach().cpu().numpy().tobytes())
        key = digest.hexdigest()
        if key in self.done:
            self.hits += 1
        else:
            self.done[key] = self.real(model, backend, bits, calib, **options)
        return qtta_plugins.view.copy_model(self.done[key])


# under -m slow (~17 s a backend; issue 36: the suite's time): the layouts go through qtta bench by
# default in test_the_zoa_imagenet_c_config_runs_on_tiny_data_in_its_layouts, and through the
# Python API in tests/test_disk_data.py
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torchao", "brevitas", "nncf"])
def test_every_disk_layout_through_qtta_bench_matches_the_python_api(
    tmp_path, request, checkpoints, backend, capsys, monkeypatch
):
    """``qtta bench`` on the four layouts, with a torchvision and a timm checkpoint (each model on
    two layouts: every layout and every model, at half the cost of the product), source / norm /
    tent / zoa; then the Python API on the same files: load_model, quantize on the same first 6
    calibration images, make_stream, adapt. Predictions and errors must be identical."""
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    quantize = SameInputsQuantizeOnce()
    monkeypatch.setattr(qtta_plugins, "quantize", quantize)
    # the layouts, by the names this module imports test_disk_data's fixtures under
    folder = request.getfixturevalue("domain_folder")
    roots = {
        "cifar": request.getfixturevalue("cifar_npy")[0],
        "imagenet": request.getfixturevalue("imagenet_tree"),
        "folder": folder,
    }
    data = layout_data(roots, image_list(folder))
    pairs = {"tv": ["cifar", "folder"], "timm": ["imagenet", "list"]}
    config = {
        "name": "layouts",
        "data": [{**d, "num_workers": 0} for d in data],
        "model": list(checkpoints.values()),
        "calibration": {"source": "folder", "root": str(folder), "n": 6, "batch_size": 3,
                        "num_workers": 0},
        "backends": [backend],
        "bits": ["w8a8"],
        "methods": {"source": {}, "norm": {}, "tent": {}, "zoa": {}},
        "plan": [{"model": [m], "data": names} for m, names in pairs.items()],
        "batch_size": 4,
        "threads": 1,
        "measure": {"predictions": True, "memory": False, "time": False},
        "cache": str(tmp_path / "cache"),
        "out": str(tmp_path / "out.json"),
    }  # fmt: skip
    cfg = write_yaml(tmp_path / "layouts.yaml", config)
    assert main(["bench", str(cfg), "-q"]) == 0
    results = bench.Results.load(tmp_path / "out.json")
    assert len(results.cells) == 2 * 2 * 4

    from qtta_plugins.data import make_stream
    from qtta_plugins.models import load_model

    for name, spec in checkpoints.items():
        float_model = load_model(spec["spec"], spec["weights"])
        transform = api_transform(spec, float_model)
        clean = make_stream("continual", "folder", root=folder, transform=transform, num_workers=0)
        x = torch.cat([b.x for b in clean])[:6]
        qmodel = qtta_plugins.quantize(float_model, backend, "w8a8", [x[:3], x[3:]])
        assert quantize.hits == 1 + list(checkpoints).index(name)  # the harness's very inputs
        for d in [d for d in data if d["name"] in pairs[name]]:
            options = {k: v for k, v in d.items() if k not in ("name", "source")}
            for method in config["methods"]:
                stream = make_stream(
                    "continual", d["source"], batch_size=4, seed=0, transform=transform,
                    num_workers=0, **options,
                )  # fmt: skip
                run = qtta_plugins.adapt(qmodel, stream, method, progress=False)
                (cell,) = results.select(model=name, data=d["name"], method=method)
                assert cell["predictions"] == run.predictions.tolist(), (name, d["name"], method)
                errors = {k: v for k, v in run.errors().items() if k != "mean"}
                assert cell["errors"] == errors and len(errors) == 2
    capsys.readouterr()


def test_dry_run_lists_cells_and_missing_files(tmp_path, capsys):
    config = digits_config(tmp_path)
    config["data"] = {"source": "imagenet-c", "root": str(tmp_path / "no-imagenet")}
    config["model"] = {"spec": "timm:vit_base_patch16_224", "weights": str(tmp_path / "vit.pth"),
                       "transform": "timm"}  # fmt: skip
    config["calibration"] = {"source": "folder", "root": str(tmp_path / "no-val")}
    cfg = write_yaml(tmp_path / "c.yaml", config)
    assert main(["bench", str(cfg), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 cells: 0 cached, 4 to run" in out
    assert f"missing: model 'timm:vit_base_patch16_224': weights file {tmp_path / 'vit.pth'}" in out
    assert f"missing: data 'imagenet-c': root {tmp_path / 'no-imagenet'} does not exist" in out
    assert f"missing: calibration: root {tmp_path / 'no-val'} does not exist" in out


def test_the_shipped_configs_load_and_expand():
    counts = {}
    for path in sorted(CONFIGS.glob("*.yaml")):
        config = bench.load_config(path)
        counts[path.stem] = len(bench.expand(config))
    assert counts == {
        "smoke": 4,
        # clean error: 4 models x 3 backends x 2 bits; the stream at W8A8: 3 BN models x 3
        # backends x 4 methods, the ViT (no norm) x 3 backends x 3 methods
        "architectures": 4 * 3 * 2 + 3 * 3 * 4 + 3 * 3,
        "baselines": 253,  # the script's published plan (244 run, 9 diagnostics not yet)
        # the W6A6 headline on 3 seeds, FOA reset at each domain, the long stream on seed 0
        "zoa_vit": 4 * 3 * 3 + 3 * 3 + 2 * 3,
        "zoa_vit_b16_imagenet_c": 4 * 3,  # 4 methods x 3 backends, seed 0
        "ttaq_resnet_cifar10_c": 2 * 3 * 3,  # qdrop / ttaq x source / tent / abl x 3 backends
        # ttaq_benchmark.py's plans (their blocks: tests/test_bench_ttaq_configs.py)
        "ttaq_resnet18": 369,
        "ttaq_resnet18_w4a4": 414,
        # 8 rows x 3 backends x 2 bits, ZOA's 10 rounds at W4A4, each model's clean accuracy
        "zoa_benchmark": 8 * 3 * 2 + 3 + 3 * 2,
        # ResNet-18: 9 rows x 3 backends on seed 0, 5 on seeds 1 and 2; the ViT (torchao): 6 + 4 x 2
        "zoa_cost": 9 * 3 + 5 * 3 * 2 + 6 + 4 * 2,
        "zoa_rounds": 3 * 3 + 3,  # ZOA's defaults on every backend, its old settings on torchao
        # lowbit_ptq.py's plans: min-max at 2 bits x 3 backends, QDrop at W2A4 x 3 backends, TTAQ
        # and its 3 ablations on Brevitas W2A4; the ResNet-18: 4 bits x 3 backends, QDrop at W2A4
        "lowbit_ptq_bncnn": (2 * 3 + 3 + 4) * 3,
        "lowbit_ptq_resnet18": (4 * 3 + 3) * 3,
        # the held-out MNIST CNN: quantize only at W4A4 and W2A4, QDrop at W2A4, x 3 backends
        "lowbit_ptq_bncnn_mnist": (2 + 1) * 3 * 3,
        # small_batch.py: 9 methods x 5 batch sizes, each method through a window at batch 1
        "small_batch": 9 * 5 + 9,
        # the collapse guard: 6 methods and 5 of them guarded, dev seed 3 and seeds 0-2; 7 rows
        # and 6 of them guarded x continual / dirichlet x 3 seeds
        "guard_digits": 11 * 4,
        "guard_fashion": 13 * 2 * 3,
        # issue 38's dev choice of the window's statistics: the ResNet-18's 9 rows and the ViT's
        # 4, at batch 1 and 64, seed 0
        "edge_statistics": (9 + 4) * 2,
        "edge_statistics_digits": 9 * 2,  # its second dev stream: 9 rows at batch 1 and 64
        # issue 38's part 4: the ResNet-18's 7 rows and the ViT's 5, at 4 batch sizes, 3 seeds
        "edge": (7 + 5) * 4 * 3,
        # issue 37's regime, 3 seeds: the ViT's W6A6 headline (5 methods x 3 backends, FOA reset);
        # QDrop / TTAQ at low bits on ResNet-18 and MobileNetV2 (3 rows x 3 methods x 3 backends)
        # and each PTQ model's clean error (W8A8 too); TTAQ's 3 ablations; 9 methods at W8A8; FOA's
        # curve over 4 domain lengths (3 rows continual, FOA reset); the long stream (2 x 4 rows)
        "regime_fashion": (5 * 3 + 3 + 2 * 3 * 3 * 3 + 2 * 3 * 3 + 2 * 3 + 3 + 9 + 4 * 4 + 2 * 4)
        * 3,
    }


# ----------------------------------------------------------------------------- the papers' configs


CONFIGS = Path(__file__).resolve().parent.parent / "benchmarks" / "configs"


def test_the_zoa_imagenet_c_config_runs_on_tiny_data_in_its_layouts(tmp_path, request, capsys):
    """benchmarks/configs/zoa_vit_b16_imagenet_c.yaml as shipped, on a tiny ImageNet-C tree and
    val folder, with a tiny timm ViT in place of ViT-B/16 (the only key a user would not
    change) on the CPU, Brevitas only: every other key is the config's own."""
    pytest.importorskip("brevitas")
    timm = vision("timm")
    tree = request.getfixturevalue("imagenet_tree")
    from PIL import Image

    for wnid, colour in (("n01440764", (250, 0, 0)), ("n01443537", (0, 0, 250))):
        (tmp_path / "val" / wnid).mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (8, 8), colour).save(tmp_path / "val" / wnid / f"v{k}.JPEG")
    kwargs = {"img_size": 16, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=2, **kwargs)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    overrides = [
        f"vars.imagenet_c={tree}",
        f"vars.imagenet={tmp_path}",
        f"vars.checkpoint={tmp_path / 'vit.pth'}",
        "model.spec=timm:vit_tiny_patch16_224",
        f"model.kwargs={json.dumps(kwargs)}",
        "model.transform={kind: timm, input_size: [3, 16, 16]}",
        "data.corruptions=[fog, contrast]",
        "data.num_workers=0",
        "calibration.num_workers=0",
        "calibration.n=4",
        "batch_size=3",
        "device=cpu",
        "backends=[brevitas]",
        f"cache={tmp_path / 'cache'}",
    ]
    out = tmp_path / "zoa.json"
    cfg = str(CONFIGS / "zoa_vit_b16_imagenet_c.yaml")
    assert main(["bench", cfg, *overrides, "--out", str(out), "-q", "--render"]) == 0
    text = capsys.readouterr().out
    results = bench.Results.load(out)
    assert [c["method"] for c in results.cells] == ["source", "tent", "foa", "zoa"]
    assert all(set(c["errors"]) == {"fog", "contrast"} for c in results.cells)
    assert all(c["images"] == 12 for c in results.cells)  # 2 corruptions x 2 wnids x 3 JPEGs
    assert results.select(method="foa")[0]["passes_per_batch"] > 2  # FOA's population
    assert "| zoa - foa    | ZOA against FOA" in text


@pytest.mark.slow  # 27-38 s of reconstruction; the CIFAR-10-C layout itself is read by default above
def test_the_ttaq_cifar10_c_config_runs_on_tiny_data_in_its_layouts(tmp_path, request, capsys):
    """benchmarks/configs/ttaq_resnet_cifar10_c.yaml as shipped (torchvision ResNet-18, W2A4,
    QDrop and TTAQ reconstructions, Tent and Tent + ABL), on tiny CIFAR-10-C .npy files and a
    tiny clean train folder; 2 reconstruction iterations instead of 20,000, the CPU, Brevitas."""
    pytest.importorskip("brevitas")
    tv = vision("torchvision")
    root = request.getfixturevalue("cifar_npy")[0]
    from PIL import Image

    for label in range(3):
        (tmp_path / "train" / str(label)).mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (32, 32), (80 * label, 40 * k, 10)).save(
                tmp_path / "train" / str(label) / f"{k}.png"
            )
    torch.manual_seed(0)
    torch.save(tv.models.resnet18(num_classes=10).state_dict(), tmp_path / "r18.pth")
    overrides = [
        f"vars.cifar10_c={root}",
        f"vars.cifar10_train={tmp_path}",
        f"vars.checkpoint={tmp_path / 'r18.pth'}",
        "data.corruptions=[fog, contrast]",
        "data.per_domain=6",
        "data.num_workers=0",
        "calibration.num_workers=0",
        "calibration.n=6",
        "calibration.batch_size=3",
        "reconstruct.qdrop.iters=2",
        "reconstruct.ttaq.iters=2",
        "batch_size=6",
        "device=cpu",
        "backends=[brevitas]",
        f"cache={tmp_path / 'cache'}",
    ]
    out = tmp_path / "ttaq.json"
    cfg = str(CONFIGS / "ttaq_resnet_cifar10_c.yaml")
    assert main(["bench", cfg, *overrides, "--out", str(out), "-q", "--render"]) == 0
    text = capsys.readouterr().out
    results = bench.Results.load(out)
    assert [(c["reconstruct"], c["method"]) for c in results.cells] == [
        (r, m) for r in ("qdrop", "ttaq") for m in ("source", "tent", "tent + abl")
    ]
    assert all(c["errors"].keys() == {"fog", "contrast"} for c in results.cells)
    assert results.cells[0]["reconstruct_seconds"] > 0  # reconstructed, then kept on disk
    assert "| ttaq + tent + abl - qdrop + tent " in text and "TTAQ's claim against QDrop" in text


def test_run_row_leaves_its_warmup_steps_out_of_the_time_ratios(qcnn, short_stream):
    """``warmup_steps`` leaves the first steps out of both clocks (torch.compile's compilations
    through a window take the first few updates), but not out of the errors; a bad value is
    refused before anything runs."""
    from qtta_plugins.bench.measure import run_row

    stream = [types.SimpleNamespace(x=b.x, y=b.y, domain=b.domain, round=0) for b in short_stream]
    slow_first = {"n": 0}

    class SlowFirst(torch.nn.Module):  # plain inference: the first two calls take 0.3 s more
        def forward(self, x):
            slow_first["n"] += 1
            if slow_first["n"] <= 2:
                time.sleep(0.3)
            return qcnn["w8a8"](x)

    one, _ = run_row(qcnn["w8a8"], stream, "source", plain_model=SlowFirst(), measure_memory=False)
    slow_first["n"] = 0
    two, _ = run_row(
        qcnn["w8a8"], stream, "source", plain_model=SlowFirst(), measure_memory=False,
        warmup_steps=2,
    )  # fmt: skip
    assert one["errors"] == two["errors"] and len(two["per_batch"]) == len(stream)
    # the second slow plain call is in the first run's sums, in neither of the second's
    assert one["total_time_ratio"] < 0.8 * two["total_time_ratio"]
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=r"warmup_steps must be an int >= 0"):
            run_row(qcnn["w8a8"], stream, "source", warmup_steps=bad)

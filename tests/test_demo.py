"""``qtta demo``: the tour of TTAQ, ZOA and RTF-Q, and the continual table behind ``--methods``."""

from __future__ import annotations

import json

import pytest
import torch

from qtta_plugins.app import cli, tour

pytest.importorskip("torchao")


@pytest.fixture(scope="module")
def short_tour(tmp_path_factory):
    """The whole tour on a short stream (20 images per corruption), with 2 reconstruction
    iterations and 2 bank steps: every part, every call, the files."""
    out = tmp_path_factory.mktemp("tour")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the demo's own count
    try:
        result = tour.run_tour(
            iters=2, bank_steps=2, per_domain=20, out_dir=out, progress=False, echo=False
        )
    finally:
        torch.set_num_threads(threads)  # the rest of this process's tests keep the suite's
    return result, out


def test_the_tour_has_each_part_and_its_rows(short_tour):
    result, _ = short_tour
    names = {(r.part, r.name) for r in result.rows}
    for expected in [
        ("TTAQ", "PTQ only + Tent"),
        ("TTAQ", "QDrop + Tent + ABL"),
        ("TTAQ", "TTAQ + Tent + ABL"),
        ("ZOA", "source (no adaptation)"),
        ("ZOA", "FOA"),
        ("ZOA", "ZOA"),
        ("RTF-Q", "float source model"),
    ]:
        assert expected in names
    ttaq = [r for r in result.rows if r.part == "TTAQ"]
    assert all(r.error is not None and r.error_dirichlet is not None for r in ttaq)
    # measured on this short tour: clean 96.6-97.4% at W4A4, Tent's rows 27.7-31.0% error against
    # 73.3% for the same W4A4 model without adaptation (chance: 90%)
    assert all(r.clean > 90 for r in ttaq), [(r.name, r.clean) for r in ttaq]
    source = next(r for r in result.rows if r.name == "source (no adaptation)")
    assert all(r.error < source.error - 20 for r in ttaq), [(r.name, r.error) for r in ttaq]
    # the table prints every row once, its parts in order
    table = result.table()
    assert all(r.name in table for r in result.rows)
    assert table.index("TTAQ") < table.index("ZOA ") < table.index("RTF-Q")


def test_the_zoa_part_measures_cost_against_plain_inference(short_tour):
    result, _ = short_tour
    ratio = {r.name: float(r.note.split("x plain")[0]) for r in result.rows if r.part == "ZOA"}
    # two forward passes against FOA's 28: the ratio must say so (measured in the same run)
    assert ratio["ZOA"] < ratio["FOA"] / 4
    assert ratio["source (no adaptation)"] < ratio["ZOA"]


def test_each_selected_subnet_fits_its_budget_and_matches_its_table_row(short_tour):
    result, _ = short_tour
    full = max(r["macs"] for r in result.frontier)
    assert len(result.selected) == len(tour.BUDGETS)
    for choice in result.selected:
        assert choice["macs"] <= choice["budget"] * full
        feasible = [r for r in result.frontier if r["macs"] <= choice["budget"] * full]
        assert choice["table"] == max(r["accuracy"] for r in feasible), "the most accurate"
        # the materialized backend model rounds as the bank does
        assert abs(choice["materialized"] - choice["table"]) <= 2.0


def test_the_summary_and_the_plots_are_written(short_tour):
    result, out = short_tour
    assert (out / "stream.png").stat().st_size > 10_000
    assert (out / "rtfq_frontier.png").stat().st_size > 10_000
    md = (out / "summary.md").read_text()
    assert md.count("\n") == len(result.rows) + 2
    figures = json.loads((out / "summary.json").read_text())
    assert len(figures["rows"]) == len(result.rows) and figures["backend"] == "torchao"


def test_qtta_demo_runs_the_tour_and_methods_runs_the_continual_table(monkeypatch, tmp_path):
    calls: list[tuple[str, dict]] = []
    monkeypatch.setattr(tour, "run_tour", lambda backend, **kw: calls.append(("tour", kw)))
    import qtta_plugins.app.demo as demo

    monkeypatch.setattr(demo, "run_demo", lambda **kw: calls.append(("continual", kw)))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "-q", "--iters", "7"]) == 0
    assert cli.main(["demo", "-q", "--methods", "source", "norm", "tent"]) == 0
    assert [c[0] for c in calls] == ["tour", "continual"]
    assert calls[0][1]["iters"] == 7 and calls[0][1]["out_dir"] == "qtta_demo_torchao"
    assert calls[0][1]["progress"] is False
    assert calls[1][1]["methods"] == ["source", "norm", "tent"]


@pytest.mark.slow
def test_the_demo_as_shipped(tmp_path):
    """The tour at its shipped settings (about 3 minutes on 2 cores): adaptation beats no
    adaptation on the continual stream, and the bank beats the unadapted source model."""
    torch.set_num_threads(2)
    result = tour.run_tour(out_dir=tmp_path, progress=False, echo=False)
    rows = {(r.part, r.name): r for r in result.rows}
    source = rows[("ZOA", "source (no adaptation)")].error
    for part, name in [("ZOA", "ZOA"), ("ZOA", "FOA"), ("TTAQ", "TTAQ + Tent + ABL")]:
        assert rows[(part, name)].error < source - 20
    full_budget = rows[("RTF-Q", "select_subnet(macs <= 100%)")].error
    assert full_budget < rows[("RTF-Q", "float source model")].error - 20


# --- prerequisites: checked before the demo starts ------------------------------------------------
def _pretend_installed(monkeypatch, missing: set[str]) -> None:
    """``importlib.util.find_spec`` answering as if exactly ``missing`` were not installed."""
    import importlib.machinery
    import importlib.util

    real = importlib.util.find_spec

    def find_spec(name, package=None):
        if name.split(".")[0] in missing:
            return None
        return real(name, package) or importlib.machinery.ModuleSpec(name, None)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.mark.parametrize("backend", ["torchao", "brevitas", "nncf"])
def test_the_prerequisite_check_passes_when_everything_is_there(monkeypatch, backend):
    from qtta_plugins.app import demo

    _pretend_installed(monkeypatch, set())
    assert demo.missing_prerequisites(backend) == []
    demo.check_prerequisites(backend)  # no error
    demo.check_prerequisites(backend, tour=False)


@pytest.mark.parametrize(
    ("backend", "missing", "named"),
    [
        ("torchao", {"torchao"}, ["torchao"]),
        ("brevitas", {"brevitas"}, ["brevitas"]),
        (
            "brevitas",
            {"onnx", "onnxoptimizer", "onnxscript"},
            ["onnx", "onnxoptimizer", "onnxscript"],
        ),
        ("nncf", {"nncf"}, ["nncf"]),
        ("nncf", {"torchao"}, ["torchao"]),  # nncf.strip's undeclared dependency
    ],
)
def test_a_missing_package_names_itself_and_the_extra_that_installs_it(
    monkeypatch, backend, missing, named
):
    from qtta_plugins.app import demo
    from qtta_plugins.errors import BackendNotInstalledError

    _pretend_installed(monkeypatch, missing)
    with pytest.raises(BackendNotInstalledError) as info:
        demo.check_prerequisites(backend)
    message = str(info.value)
    assert f"pip install 'qtta-plugins[{backend}]'" in message
    for name in named:
        assert name in message.split("(for")[0], f"{name} not named in: {message}"
    assert [p.module for p in demo.missing_prerequisites(backend)] == named


def test_the_continual_table_needs_no_export_packages(monkeypatch):
    """``--methods`` never exports: a Brevitas install without onnx runs it, and the tour's
    error says so."""
    from qtta_plugins.app import demo
    from qtta_plugins.errors import BackendNotInstalledError

    _pretend_installed(monkeypatch, {"onnx", "onnxscript"})
    demo.check_prerequisites("brevitas", tour=False)
    with pytest.raises(BackendNotInstalledError, match=r"--methods source norm tent"):
        demo.check_prerequisites("brevitas", tour=True)


def test_a_module_blocked_in_sys_modules_counts_as_missing(monkeypatch):
    """The check itself, not a patched finder: ``sys.modules[name] = None`` makes an import fail."""
    import sys

    from qtta_plugins.app import demo
    from qtta_plugins.errors import BackendNotInstalledError

    monkeypatch.setitem(sys.modules, "onnxoptimizer", None)
    with pytest.raises(BackendNotInstalledError, match=r"onnxoptimizer .*qtta-plugins\[brevitas\]"):
        demo.check_prerequisites("brevitas")


def test_an_unknown_backend_is_refused_before_anything_runs():
    from qtta_plugins.app import demo
    from qtta_plugins.errors import UnknownBackendError

    with pytest.raises(
        UnknownBackendError, match=r"unknown backend 'openvino'.*installed adapters"
    ):
        demo.check_prerequisites("openvino")
    with pytest.raises(UnknownBackendError, match="backend must be"):
        demo.check_prerequisites("")


@pytest.mark.parametrize("methods", [[], ["--methods", "source"]])
def test_qtta_demo_stops_at_once_with_the_pip_command(monkeypatch, capsys, methods):
    """Nothing is trained or loaded: the check runs before the first step of the tour and of the
    continual table."""
    import qtta_plugins.app.demo as demo

    def no_training(*args, **kwargs):
        raise AssertionError("the demo started before checking its prerequisites")

    monkeypatch.setattr(tour, "train_source_model", no_training)
    monkeypatch.setattr(demo, "train_source_model", no_training)
    _pretend_installed(monkeypatch, {"brevitas"})
    assert cli.main(["demo", "--backend", "brevitas", "-q", "--no-plot", *methods]) == 2
    err = capsys.readouterr().err
    assert "qtta: error:" in err and "pip install 'qtta-plugins[brevitas]'" in err


def test_each_backend_extra_installs_what_its_demo_needs():
    """pyproject.toml's extras against the demo's list: every package the demo checks for is in
    the extra its message names."""
    import re
    from pathlib import Path

    from qtta_plugins.app.demo import DEMO_PREREQUISITES

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    for backend, parts in DEMO_PREREQUISITES.items():
        for need in (p for part in parts.values() for p in part):
            names = {re.split(r"[<>=!~ \[;]", r, maxsplit=1)[0] for r in extras[need.extra]}
            assert need.module in names, f"extra [{need.extra}] lacks {need.module} ({backend})"

"""``qtta demo``: the tour of TTAQ, ZOA and RTF-Q, and the continual table behind ``--methods``."""

from __future__ import annotations

import json

import pytest
import torch

from qtta_plugins import cli, tour

pytest.importorskip("torchao")


@pytest.fixture(scope="module")
def short_tour(tmp_path_factory):
    """The whole tour on a short stream (20 images per corruption), with 2 reconstruction
    iterations and 2 bank steps: every part, every call, the files."""
    out = tmp_path_factory.mktemp("tour")
    torch.set_num_threads(2)
    result = tour.run_tour(
        iters=2, bank_steps=2, per_domain=20, out_dir=out, progress=False, echo=False
    )
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
    assert all(0 <= r.error <= 100 and 0 <= r.clean <= 100 for r in ttaq)
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
    import qtta_plugins.demo as demo

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

"""The baselines benchmark's report (benchmarks/baselines.py): paired differences, the collapse
verdicts on the long stream, and the tables, on synthetic cells (the runs themselves are long)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import baselines
import pytest


def cell(method: str, seed: int, error: float, setting: str = "continual", **extra) -> dict:
    return {
        "config": "torchao W8A8",
        "setting": setting,
        "method": method,
        "seed": seed,
        "error": error,
        "time_ratio": 2.0,
        **extra,
    }


def test_paired_differences_are_taken_seed_by_seed():
    # tent is 1 point below eata on every seed, while the seeds themselves differ by 10 points
    cells = [cell("tent", s, 30.0 + 10 * s) for s in range(3)]
    cells += [cell("eata", s, 31.0 + 10 * s) for s in range(3)]
    mean, sd, n = baselines.paired(cells, "torchao W8A8", "continual", "eata", "tent")
    assert (round(mean, 6), round(sd, 6), n) == (1.0, 0.0, 3)
    assert baselines.paired(cells, "torchao W8A8", "dirichlet", "eata", "tent") is None
    # a seed one method lacks is left out of the pairs
    cells.append(cell("eata", 3, 99.0))
    assert baselines.paired(cells, "torchao W8A8", "continual", "eata", "tent")[2] == 3


def long_cell(method: str, rounds: list[float]) -> dict:
    return cell(method, 0, sum(rounds) / len(rounds), "long", round_errors=rounds)


def test_collapse_verdicts_name_the_round():
    cells = [
        long_cell("source", [50.0] * 5),
        long_cell("tent", [30.0, 35.0, 45.0, 55.0, 80.0]),  # above source from round 4
        long_cell("sar", [30.0, 29.0, 30.5, 32.0, 33.0]),  # > 2 points above its best from round 4
        long_cell("eata", [30.0, 29.5, 30.5, 30.0, 29.0]),  # stable
    ]
    lines = baselines.collapse_lines(cells)
    assert lines[0].startswith("- tent: collapsed, above source from round 4")
    assert lines[1].startswith("- sar: degrades") and "from round 4" in lines[1]
    assert lines[2].startswith("- eata: stable")


def test_the_tables_show_seeds_and_the_targets():
    cells = [cell(m, s, e + s) for s in range(3) for m, e in [("source", 50.0), ("tent", 30.0)]]
    cells += [cell("norm", 0, 31.0)]
    text = baselines.markdown({"setup": "synthetic", "cells": cells})
    assert "| tent | 31.0 ± 1.0 · 2.0x |" in text
    assert "| norm | 31.0 (1 seed) · 2.0x |" in text
    assert "| continual | tent - source | beats source (< 0) | -20.0 ± 0.0 |" in text


def test_the_vit_report_merges_parts_and_pairs_zoa_with_foa():
    import zoa_vit

    setup = "vit setup"
    part = [
        dict(cell(m, s, e), config="torchao W6A6")
        for m, e in (("foa", 71.0), ("zoa", 67.0))
        for s in range(3)
    ]
    other = [dict(cell("source", s, 70.0), config="torchao W6A6") for s in range(3)]
    results = zoa_vit.merged([{"setup": setup, "cells": part}, {"setup": setup, "cells": other}])
    assert len(results["cells"]) == 9
    text = zoa_vit.markdown(results)
    assert "| zoa - foa | ZOA below FOA (paper: -5.0) | -4.0 ± 0.0 |" in text
    assert "| foa - source | FOA beats source (< 0) | +1.0 ± 0.0 |" in text
    with pytest.raises(SystemExit, match="different setups"):
        zoa_vit.merged([{"setup": "a", "cells": []}, {"setup": "b", "cells": []}])


def test_the_vit_report_keeps_the_dev_seed_out_of_the_means():
    import zoa_vit

    cells = [dict(cell("source", s, 70.0), config="torchao W6A6") for s in range(3)]
    cells.append(dict(cell("source", 4, 12.0), config="torchao W6A6"))
    cells.append(dict(cell("source", 3, 10.0), config="torchao W6A6"))
    text = zoa_vit.markdown({"setup": "s", "cells": cells})
    assert "| source | 70.0 ± 0.0 · 2.0x |" in text  # seeds 3 and 4 are not in the mean
    # but reported apart, seed by seed
    assert (
        "| torchao W6A6 | source | 3 | 10.0 | 2.0x |\n| torchao W6A6 | source | 4 | 12.0 |" in text
    )


def test_the_vit_plot_draws_the_headline_and_the_rounds(tmp_path):
    import zoa_vit

    cells = [
        {
            "config": c,
            "setting": "continual",
            "method": m,
            "seed": s,
            "error": 60.0 + s,
            "time_ratio": 2.0,
        }
        for c in zoa_vit.W6A6
        for m in zoa_vit.HEADLINE
        for s in (0, 1, 2)
    ]
    cells += [
        {
            "config": c,
            "setting": "long",
            "method": "zoa",
            "seed": 0,
            "error": 60.0,
            "time_ratio": 2.0,
            "round_errors": [60.0 + r for r in range(10)],
        }
        for c in zoa_vit.W6A6
    ]
    path = tmp_path / "vit.png"
    fig = zoa_vit.plot({"setup": "s", "cells": cells}, str(path))
    left, right = fig.axes
    assert len(left.patches) == len(zoa_vit.W6A6) * len(zoa_vit.HEADLINE)
    assert len(right.lines) == len(zoa_vit.W6A6)  # one ZOA curve per backend, no source rounds
    assert path.stat().st_size > 0

"""benchmarks/configs/ttaq_resnet18*.yaml, the TTAQ benchmark's plan as harness configs (the grid
they span, checked without running a cell), and the TTAQ table's paired target between
reconstruction rows on made-up cells (what benchmarks/ttaq_benchmark.py's report tested)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("omegaconf")

from qtta_plugins import bench
from qtta_plugins.bench.grid import cell_key, cell_spec, expand, method_config

CONFIGS = Path(__file__).resolve().parents[1] / "benchmarks" / "configs"


def grid(name: str) -> tuple[Any, list[Any]]:
    config = bench.load_config(CONFIGS / name)
    return config, expand(config)


@pytest.mark.parametrize(
    ("name", "bits", "iters", "ablated"),
    [
        ("ttaq_resnet18.yaml", "w2a4", 200, {"torchao"}),
        ("ttaq_resnet18_w4a4.yaml", "w4a4", 50, {"torchao", "brevitas"}),
    ],
)
def test_a_ttaq_config_spans_the_scripts_plan(name, bits, iters, ablated):
    config, cells = grid(name)
    backends = ("torchao", "brevitas", "nncf")
    low = [c for c in cells if c.bits == bits]
    floor = [c for c in cells if c.bits == "w8a8"]
    assert len(cells) == len(low) + len(floor)
    # min-max, QDrop and TTAQ x 4 adaptations x 2 streams x 3 backends x 3 seeds, and their clean
    # error; the ablations on their backends with Tent and Tent + ABL, and their clean error
    head = [c for c in low if c.reconstruct in ("min-max", "qdrop", "ttaq")]
    assert Counter(c.data for c in head) == {"iid": 216 // 2, "dirichlet": 216 // 2, "clean": 27}
    ablation = [c for c in low if c.reconstruct.startswith("ttaq -")]
    assert {c.backend for c in ablation} == ablated
    assert len(ablation) == len(ablated) * 3 * 3 * (2 * 2 + 1)
    assert {c.method for c in ablation if c.data != "clean"} == {"tent", "tent + abl"}
    assert {c.method for c in cells if c.data == "clean"} == {"source"}
    # the W8A8 floor: no reconstruction, every adaptation, every backend
    assert {c.reconstruct for c in floor} == {"min-max"}
    assert len(floor) == len(backends) * 3 * (4 * 2 + 1)
    # what the script did: the calibration drawn by the seed, the reconstruction seeded by it at
    # the plan's iterations, the methods at their config's seed 0, batch 64, 128 images a domain
    cell = next(
        c for c in low if c.reconstruct == "ttaq -pem" and c.seed == 2 and c.data == "dirichlet"
    )
    spec = cell_spec(config, cell)
    assert spec["calibration"]["n"] == 1024 and spec["calibration"]["seed"] == 2
    assert spec["reconstruct"]["iters"] == iters and spec["reconstruct"]["seed"] == 2
    assert spec["reconstruct"]["pem"] is False and spec["reconstruct"]["method"] == "ttaq"
    assert method_config(config, cell).seed == 0
    assert spec["batch_size"] == 64 and spec["data"]["n_test"] == 128
    assert spec["data"]["order"] == cell.data  # the i.i.d. and the Dirichlet streams


def test_the_two_configs_share_the_w8a8_floor_in_the_cache():
    keys = []
    for name in ("ttaq_resnet18.yaml", "ttaq_resnet18_w4a4.yaml"):
        config, cells = grid(name)
        keys.append({cell_key(cell_spec(config, c)) for c in cells if c.bits == "w8a8"})
    assert keys[0] == keys[1] and len(keys[0]) == 3 * 3 * (4 * 2 + 1)


def cell(rec: str, method: str, seed: int, error: float) -> dict[str, Any]:
    return {
        "data": "iid",
        "model": "resnet18",
        "backend": "torchao",
        "bits": "w2a4",
        "reconstruct": rec,
        "method": method,
        "setting": "continual",
        "seed": seed,
        "error": error,
        "errors": {"fog": error},
        "time_ratio": 2.0,
        "round_errors": None,
    }


def test_the_target_is_paired_seed_by_seed_between_reconstruction_rows():
    # TTAQ + Tent + ABL is 3.5 points below QDrop + Tent on every seed; the seeds differ by 10;
    # a seed that only one row has is left out of the pairs
    cells = [cell("qdrop", "tent", s, 40.0 + 10 * s) for s in range(3)]
    cells += [cell("ttaq", "tent + abl", s, 36.5 + 10 * s) for s in range(4)]
    config = {"tables": {"paired": [["ttaq + tent + abl", "qdrop + tent", "target"]], "digits": 1}}
    text = bench.markdown(bench.Results("ttaq", config, cells))
    assert "| ttaq + tent + abl - qdrop + tent | target | -3.5 ± 0.0: -3.5, -3.5, -3.5 |" in text
    assert "| qdrop + tent      | 50.0 ± 10.0 · 2.0x |" in text

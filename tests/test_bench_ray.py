"""``qtta bench`` on Ray: a small grid on a local Ray instance (2 CPUs) gives the sequential run's
results, into the same cache; without ray installed, ``--ray`` is an error naming the extra."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("omegaconf")

from qtta_plugins import bench
from qtta_plugins.app.cli import main
from qtta_plugins.bench import ray_runner

torch.set_num_threads(1)


def config(cache: Path, **changes: Any) -> dict[str, Any]:
    """Tent on 2 seeds (one cell for each of the 2 Ray workers) with the digits BN CNN at Brevitas
    W8A8 (the quickest to quantize in a fresh worker), 2 corruptions x 16 images, batch 8."""
    out = {
        "name": "ray",
        "data": {"source": "digits", "corruptions": ["gaussian_noise", "fog"], "per_domain": 16},
        "model": {"spec": "bncnn", "train": {"source": "digits"}},
        "calibration": {"n": 64, "batch_size": 32},
        "backends": ["brevitas"],
        "bits": ["w8a8"],
        "methods": {"tent": {}},
        "seeds": [0, 1],
        "batch_size": 8,
        "threads": 1,
        "measure": {"predictions": True},
        "cache": str(cache),
        "out": "",
    }
    out.update(changes)
    return out


def outcome(results: bench.Results) -> dict[str, tuple]:
    """What must not depend on where a cell ran: its errors and predictions, by cell key."""
    return {
        c["key"]: (c["error"], c["errors"], c["predictions"], c["predictions_sha256"])
        for c in results.cells
    }


@pytest.mark.slow  # starts a local Ray cluster: 18 s alone on 2 cores, over 60 s beside other work
def test_a_grid_on_local_ray_gives_the_sequential_results(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    pytest.importorskip("brevitas")
    here = bench.run(bench.load_config(config(tmp_path / "here")), progress=False, out="")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = bench.load_config(config(tmp_path / "ray"))
        results = bench.run(on_ray, progress=False, ray="local", out="")  # the session above
        assert len(results.cells) == 2
        assert outcome(results) == outcome(here)
        assert {c["environment"]["host"] for c in results.cells}  # recorded by the workers
        # the driver wrote every cell into the cache: a rerun, on Ray or not, computes nothing
        monkeypatch.setattr(ray_runner, "run_cells", lambda *a, **k: pytest.fail("ran again"))
        again = bench.run(on_ray, progress=False, ray="local", out="")
        assert outcome(again) == outcome(here)
    finally:
        ray.shutdown()


def test_ray_missing_is_an_error_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'qtta-plugins\[ray\]'"):
        ray_runner.import_ray()
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config(tmp_path / "cache", methods={"norm": {}}, seeds=[0])))
    assert main(["bench", str(cfg), "--ray", "auto", "-q"]) == 2
    assert "qtta-plugins[ray]" in capsys.readouterr().err

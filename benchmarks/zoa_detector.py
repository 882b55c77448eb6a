"""Why ZOA is better without its domain-change detector on the ViT stream (issue 14, part 2).

    python benchmarks/zoa_detector.py --out benchmarks/results/zoa_detector_vit.json

On ``zoa_vit.py``'s torchao W6A6 ViT and continual stream (15 corruptions at severity 5, batch 32),
ZOA with and without its detector, at the benchmark's 64 images per corruption (a domain lasts 2
batches) and at 256 (8 batches), seeds 0, 1, 2. Per cell: mean error and how often the detector
fired (the stream changes domain 14 times). When it fires, ZOA stores the domain in its bank and
restarts the output shift's running mean at the new batch's features; without the detector it
stores every ``store_period`` batches and the running mean never restarts. If the restarts are
what costs, the cost should shrink where domains last longer.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("QTTA_QUIET", "1")
os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import qtta_plugins  # noqa: E402
from qtta_plugins.data import load_source, to_channels  # noqa: E402
from qtta_plugins.models import train_source_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import load_or_start, mean_sd, save  # noqa: E402
from baselines import stream_for  # noqa: E402
from zoa_vit import quantized  # noqa: E402


def run_cell(model: torch.nn.Module, n_per_domain: int, seed: int, detector: bool) -> dict:
    stream = stream_for("continual", seed, n_per_domain, 32)
    torch.manual_seed(seed)
    start = time.perf_counter()
    run = qtta_plugins.adapt(model, None, "zoa", progress=False, detector=detector)
    for batch in stream:
        run.step(batch.x, batch.y, batch.domain)
    return {
        "n_per_domain": n_per_domain,
        "seed": seed,
        "detector": detector,
        "error": run.errors()["mean"],
        "firings": len(run.method.changes),
        "seconds": time.perf_counter() - start,
    }


def markdown(cells: list[dict]) -> str:
    lines = [
        "| images per corruption | ZOA error % | firings (14 changes) | ZOA without detector "
        "error % | stores without detector | without - with, paired |",
        "|---|---|---|---|---|---|",
    ]
    for n in sorted({c["n_per_domain"] for c in cells}):
        by = {(c["seed"], c["detector"]): c for c in cells if c["n_per_domain"] == n}
        seeds = sorted({s for s, d in by if (s, not d) in by})
        on = [by[s, True] for s in seeds]
        off = [by[s, False] for s in seeds]
        diff = [b["error"] - a["error"] for a, b in zip(on, off, strict=True)]
        lines.append(
            f"| {n} | {mean_sd([c['error'] for c in on])} | "
            f"{statistics.mean(c['firings'] for c in on):.1f} | "
            f"{mean_sd([c['error'] for c in off])} | "
            f"{statistics.mean(c['firings'] for c in off):.1f} | {mean_sd(diff)} "
            f"({' / '.join(f'{d:+.1f}' for d in diff)}) |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--n-per-domain", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/zoa_detector_vit.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = train_source_model(
        "timm-vit", "fashion-mnist", epochs=3, max_train=20000, lr=1e-3, progress=False
    )
    train, _ = load_source("fashion-mnist", n_test=2000, seed=0)
    calib = [to_channels(train.x[i : i + 64], 3) for i in range(0, 512, 64)]
    out = Path(args.out)
    setup = "zoa_vit.py's torchao W6A6 ViT, continual, batch 32, calibration 512"
    results = load_or_start(out, setup, {"cells": []})
    done = {(c["n_per_domain"], c["seed"], c["detector"]) for c in results["cells"]}
    qmodel = None
    for n in args.n_per_domain:
        for seed in args.seeds:
            for detector in (True, False):
                if (n, seed, detector) in done:
                    continue
                qmodel = qmodel or quantized(model, "torchao W6A6", calib)
                cell = run_cell(qmodel, n, seed, detector)
                results["cells"].append(cell)
                save(out, results)
                print(
                    f"{n} per domain, seed {seed}, detector {detector}: error "
                    f"{cell['error']:.1f}, firings {cell['firings']} ({cell['seconds']:.0f} s)",
                    flush=True,
                )
    print(markdown(results["cells"]), end="")


if __name__ == "__main__":
    main()

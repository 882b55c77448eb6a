"""FOA as its authors run it (issue 34): our ``foa`` against the authors' code, and which of the
differences between the two mattered.

    python benchmarks/foa_fidelity.py                   # our rows, cached cell by cell
    python benchmarks/foa_fidelity.py --render benchmarks/results/foa_fidelity.json \
        benchmarks/results/foa_fidelity_authors.json
    python benchmarks/foa_fidelity.py --model small --configs "torchao W8A8" --settings continual \
        --methods source foa "foa -squared" "foa -class token" "foa -best" "foa -shift" \
        "foa -zero start" "foa (old)" --out benchmarks/results/foa_fidelity_ablations_small.json

Model: a timm ``VisionTransformer`` (patch 4 on 32 px, 4 blocks of width 96, 3 heads, class
token) trained here on Fashion-MNIST (:func:`source_vit`, cached). Stream: three corruptions of
Fashion-MNIST-C at severity 5 (``STREAM_CORRUPTIONS``: the first of the noise, blur and weather
families), 2,000 test images each (class-stratified, drawn by the seed), batch 64 (about 31 batches
per domain), continual (one pass, no reset) or reset at each domain (as the authors' script runs
FOA: it resets after every corruption). Source statistics: 512 clean training images (the first of
the seed-0 split), through ``source_data=`` for every backend and ``float``.

Configurations: ``float`` is the model with every quantizer switched off (Brevitas' W8A8 model
with quantization disabled through the view: the float function, with our token insertion and
feature taps), then each backend at W8A8 and W6A6. Rows: ``foa`` (the defaults: the authors' form),
and ``foa`` with one difference put back to what our FOA did before (``-squared``: L2 norms instead
of squared errors; ``-class token``: all-token means at the layer inputs; ``-best``: predict with
the previous incumbent in a pass of its own; ``-shift``: the shift's EMA updated with the
predicting pass, current batch included; ``-zero start``: CMA-ES centred at the VPT prompt), and
``foa (old)`` with all five put back.

``--model small``: the ablation's model, the small timm ViT the test suite ships
(``tests/fixtures/vit-small-fashion-s0.pt``: 2 blocks of width 64, 80.3% clean), on the same three
corruptions at 1,280 images each (20 batches of 64 per domain) with 256 clean calibration images,
the stream on which ``tests/test_foa.py`` checks FOA against source. A fifth of the fidelity ViT's
cost per cell, so the six ablation rows run on 3 seeds.

Why a script and not a ``qtta bench`` config: its rows are compared with the authors' code, run
outside the repository, and its ``float`` configuration (every quantizer switched off through the
view) is not a backend of the harness; the measurement is the harness's own (``run_row``: the
errors, the paired per-batch time ratio) and so are its mean ± sd.

The authors' code is not part of this repository (its licence is non-commercial). docs/zoa.md
gives the procedure by which its figures in ``benchmarks/results/foa_fidelity_authors.json`` were
measured on the same model, source data and streams (:func:`stream_for`, :func:`calibration`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
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
from torch import nn  # noqa: E402

import qtta_plugins  # noqa: E402
from qtta_plugins.bench.cache import load_results_or_start, write_json_atomic  # noqa: E402
from qtta_plugins.bench.measure import run_row  # noqa: E402
from qtta_plugins.bench.tables import mean_sd  # noqa: E402
from qtta_plugins.data import cache_dir, load_source, make_stream, to_channels  # noqa: E402
from qtta_plugins.data.corruption import save_atomic  # noqa: E402
from qtta_plugins.models import accuracy, fit  # noqa: E402
from qtta_plugins.models.zoo import import_timm  # noqa: E402

#: the first corruption of the noise, blur and weather families, severity 5
STREAM_CORRUPTIONS = ("gaussian_noise", "defocus_blur", "fog")
PER_DOMAIN = 2000
BATCH_SIZE = 64
CALIB = 512
#: the ViT and its training recipe
VIT = {"embed_dim": 96, "depth": 4, "num_heads": 3, "mlp_ratio": 4.0, "patch_size": 4}
TRAINING = {"epochs": 15, "batch_size": 128, "lr": 1e-3, "seed": 0}


#: the other model (``--model small``): the suite's shipped small ViT and its stream
SMALL_VIT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "vit-small-fashion-s0.pt"
PROFILES = {
    "fidelity": {"per_domain": 2000, "calib": 512},
    "small": {"per_domain": 1280, "calib": 256},
}


def use_profile(name: str) -> None:
    """Switch the stream length and calibration size to ``name``'s (module-wide)."""
    global PER_DOMAIN, CALIB
    PER_DOMAIN, CALIB = PROFILES[name]["per_domain"], PROFILES[name]["calib"]


def small_vit() -> nn.Module:
    """The test suite's shipped small ViT (``tests/fixtures/make_source_model.py``)."""
    from qtta_plugins.models import build

    model = build("timm-vit", scale="small")
    model.load_state_dict(torch.load(SMALL_VIT, weights_only=True))
    return model.eval()


def build_vit() -> nn.Module:
    VisionTransformer = import_timm().models.vision_transformer.VisionTransformer
    return VisionTransformer(img_size=32, in_chans=3, num_classes=10, **VIT)


def source_vit(progress: bool | None = None) -> nn.Module:
    """The float ViT, trained on the clean Fashion-MNIST training split (cached by recipe)."""
    key = json.dumps([VIT, TRAINING], sort_keys=True)
    path = (
        Path(cache_dir())
        / "models"
        / (f"foa-fidelity-vit-{hashlib.sha1(key.encode()).hexdigest()[:10]}.pt")
    )
    torch.manual_seed(TRAINING["seed"])
    model = build_vit()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    train, _ = load_source("fashion-mnist", seed=0)
    fit(model, train, channels=3, progress=progress, **TRAINING)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(path, model.state_dict())
    return model


def calibration() -> list[torch.Tensor]:
    """The clean source batches: quantization's calibration, and FOA's source statistics."""
    train, _ = load_source("fashion-mnist", seed=0)
    return [to_channels(train.x[i : i + 64], 3) for i in range(0, CALIB, 64)]


def stream_for(setting: str, seed: int):
    return make_stream(
        setting,
        "fashion-mnist",
        corruptions=STREAM_CORRUPTIONS,
        per_domain=PER_DOMAIN,
        batch_size=BATCH_SIZE,
        seed=seed,
        channels=3,
        progress=False,
    )


#: the rows: method and options. Each "-X" row puts one step of our FOA before issue 34 back.
OLD = {
    "fitness": "norm",
    "features": "mean",
    "predict": "incumbent",
    "shift_update": "prediction",
    "cma_start": "prompt",
}
METHODS: dict[str, tuple[str, dict]] = {
    "source": ("source", {}),
    "foa": ("foa", {}),
    "foa -squared": ("foa", {"fitness": "norm"}),
    "foa -class token": ("foa", {"features": "mean"}),
    "foa -best": ("foa", {"predict": "incumbent"}),
    "foa -shift": ("foa", {"shift_update": "prediction"}),
    "foa -zero start": ("foa", {"cma_start": "prompt"}),
    "foa (old)": ("foa", dict(OLD)),
    "foa no shift": ("foa", {"shift": False}),
    "zoa": ("zoa", {}),
}
ABLATIONS = [m for m in METHODS if m.startswith("foa -") or m == "foa (old)"]
CONFIGS = (
    "float",
    *(f"{b} {w}" for w in ("W8A8", "W6A6") for b in ("torchao", "brevitas", "nncf")),
)
SETTINGS = ("continual", "reset")
AUTHORS = "authors' foa"


def quantized(model: nn.Module, config: str, calib: list[torch.Tensor]) -> nn.Module:
    """``config``'s model: a backend at a bit-width, or ``"float"``: Brevitas' W8A8 model with
    every quantizer switched off through the view (the float function, checked)."""
    if config == "float":
        qmodel = qtta_plugins.quantize(model, "brevitas", "w8a8", calib)
        for handle in qtta_plugins.quant_view(qmodel).quantizers():
            handle.enabled = False
        with torch.no_grad():
            torch.testing.assert_close(qmodel(calib[0]), model(calib[0]), atol=1e-5, rtol=1e-4)
        return qmodel
    backend, bits = config.split()
    return qtta_plugins.quantize(model, backend, bits.lower(), calib)


def run_cell(qmodel: nn.Module, setting: str, method: str, seed: int, calib) -> dict:
    name, options = METHODS[method]
    options = {**options, "seed": seed}
    if name in ("foa", "zoa"):
        options["source_data"] = calib
    torch.manual_seed(seed)
    stream = stream_for(setting, seed)
    start = time.perf_counter()
    r, _ = run_row(qmodel, stream, name, options)
    errors = {k: v for k, v in r["errors"].items() if k != "mean"}
    return {
        "error": r["errors"]["mean"],
        "domain_errors": errors,
        "time_ratio": r["time_ratio"],
        "passes_per_batch": r["passes_per_batch"],
        "seconds": time.perf_counter() - start,
    }


def setup_line(model: nn.Module, profile: str = "fidelity") -> str:
    _, test = load_source("fashion-mnist", seed=0)
    clean = accuracy(model, to_channels(test.x, 3), test.y)
    what = (
        "the test suite's small timm ViT (tests/fixtures/vit-small-fashion-s0.pt: 2 blocks of "
        "width 64)"
        if profile == "small"
        else f"timm ViT (patch 4, 4 blocks of width 96, 3 heads) trained on Fashion-MNIST "
        f"({TRAINING['epochs']} epochs, batch {TRAINING['batch_size']}, lr {TRAINING['lr']})"
    )
    return (
        f"{what}, float clean accuracy {clean:.1f}% (10,000 test images); stream: "
        f"{', '.join(STREAM_CORRUPTIONS)} at severity 5, {PER_DOMAIN} images each, batch "
        f"{BATCH_SIZE}; source statistics on {CALIB} clean training images"
    )


def paired(cells: list[dict], a: str, b: str, config: str, setting: str, config_b=None) -> list:
    """Per seed, row ``a`` minus row ``b`` (error, points), where both ran."""
    by = {(c["config"], c["setting"], c["method"], c["seed"]): c["error"] for c in cells}
    config_b = config_b or config
    return [
        by[(config, setting, a, s)] - by[(config_b, setting, b, s)]
        for s in sorted({c["seed"] for c in cells})
        if (config, setting, a, s) in by and (config_b, setting, b, s) in by
    ]


def _signed(values: list[float]) -> str:
    if not values:
        return ""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    n = "" if len(values) >= 3 else f" (n={len(values)})"
    return f"{statistics.mean(values):+.1f} ± {sd:.1f}{n}"


def markdown(results: dict) -> str:
    """The tables: errors per configuration x setting x row (mean ± sd over seeds), the fidelity
    pairs (ours - the authors' on the float model), and the ablations (row - foa)."""
    cells = results["cells"]
    out = [f"Setup: {results['setup']}", ""]
    configs = [c for c in (*CONFIGS,) if any(x["config"] == c for x in cells)]
    rows = [m for m in (AUTHORS, *METHODS) if any(x["method"] == m for x in cells)]
    out.append("| row | " + " | ".join(f"{c}, {s}" for c in configs for s in SETTINGS) + " |")
    out.append("|---" * (1 + len(configs) * len(SETTINGS)) + "|")
    for row in rows:
        vals = []
        for c in configs:
            for s in SETTINGS:
                v = [
                    x["error"]
                    for x in cells
                    if (x["config"], x["setting"], x["method"]) == (c, s, row)
                ]
                vals.append(mean_sd(v))
        out.append(f"| {row} | " + " | ".join(vals) + " |")
    out += ["", "Paired differences (error, points; negative: the first row is better):", ""]
    out.append("| difference | configuration | " + " | ".join(SETTINGS) + " |")
    out.append("|---|---|" + "---|" * len(SETTINGS))
    pairs = [("foa", AUTHORS, "float"), ("foa (old)", AUTHORS, "float")]
    pairs += [("foa", "source", c) for c in configs] + [("zoa", "foa", c) for c in configs]
    pairs += [(m, "foa", c) for c in configs for m in ABLATIONS]
    for a, b, c in pairs:
        vals = [
            _signed(paired(cells, a, b, c, s, "float" if b == AUTHORS else None)) for s in SETTINGS
        ]
        if any(vals):
            out.append(f"| {a} - {b} | {c} | " + " | ".join(vals) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", nargs="+", default=["float"], choices=CONFIGS)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--methods", nargs="+", default=["source", "foa"], choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="fidelity", choices=list(PROFILES))
    parser.add_argument("--out", default="benchmarks/results/foa_fidelity.json")
    parser.add_argument("--render", nargs="+", default=None, help="print the tables (merged)")
    args = parser.parse_args(argv)
    if args.render:
        files = [json.loads(Path(f).read_text()) for f in args.render]
        setups = {f["setup"] for f in files}
        if len(setups) != 1:
            sys.exit(f"these files hold different setups: {sorted(setups)}")
        print(markdown({"setup": setups.pop(), "cells": [c for f in files for c in f["cells"]]}))
        return
    torch.set_num_threads(args.threads)
    use_profile(args.model)
    model = small_vit() if args.model == "small" else source_vit(progress=False)
    calib = calibration()
    out = Path(args.out)
    results = load_results_or_start(out, setup_line(model, args.model), "cells")
    print(results["setup"], flush=True)
    done = {(c["config"], c["setting"], c["method"], c["seed"]) for c in results["cells"]}
    for config in args.configs:
        qmodel = None
        for seed in args.seeds:
            for setting in args.settings:
                for method in args.methods:
                    if (config, setting, method, seed) in done:
                        continue
                    qmodel = qmodel if qmodel is not None else quantized(model, config, calib)
                    cell = {"config": config, "setting": setting, "method": method, "seed": seed}
                    cell.update(run_cell(qmodel, setting, method, seed, calib))
                    results["cells"].append(cell)
                    write_json_atomic(out, results)
                    print(
                        f"{config:14s} {setting:9s} {method:18s} seed {seed}  error "
                        f"{cell['error']:5.1f}%  x{cell['time_ratio']:5.1f}  "
                        f"({cell['seconds']:5.0f} s)",
                        flush=True,
                    )
    print(markdown(results), end="")


if __name__ == "__main__":
    main()

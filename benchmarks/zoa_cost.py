"""What ZOA costs against plain inference, and what each way of doing less work saves (issue 15).

    python benchmarks/zoa_cost.py                          # every backend, every row, seeds 0 1 2
    python benchmarks/zoa_cost.py --torchao-form compiled --seeds 0 \
        --rows "zoa, two whole passes" "zoa, late norms + skip_converged" \
        --out benchmarks/results/zoa_cost_compiled.json     # convert_pt2e + torch.compile
    python benchmarks/zoa_cost.py --profile                # torch.profiler breakdown of a step
    python benchmarks/zoa_cost.py --render benchmarks/results/zoa_cost.json

Model: the torchvision ResNet-18 trained on Fashion-MNIST at 32 px (benchmarks/architectures.py's
recipe, cached), W8A8 by ``qtta_plugins.quantize``, batch 64, 2 threads. Stream: Fashion-MNIST-C,
the 15 corruptions at severity 5, continual, ``--n-per-domain`` images per corruption (16 batches
at the default 1024: domains long enough for adaptation to settle, as a device's weather or site
does); each seed draws its own images and corruption noise.

Rows: source (no adaptation: the ViT has no BN-adapt row), norm (BN-adapt), Tent, ZOA with two whole passes (``reuse_prefix=False``), ZOA whose second
pass starts at the first adapted norm (the default), that with ``skip_converged=True`` (and with
the settle rule's relative tolerance alone), and both with ``norm_layers="late"`` (the later half
of the middle blocks adapt: a longer reused prefix). Columns: mean error (mean +- sd over the
seeds for the ZOA rows in ``SEEDED_ROWS``, the first seed for the others), the share of batches
that ran one pass, and, at the first seed, time per batch as a ratio to plain inference of the
same quantized model (paired batch by batch in the same run: the median step, and the whole
stream's total, which is what a row that skips some updates costs on average) and the peak
resident memory over the row's start (one-off set-up included: benchmarks/step_memory.py measures
a step's own working memory). Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("QTTA_QUIET", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import qtta_plugins  # noqa: E402
from qtta_plugins.data import CORRUPTIONS, continual_stream, load_source, to_channels  # noqa: E402
from qtta_plugins.models import train_source_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoa_benchmark import run_row  # noqa: E402

ROWS = {
    "source": ("source", {}),
    "norm": ("norm", {}),
    "tent": ("tent", {}),
    # the authors' norms, every batch updated (the defaults before issue 15)
    "zoa, two whole passes": (
        "zoa",
        {"reuse_prefix": False, "norm_layers": "middle", "skip_converged": False},
    ),
    "zoa": ("zoa", {"norm_layers": "middle", "skip_converged": False}),
    "zoa + skip_converged": ("zoa", {"norm_layers": "middle", "skip_converged": True}),
    # the settle rule without its noise term (converge_z=0): the relative tolerance alone
    "zoa + skip_converged, tolerance only": (
        "zoa",
        {"norm_layers": "middle", "skip_converged": True, "converge_z": 0.0},
    ),
    "zoa, late norms": ("zoa", {"norm_layers": "late", "skip_converged": False}),
    "zoa, late norms + skip_converged": ("zoa", {"norm_layers": "late", "skip_converged": True}),
}
#: rows run on every seed (the comparison this benchmark makes); the others at the first seed
#: ("zoa, two whole passes" computes exactly what "zoa" does: tests/test_prefix.py)
RECIPES = {"timm-vit": {"lr": 1e-3}}  # as benchmarks/architectures.py trains them
SEEDED_ROWS = (
    "source",  # the gain over source is a seeded comparison too
    "zoa",
    "zoa + skip_converged",
    "zoa, late norms",
    "zoa, late norms + skip_converged",
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", nargs="+", default=None)
    parser.add_argument("--rows", nargs="+", default=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--corruptions", nargs="+", default=list(CORRUPTIONS))
    parser.add_argument("--n-per-domain", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--arch", default="resnet18", help="resnet18 (default), mobilenet_v2 or timm-vit"
    )
    parser.add_argument(
        "--torchao-form",
        choices=["prepared", "converted", "compiled"],
        default="prepared",
        help="torchao only: the pt2e fake-quant model (default), its convert_pt2e integer graph "
        "(qtta_torchao.export.convert), or that graph under torch.compile (weights not frozen)",
    )
    parser.add_argument("--out", default="benchmarks/results/zoa_cost.json")
    parser.add_argument("--render", default=None, help="print the markdown of a results file")
    parser.add_argument("--profile", action="store_true", help="torch.profiler breakdown only")
    args = parser.parse_args(argv)
    if args.render:
        print(markdown(json.loads(Path(args.render).read_text())), end="")
        return
    torch.set_num_threads(args.threads)
    backends = args.backends or [
        b for b in ("torchao", "brevitas", "nncf") if importlib.util.find_spec(b) is not None
    ]
    model = train_source_model(
        args.arch, "fashion-mnist", epochs=3, max_train=20000, **RECIPES.get(args.arch, {})
    )
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    train_set, _ = load_source("fashion-mnist")
    calib_x = to_channels(train_set.x[:512], 3)
    calib = [calib_x[i : i + 64] for i in range(0, 512, 64)]
    if args.profile:
        profile(backends, model, calib)
        return
    results = {"setup": {k: v for k, v in vars(args).items() if k != "render"}, "rows": {}}
    if args.torchao_form != "prepared":
        backends = ["torchao"]
    for backend in backends:
        qmodel = qtta_plugins.quantize(model, backend, "w8a8", calib)
        if args.torchao_form != "prepared":
            from qtta_torchao.export import convert

            qmodel = convert(qmodel)
        for seed in args.seeds:
            stream = continual_stream(
                "fashion-mnist",
                severity=5,
                corruptions=args.corruptions,
                batch_size=args.batch_size,
                n_test=args.n_per_domain,
                seed=seed,
                channels=3,
                progress=False,
            )
            for row in args.rows:
                if seed != args.seeds[0] and row not in SEEDED_ROWS:
                    continue
                method, options = ROWS[row]
                if method == "norm" and not has_bn:
                    continue  # BN-adapt needs batch norms (the ViT has layer norms)
                options = {**options, "seed": seed}
                if args.torchao_form == "compiled":
                    from qtta_torchao.export import compile_converted

                    # adapt a compiled copy in place; time plain inference on another compiled copy
                    target = compile_converted(qtta_plugins.copy_model(qmodel), freeze=False)
                    plain = compile_converted(qtta_plugins.copy_model(qmodel), freeze=False)
                    stats, run = run_row(
                        target, stream, method, options, inplace=True, plain_model=plain
                    )
                else:
                    stats, run = run_row(qmodel, stream, method, options)
                batches = len(stats["per_batch"])
                one_pass = getattr(run.method, "one_pass_batches", 0) / batches
                entry = results["rows"].setdefault(backend, {}).setdefault(row, {"errors": []})
                entry["errors"].append(stats["errors"]["mean"])
                entry.setdefault("one_pass_share", []).append(one_pass)
                if seed == args.seeds[0]:
                    entry["time_ratio"] = stats["time_ratio"]
                    entry["total_time_ratio"] = stats["total_time_ratio"]
                    entry["peak_extra_mb"] = stats["peak_extra_mb"]
                print(
                    f"{backend} seed {seed} {row:24s} error {stats['errors']['mean']:5.1f}  "
                    f"one pass {100 * one_pass:4.0f}%  median x{stats['time_ratio']:.2f}  "
                    f"total x{stats['total_time_ratio']:.2f}  +{stats['peak_extra_mb']:.0f} MB",
                    flush=True,
                )
                out = Path(args.out)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(results, indent=1))
    print(markdown(results), end="")


CATEGORIES = (  # aten op name fragments -> what the time is spent on
    ("fake-quantize", ("fake_quant", "quantize_per", "dequantize", "round", "clamp")),
    ("convolution", ("conv",)),
    ("linear", ("addmm", "linear", "matmul", "mm")),
    ("batch norm", ("batch_norm",)),
    ("statistics (mean / var / std)", ("mean", "var", "std", "sum")),
)


def profile(backends: list[str], model: torch.nn.Module, calib: list, steps: int = 4) -> None:
    """``torch.profiler`` breakdown of plain inference and of one ZOA step per backend: self CPU
    time of the aten ops by category, and the rest of the wall time (Python: hooks, the method's
    own bookkeeping, dispatch)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    stream = continual_stream(
        "fashion-mnist",
        severity=5,
        corruptions=["fog"],
        batch_size=64,
        n_test=64,
        channels=3,
        progress=False,
    )
    x = next(iter(stream)).x
    print(
        "| backend | step | wall (x plain) | "
        + " | ".join(c for c, _ in CATEGORIES)
        + " | other ops | outside ops |"
    )
    print("|---|---|---|" + "---|" * (len(CATEGORIES) + 2))
    for backend in backends:
        qmodel = qtta_plugins.quantize(model, backend, "w8a8", calib)
        plain = qtta_plugins.copy_model(qmodel).eval()
        run = qtta_plugins.adapt(qmodel, None, "zoa", progress=False)
        rows = {"plain": lambda plain=plain: plain(x), "zoa": lambda run=run: run.step(x)}
        walls = {}
        for name, fn in rows.items():
            with torch.no_grad():
                for _ in range(2):
                    fn()  # warm: lazy init, the prefix cache's probe
                with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                    start = time.perf_counter()
                    for _ in range(steps):
                        fn()
                    walls[name] = (time.perf_counter() - start) / steps
            shares = dict.fromkeys([c for c, _ in CATEGORIES] + ["other ops"], 0.0)
            for event in prof.key_averages():
                if not event.key.startswith("aten::"):
                    continue
                category = next(
                    (c for c, keys in CATEGORIES if any(k in event.key for k in keys)), "other ops"
                )
                shares[category] += event.self_cpu_time_total / 1e6 / steps
            outside = walls[name] - sum(shares.values())
            cells = " | ".join(f"{100 * v / walls[name]:.0f}%" for v in shares.values())
            print(
                f"| {backend} | {name} | {walls[name] / walls['plain']:.2f}x | {cells} | "
                f"{100 * max(outside, 0.0) / walls[name]:.0f}% |",
                flush=True,
            )


def markdown(results: dict) -> str:
    setup = results["setup"]
    seeds = setup["seeds"]
    lines = [
        f"{setup.get('arch', 'resnet18')}, W8A8"
        f"{'' if setup.get('torchao_form', 'prepared') == 'prepared' else ' (torchao ' + setup['torchao_form'] + ')'}"
        f", Fashion-MNIST-C ({len(setup['corruptions'])} corruptions x "
        f"{setup['n_per_domain']} images, severity 5, continual, batch {setup['batch_size']}), "
        f"{setup['threads']} threads; error mean +- sd over seeds {', '.join(map(str, seeds))}; "
        f"time and memory at seed {seeds[0]}.",
        "",
        "| backend | row | error % | one-pass batches | time / batch (median) | "
        "time / batch (stream total) | peak memory added |",
        "|---|---|---|---|---|---|---|",
    ]
    for backend, rows in results["rows"].items():
        for row, e in rows.items():
            sd = statistics.stdev(e["errors"]) if len(e["errors"]) > 1 else 0.0
            lines.append(
                f"| {backend} | {row} | {statistics.mean(e['errors']):.1f} +- {sd:.1f} | "
                f"{100 * statistics.mean(e['one_pass_share']):.0f}% | {e['time_ratio']:.2f}x | "
                f"{e['total_time_ratio']:.2f}x | {e['peak_extra_mb']:.0f} MB |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""ZOA's cost on torchao's integer graph, and where a ZOA step spends its time (issue 15).

Not a config: the harness has no torchao ``convert_pt2e`` / ``torch.compile`` model form, and a
``torch.profiler`` breakdown of one step is not a cell of a grid. The cost table itself (every
backend, every row, 3 seeds, on the fake-quant models) is ``benchmarks/configs/zoa_cost.yaml``.

    python benchmarks/zoa_cost.py --torchao-form compiled --seeds 0 \
        --rows "zoa, two whole passes" "zoa, late norms + skip_converged" \
        --out benchmarks/results/zoa_cost_compiled.json     # convert_pt2e + torch.compile
    python benchmarks/zoa_cost.py --profile                # torch.profiler breakdown of a step
    python benchmarks/zoa_cost.py --render benchmarks/results/zoa_cost.json

The model, calibration, stream and rows are ``zoa_cost.yaml``'s: the torchvision ResNet-18 trained
on Fashion-MNIST at 32 px (``--arch``: or the timm ViT), W8A8, batch 64, Fashion-MNIST-C at
severity 5, continual, ``--n-per-domain`` images per corruption, each method seeded with the
stream's seed. ``--torchao-form``: torchao's ``convert_pt2e`` integer graph
(``qtta_torchao.export.convert``), or that graph under ``torch.compile`` (weights not frozen; plain
inference timed on another compiled copy). Columns: mean error, the share of batches ZOA ran in one
pass, the time per batch as a ratio to plain inference of the same model (the harness's paired
per-batch ratio, ``qtta_plugins.bench.measure.run_row``: median step, and the stream's total) and
the peak memory of the loop (the kernel's high-water mark). ``--profile``: self CPU time of the
aten ops by category over a few steps of plain inference and of default ZOA on one batch, per
backend, and the step's time against plain inference paired batch by batch (``run_row`` on that
batch repeated). Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time
import warnings
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("QTTA_QUIET", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import qtta_plugins  # noqa: E402
from qtta_plugins.bench.cache import write_json_atomic  # noqa: E402
from qtta_plugins.bench.measure import run_row  # noqa: E402  (the harness's one time ratio)
from qtta_plugins.data import CORRUPTIONS, continual_stream, load_source, to_channels  # noqa: E402
from qtta_plugins.models import train_source_model  # noqa: E402

ROWS = {  # as benchmarks/configs/zoa_cost.yaml's methods
    "source": ("source", {}),
    "norm": ("norm", {}),
    "tent": ("tent", {}),
    "zoa, two whole passes": (
        "zoa",
        {"reuse_prefix": False, "norm_layers": "middle", "skip_converged": False},
    ),
    "zoa": ("zoa", {"norm_layers": "middle", "skip_converged": False}),
    "zoa + skip_converged": ("zoa", {"norm_layers": "middle", "skip_converged": True}),
    "zoa + skip_converged, tolerance only": (
        "zoa",
        {"norm_layers": "middle", "skip_converged": True, "converge_z": 0.0},
    ),
    "zoa, late norms": ("zoa", {"norm_layers": "late", "skip_converged": False}),
    "zoa, late norms + skip_converged": ("zoa", {"norm_layers": "late", "skip_converged": True}),
}
#: rows run on every seed; the others at the first seed (as zoa_cost.yaml's plan)
SEEDED_ROWS = (
    "source",
    "zoa",
    "zoa + skip_converged",
    "zoa, late norms",
    "zoa, late norms + skip_converged",
)
RECIPES = {"timm-vit": {"lr": 1e-3}}  # as benchmarks/architectures.py trains them


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", nargs="+", default=None, help="--profile only")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--corruptions", nargs="+", default=list(CORRUPTIONS))
    parser.add_argument("--n-per-domain", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arch", default="resnet18", help="resnet18 (default) or timm-vit")
    parser.add_argument(
        "--torchao-form",
        choices=["converted", "compiled"],
        default=None,
        help="torchao's convert_pt2e integer graph, or that graph under torch.compile",
    )
    parser.add_argument("--out", default="benchmarks/results/zoa_cost_compiled.json")
    parser.add_argument("--render", default=None, help="print the markdown of a results file")
    parser.add_argument("--profile", action="store_true", help="torch.profiler breakdown only")
    args = parser.parse_args(argv)
    if args.render:
        print(markdown(json.loads(Path(args.render).read_text())), end="")
        return
    if not args.profile and args.torchao_form is None:
        parser.error(
            "pass --torchao-form converted|compiled or --profile; the cost table on the fake-quant "
            "models is `qtta bench benchmarks/configs/zoa_cost.yaml`"
        )
    torch.set_num_threads(args.threads)
    model = train_source_model(
        args.arch, "fashion-mnist", epochs=3, max_train=20000, **RECIPES.get(args.arch, {})
    )
    train_set, _ = load_source("fashion-mnist")
    calib_x = to_channels(train_set.x[:512], 3)
    calib = [calib_x[i : i + 64] for i in range(0, 512, 64)]
    if args.profile:
        backends = args.backends or [
            b for b in ("torchao", "brevitas", "nncf") if importlib.util.find_spec(b) is not None
        ]
        profile(backends, model, calib)
        return
    integer_rows(args, model, calib)


def integer_rows(args: argparse.Namespace, model: torch.nn.Module, calib: list) -> None:
    """The rows on torchao's converted integer graph (eager or compiled), into ``args.out``."""
    from qtta_torchao.export import compile_converted, convert

    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    setup = {k: v for k, v in vars(args).items() if k not in ("render", "profile", "backends")}
    results = {"setup": {**setup, "backends": ["torchao"]}, "rows": {}}
    qmodel = convert(qtta_plugins.quantize(model, "torchao", "w8a8", calib))
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
                # adapt a compiled copy in place; time plain inference on another compiled copy
                target = compile_converted(qtta_plugins.copy_model(qmodel), freeze=False)
                plain = compile_converted(qtta_plugins.copy_model(qmodel), freeze=False)
                stats, run = run_row(
                    target, stream, method, options, inplace=True, plain_model=plain
                )
            else:
                stats, run = run_row(qmodel, stream, method, options)
            one_pass = getattr(run.method, "one_pass_batches", 0) / len(stats["per_batch"])
            entry = results["rows"].setdefault("torchao", {}).setdefault(row, {"errors": []})
            entry["errors"].append(stats["errors"]["mean"])
            entry.setdefault("one_pass_share", []).append(one_pass)
            if seed == args.seeds[0]:
                entry["time_ratio"] = stats["time_ratio"]
                entry["total_time_ratio"] = stats["total_time_ratio"]
                entry["peak_extra_mb"] = stats["peak_extra_mb"]
            print(
                f"torchao ({args.torchao_form}) seed {seed} {row:24s} error "
                f"{stats['errors']['mean']:5.1f}  one pass {100 * one_pass:4.0f}%  median "
                f"x{stats['time_ratio']:.2f}  total x{stats['total_time_ratio']:.2f}  "
                f"+{stats['peak_extra_mb']:.0f} MB",
                flush=True,
            )
            write_json_atomic(Path(args.out), results)
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
    time of the aten ops by category as a share of the wall time, the rest of the wall time
    (Python: hooks, the method's own bookkeeping, dispatch), and the step's time against plain
    inference as the harness measures it (``run_row`` on the same batch, paired step by step)."""
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
    batch = next(iter(stream))
    x = batch.x
    print(
        "| backend | step | wall (x plain) | "
        + " | ".join(c for c, _ in CATEGORIES)
        + " | other ops | outside ops |"
    )
    print("|---|---|---|" + "---|" * (len(CATEGORIES) + 2))
    for backend in backends:
        qmodel = qtta_plugins.quantize(model, backend, "w8a8", calib)
        # the time ratio: plain inference and a ZOA step, paired on the same batch (2 warm-up
        # batches: run_row leaves the first out, the second warms the prefix cache's probe)
        stats, _ = run_row(qmodel, [batch] * (steps + 2), "zoa", measure_memory=False)
        ratios = {"plain": 1.0, "zoa": stats["time_ratio"]}
        plain = qtta_plugins.copy_model(qmodel).eval()
        run = qtta_plugins.adapt(qmodel, None, "zoa", progress=False)
        rows = {"plain": lambda plain=plain: plain(x), "zoa": lambda run=run: run.step(x)}
        for name, fn in rows.items():
            with torch.no_grad():
                for _ in range(2):
                    fn()  # warm: lazy init, the prefix cache's probe
                with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                    start = time.perf_counter()
                    for _ in range(steps):
                        fn()
                    wall = (time.perf_counter() - start) * 1e6  # microseconds, as the profiler
            shares = dict.fromkeys([c for c, _ in CATEGORIES] + ["other ops"], 0.0)
            for event in prof.key_averages():
                if not event.key.startswith("aten::"):
                    continue
                category = next(
                    (c for c, keys in CATEGORIES if any(k in event.key for k in keys)), "other ops"
                )
                shares[category] += event.self_cpu_time_total
            outside = wall - sum(shares.values())
            cells = " | ".join(f"{100 * v / wall:.0f}%" for v in shares.values())
            print(
                f"| {backend} | {name} | {ratios[name]:.2f}x | {cells} | "
                f"{100 * max(outside, 0.0) / wall:.0f}% |",
                flush=True,
            )


def markdown(results: dict) -> str:
    setup = results["setup"]
    seeds = setup["seeds"]
    form = setup.get("torchao_form", "prepared")
    lines = [
        f"{setup.get('arch', 'resnet18')}, W8A8"
        f"{'' if form == 'prepared' else ' (torchao ' + form + ')'}"
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

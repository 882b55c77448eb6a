"""What adapting one image at a time costs on the device's terms (issue 38, part 3).

    python benchmarks/edge_cost.py                      # alone on the machine, 1 thread
    python benchmarks/edge_cost.py --render             # the table of the last run

For each model (the ResNet-18 and the timm ViT of benchmarks/configs/zoa_cost.yaml, W8A8, cached)
and each form it is deployed in (every backend's quantized model; torchao's ``convert_pt2e`` integer
graph, eager and through ``torch.compile``), each method runs over a stream of single images
through the default sliding window (``window=16``; on the ResNet-18 each way of normalising,
``WindowConfig.statistics``), and the harness's own measurement (``run_row``: each step timed
against plain single-image inference of the same model on the same image just before it) gives:

* ``per sample``: the median step over the median plain inference (a sample that is not an update:
  what the device waits for a prediction);
* ``amortised``: the stream's total step time over its total plain time (updates included: what
  the device spends on average);
* ``update``: the difference, the update's cost spread over the samples between two updates;
* ``peak MB``: the process's peak memory above what it held before the run (``PeakMemory``).

The first ``--warmup`` samples of each run (four updates of the window) are left out of the
ratios (``run_row(warmup_steps=...)``): torch.compile compiles lazily for batch 1, for the
window's batch and for each hook layout a method's update uses (ZOA's taps: the compiled graph
settles after its second update), and the first call of anything pays for set-up. Rows already in ``--out`` (same model, form and row) are
kept and not run again, so a run can be resumed or extended (``--models`` / ``--backends`` /
``--rows``); the setup recorded is the first run's.
The stream: Fashion-MNIST-C at severity 5, ``--per-domain`` images of each of ``--corruptions``,
one at a time, seed 0. Errors on so short a stream say nothing and are not reported.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import warnings
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("QTTA_QUIET", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import qtta_plugins  # noqa: E402
from qtta_plugins.bench.cache import write_json_atomic  # noqa: E402
from qtta_plugins.bench.measure import run_row  # noqa: E402  (the harness's one time ratio)
from qtta_plugins.data import continual_stream, load_source, to_channels  # noqa: E402
from qtta_plugins.models import train_source_model  # noqa: E402

RECIPES = {"resnet18": {}, "timm-vit": {"lr": 1e-3}}  # as zoa_cost.yaml trains them (cached)
#: (label, method, options, window) rows per model family; None: no window
ROWS = {
    "resnet18": [
        ("source", "source", {}, None),
        ("norm, window statistics", "norm", {}, {"length": 16, "statistics": "window"}),
        ("norm, global statistics", "norm", {}, {"length": 16, "statistics": "global"}),
        ("tent, window statistics", "tent", {}, {"length": 16, "statistics": "window"}),
        ("tent, global statistics", "tent", {}, {"length": 16, "statistics": "global"}),
        ("tent, source statistics", "tent", {}, {"length": 16, "statistics": "source"}),
        ("zoa, window statistics", "zoa", {}, {"length": 16, "statistics": "window"}),
        ("zoa, global statistics", "zoa", {}, {"length": 16, "statistics": "global"}),
        ("zoa, source statistics", "zoa", {}, {"length": 16, "statistics": "source"}),
        ("rotta", "rotta", {}, None),
        # updating four times less often (run with --warmup 256 --per-domain 256: four updates
        # to warm up, four timed)
        (
            "zoa, window statistics, every 64",
            "zoa",
            {},
            {"length": 16, "update_every": 64, "statistics": "window"},
        ),
        (
            "zoa, global statistics, every 64",
            "zoa",
            {},
            {"length": 16, "update_every": 64, "statistics": "global"},
        ),
    ],
    "timm-vit": [
        ("source", "source", {}, None),
        ("tent, each sample", "tent", {}, None),
        ("tent, window 16", "tent", {}, {"length": 16}),
        ("zoa, window 16", "zoa", {}, {"length": 16}),
        ("zoa, window 16, every 64", "zoa", {}, {"length": 16, "update_every": 64}),
    ],
}
FORWARD_ONLY = ("source", "norm", "zoa")  # what runs on a converted (integer) graph


def forms(model: torch.nn.Module, calib: list, backends: list[str]) -> dict[str, tuple]:
    """form name -> (model to adapt, model plain inference runs, adapt in place?)."""
    out = {}
    for backend in backends:
        q = qtta_plugins.quantize(model, backend, "w8a8", calib)
        out[backend] = (q, None, False)
        if backend == "torchao":
            from qtta_torchao.export import compile_converted, convert

            converted = convert(q)
            out["torchao converted"] = (converted, None, False)
            out["torchao compiled"] = (
                compile_converted(qtta_plugins.copy_model(converted), freeze=False),
                compile_converted(qtta_plugins.copy_model(converted), freeze=False),
                True,
            )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(ROWS))
    parser.add_argument("--backends", nargs="+", default=["torchao", "brevitas", "nncf"])
    parser.add_argument("--corruptions", nargs="+", default=["gaussian_noise", "fog"])
    parser.add_argument("--per-domain", type=int, default=96)
    parser.add_argument("--warmup", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", nargs="*", default=None, help="labels to run (default: all)")
    parser.add_argument("--out", default="benchmarks/results/edge_cost.json")
    parser.add_argument("--render", action="store_true")
    args = parser.parse_args(argv)
    if args.render:
        print(markdown(json.loads(Path(args.out).read_text())), end="")
        return
    torch.set_num_threads(args.threads)
    backends = [b for b in args.backends if importlib.util.find_spec(b) is not None]
    setup = {k: v for k, v in vars(args).items() if k not in ("render", "rows", "models")}
    results = {"setup": {**setup, "backends": backends, "torch": torch.__version__}, "rows": []}
    if Path(args.out).exists():
        results = json.loads(Path(args.out).read_text())
    done = {(r["model"], r["form"], r["row"]) for r in results["rows"]}
    train, _ = load_source("fashion-mnist")
    calib = [to_channels(train.x[i : i + 64], 3) for i in range(0, 512, 64)]

    def stream(n: int):
        return continual_stream(
            "fashion-mnist",
            severity=5,
            corruptions=tuple(args.corruptions),
            batch_size=1,
            n_test=n,
            seed=0,
            channels=3,
            progress=False,
        )

    for arch in args.models:
        model = train_source_model(
            arch, "fashion-mnist", epochs=3, max_train=20000, progress=False, **RECIPES[arch]
        )
        for form, (target, plain, inplace) in forms(model, calib, backends).items():
            for label, method, options, window in ROWS[arch]:
                if args.rows and label not in args.rows:
                    continue
                if form.startswith("torchao c") and method not in FORWARD_ONLY:
                    continue  # an integer graph has no gradients
                if (arch, form, label) in done:
                    continue
                window_config = None if window is None else qtta_plugins.WindowConfig(**window)
                kw = {"window": window_config, "plain_model": plain, "inplace": inplace}
                # one run: the first --warmup samples warm up (compilation for batch 1, for the
                # window's batch and for each hook layout the update uses) and are left out of
                # the ratios; a separate warm-up run would not do, as a new adaptation's hooks
                # make torch.compile compile again
                stats, run = run_row(
                    target, stream(args.per_domain), method, options, warmup_steps=args.warmup,
                    **kw,
                )  # fmt: skip
                row = {
                    "model": arch,
                    "form": form,
                    "row": label,
                    "method": method,
                    "window": window,
                    "statistics": getattr(run.method, "statistics", None),
                    "updates": getattr(run.method, "updates", None),
                    "samples": len(stats["per_batch"]),
                    "timed_samples": len(stats["per_batch"]) - args.warmup,
                    "per_sample": stats["time_ratio"],
                    "amortised": stats["total_time_ratio"],
                    "update": stats["total_time_ratio"] - stats["time_ratio"],
                    "plain_ms": 1000 * stats["plain_seconds"],
                    "peak_extra_mb": stats["peak_extra_mb"],
                    "memory_method": stats["memory_method"],
                }
                results["rows"].append(row)
                print(
                    f"{arch:9s} {form:18s} {label:26s} per sample x{row['per_sample']:.2f}  "
                    f"amortised x{row['amortised']:.2f}  +{row['peak_extra_mb']:.0f} MB  "
                    f"(plain {row['plain_ms']:.1f} ms)",
                    flush=True,
                )
                write_json_atomic(Path(args.out), results)
    print(markdown(results), end="")


def markdown(results: dict) -> str:
    s = results["setup"]
    lines = [
        f"Single images through a window of 16, W8A8, Fashion-MNIST-C severity 5 "
        f"({', '.join(s['corruptions'])}, {s['per_domain']} images each), {s['threads']} "
        f"thread(s), torch {s['torch']}; ratios to plain single-image inference of the same "
        "model, paired sample by sample in the same run (benchmarks/edge_cost.py)",
        "",
        "| model | form | row | per sample | amortised | update (amortised) | peak MB | plain ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        peak = "-" if r["peak_extra_mb"] is None else f"{r['peak_extra_mb']:.0f}"
        lines.append(
            f"| {r['model']} | {r['form']} | {r['row']} | {r['per_sample']:.2f}x | "
            f"{r['amortised']:.2f}x | {r['update']:+.2f}x | {peak} | {r['plain_ms']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

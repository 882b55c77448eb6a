"""Every adaptation method on every stream setting, on ResNet-18 / Fashion-MNIST-C (issue 17).

    python benchmarks/baselines.py                    # the published plan (docs/baselines.md)
    python benchmarks/baselines.py --render benchmarks/results/baselines.json
    python benchmarks/baselines.py --plot docs/baselines_long.png

Model: the torchvision ResNet-18 of the architectures page, trained on Fashion-MNIST at 32 px
(``train_source_model("resnet18", "fashion-mnist", epochs=3, max_train=20000)``, cached),
quantized by our ``quantize`` on 512 clean training images (first / last layer at 8 bit, the
calibration images kept so that EATA's Fisher term has its source sample). Each configuration of
:data:`CONFIGS` is one backend at one bit-width, so a table row is one backend, and the three
backends and both bit-widths appear.

Stream (``qtta_plugins.data.make_stream``): the 15 corruptions at severity 5, ``--n-per-domain``
test images per corruption (a seeded, class-stratified subset of the test split), batch
``--batch-size``. A seed draws that subset, the corruptions' noise, the order within domains and
the methods' own randomness (``torch.manual_seed``); the source model and its quantization are
the same for every seed, so the spread is that of the stream and the methods. Every method runs
with its defaults (chosen on the digits dev stream or taken from its paper, never on this stream).

Per cell (configuration, setting, method, seed): mean error over domains (%) and time per batch as a ratio to plain inference of the same quantized model, paired batch
by batch in the same run (``zoa_benchmark.run_row``: ``model(x)`` on a copy just before each
step). The long setting also keeps the error of every round and every batch (``--plot``).

Cells are cached in the results JSON: a rerun computes only those it lacks, so the plan can be run
piecewise (``--configs`` / ``--settings`` / ``--methods`` / ``--seeds`` narrow it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("QTTA_QUIET", "1")
os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import qtta_plugins  # noqa: E402
from qtta_plugins.data import load_source, make_stream, to_channels  # noqa: E402
from qtta_plugins.models import accuracy, train_source_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import load_or_start, save  # noqa: E402
from zoa_benchmark import round_errors, run_row  # noqa: E402

#: configuration -> (backend, bits)
CONFIGS = {
    "torchao W8A8": ("torchao", "w8a8"),
    "Brevitas W4A4": ("brevitas", "w4a4"),
    "NNCF W4A4": ("nncf", "w4a4"),
}
#: row -> (adapt method, options)
METHODS = {
    "source": ("source", {}),
    "norm": ("norm", {}),
    "tent": ("tent", {}),
    "eata": ("eata", {}),
    "sar": ("sar", {}),
    "cotta": ("cotta", {}),
    "rotta": ("rotta", {}),
    "foa": ("foa", {}),
    # FOA's image prompt (our design for CNNs) with each step as our FOA had it before issue 34
    # (benchmarks/foa_fidelity.py: L2-norm fitness, the prediction from the incumbent's pass, the
    # shift's EMA with this batch in it, CMA-ES centred at the prompt)
    "foa (old)": (
        "foa",
        {
            "fitness": "norm",
            "predict": "incumbent",
            "shift_update": "prediction",
            "cma_start": "prompt",
        },
    ),
    "zoa": ("zoa", {}),
    "tent + abl": ("tent", {"abl": True}),
    "eata + abl": ("eata", {"abl": True}),
    "cotta + abl": ("cotta", {"abl": True}),
    # diagnostics (docs/baselines.md, "why"): CoTTA without its augmentation averaging, and with
    # the student predicting (no mean teacher), where ABL acts on the predicting model directly
    "cotta -augment": ("cotta", {"augment": False}),
    "cotta -teacher": ("cotta", {"mean_teacher": False}),
    "cotta -teacher + abl": ("cotta", {"mean_teacher": False, "abl": True}),
}
BASE = ["source", "norm", "tent", "eata", "sar", "cotta", "rotta", "zoa"]
ABL = ["tent + abl", "eata + abl", "cotta + abl"]
#: the published plan: (configurations, settings, methods, seeds). FOA (28 forward passes a
#: batch) runs on the continual stream only; the ABL variants on the class-imbalanced stream,
#: where ABL is meant to help. The four further settings run on the default configuration
#: (torchao, W8A8); the long and gradual streams (10 and 9 times the batches) on one seed.
PLAN = [
    (list(CONFIGS), ["continual"], [*BASE, "foa"], [0, 1, 2]),
    (list(CONFIGS), ["dirichlet"], [*BASE, *ABL], [0, 1, 2]),
    (["torchao W8A8"], ["reset", "mixed"], BASE, [0, 1, 2]),
    (["torchao W8A8"], ["gradual", "long"], BASE, [0]),
    # FOA's image prompt re-checked with the authors' fitness, prediction and shift (issue 34)
    (["torchao W8A8"], ["continual", "reset"], ["source", "foa", "foa (old)", "zoa"], [0, 1, 2]),
    # diagnostics of docs/baselines.md's "why" (not yet run; cheap: torchao only)
    (["torchao W8A8"], ["continual"], ["cotta -augment"], [0, 1, 2]),
    (["torchao W8A8"], ["dirichlet"], ["cotta -teacher", "cotta -teacher + abl"], [0, 1, 2]),
]
SETTINGS = ["continual", "dirichlet", "reset", "mixed", "gradual", "long"]


def stream_for(setting: str, seed: int, n_per_domain: int, batch_size: int):
    return make_stream(
        setting,
        "fashion-mnist",
        batch_size=batch_size,
        n_test=n_per_domain,
        seed=seed,
        channels=3,
        progress=False,
    )


def quantized(model: torch.nn.Module, config: str, calib: list[torch.Tensor]) -> torch.nn.Module:
    backend, bits = CONFIGS[config]
    return qtta_plugins.quantize(model, backend, bits, calib, keep_calibration_sample=True)


def summarize(cells: list[dict], key: str = "error") -> dict[tuple[str, str, str], tuple]:
    """(config, setting, method) -> (mean, sd, n) of ``key`` over seeds."""
    groups: dict[tuple[str, str, str], list[float]] = {}
    for c in cells:
        groups.setdefault((c["config"], c["setting"], c["method"]), []).append(c[key])
    return {
        k: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
        for k, v in groups.items()
    }


def _fmt(s: tuple | None, digits: int = 1) -> str:
    if s is None:
        return ""
    mean, sd, n = s
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if n > 1 else f"{mean:.{digits}f} (1 seed)"


def markdown(results: dict) -> str:
    cells = results["cells"]
    err, ratio = summarize(cells), summarize(cells, "time_ratio")
    methods = [m for m in METHODS if any(c["method"] == m for c in cells)]
    lines = [results["setup"], ""]
    for setting in [s for s in SETTINGS if any(c["setting"] == s for c in cells)]:
        configs = [k for k in CONFIGS if (k, setting, "source") in err]
        lines += [
            f"**{setting}**: error % (mean ± sd over seeds) · time per batch as a ratio to plain "
            "inference (mean over seeds)",
            "",
            "| method | " + " | ".join(configs) + " |",
            "|---|" + "---|" * len(configs),
        ]
        for m in methods:
            if not any((k, setting, m) in err for k in configs):
                continue
            row = [
                f"{_fmt(err[(k, setting, m)])} · {ratio[(k, setting, m)][0]:.1f}x"
                if (k, setting, m) in err
                else ""
                for k in configs
            ]
            lines.append(f"| {m} | " + " | ".join(row) + " |")
        lines.append("")
    lines += target_lines(cells)
    long = [c for c in cells if c["setting"] == "long"]
    if long:
        rounds = len(long[0]["round_errors"])
        lines += [
            f"**long**, error % in each round ({long[0]['config']}, seed {long[0]['seed']})",
            "",
            "| method | " + " | ".join(str(r + 1) for r in range(rounds)) + " | last - first |",
            "|---|" + "---|" * (rounds + 1),
        ]
        for c in long:
            e = c["round_errors"]
            lines.append(
                f"| {c['method']} | "
                + " | ".join(f"{x:.1f}" for x in e)
                + f" | {e[-1] - e[0]:+.1f} |"
            )
        lines += ["", *collapse_lines(long), ""]
    return "\n".join(lines)


def paired(cells: list[dict], config: str, setting: str, a: str, b: str) -> tuple | None:
    """Mean, sd and n over seeds of error(a) - error(b), seed by seed (the same stream)."""
    by = {
        (c["method"], c["seed"]): c["error"]
        for c in cells
        if c["config"] == config and c["setting"] == setting
    }
    diffs = [by[(a, s)] - by[(b, s)] for (m, s) in by if m == a and (b, s) in by]
    if not diffs:
        return None
    return (
        statistics.mean(diffs),
        statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
        len(diffs),
    )


def _signed(d: tuple) -> str:
    return f"{d[0]:+.1f} ± {d[1]:.1f}" + (f" (n={d[2]})" if d[2] < 3 else "")


def target_lines(cells: list[dict]) -> list[str]:
    """Issue 17's targets as paired differences (seed by seed on the same stream), in points."""
    configs = [k for k in CONFIGS if any(c["config"] == k for c in cells)]
    checks = [
        ("continual", m, "source", "beats source (< 0)")
        for m in METHODS
        if m != "source" and "abl" not in m and "-" not in m
    ]
    checks += [
        ("continual", "tent", "norm", "what Tent's gradient step adds to BN statistics"),
        ("continual", "eata", "tent", "EATA at or below Tent (<= 0)"),
        ("continual", "sar", "tent", "SAR at or below Tent (<= 0)"),
        ("dirichlet", "cotta + abl", "cotta", "ABL lowers CoTTA (< 0)"),
        ("dirichlet", "eata + abl", "eata", "ABL inside EATA"),
        ("dirichlet", "tent + abl", "tent", "ABL inside Tent"),
        ("continual", "cotta -augment", "cotta", "what the augmentation averaging costs"),
        ("dirichlet", "cotta -teacher + abl", "cotta -teacher", "ABL when the student predicts"),
    ]
    rows = []
    for setting, a, b, what in checks:
        d = [paired(cells, k, setting, a, b) for k in configs]
        if any(x is not None for x in d):
            cols = " | ".join(_signed(x) if x is not None else "" for x in d)
            rows.append(f"| {setting} | {a} - {b} | {what} | {cols} |")
    if not rows:
        return []
    return [
        "**targets**: error difference in points, paired seed by seed (mean ± sd over seeds)",
        "",
        "| setting | difference | target | " + " | ".join(configs) + " |",
        "|---|---|---|" + "---|" * len(configs),
        *rows,
        "",
    ]


def collapse_lines(long: list[dict]) -> list[str]:
    """Which methods collapse on the long stream, and from which round.

    A method has collapsed in a round where its error is above the source model's in that round
    (adapting then does worse than not adapting); it degrades where its error rises more than 2
    points above its best round and is still so in the last round.
    """
    source = next((c["round_errors"] for c in long if c["method"] == "source"), None)
    out = []
    for c in long:
        if c["method"] == "source":
            continue
        e = c["round_errors"]
        worse = [r for r, x in enumerate(e) if source is not None and x > source[r]]
        best = min(range(len(e)), key=e.__getitem__)
        # a lasting rise: the last round more than 2 points above the best one
        rising = [r for r in range(best + 1, len(e)) if e[r] > e[best] + 2.0]
        rising = rising if e[-1] > e[best] + 2.0 else []
        if worse:
            out.append(f"- {c['method']}: collapsed, above source from round {worse[0] + 1}")
        elif rising:
            out.append(
                f"- {c['method']}: degrades, more than 2 points above its best round "
                f"({best + 1}, {e[best]:.1f}%) from round {rising[0] + 1} "
                f"(last {e[-1]:.1f}%)"
            )
        else:
            out.append(f"- {c['method']}: stable (last round {e[-1] - e[0]:+.1f} vs first)")
    return out


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    long = [c for c in results["cells"] if c["setting"] == "long"]
    if not long:
        sys.exit("no long-stream cells to plot")
    fig, ax = plt.subplots(figsize=(9, 4.5))
    window = 15  # batches: half a round of 15 domains x 2 batches
    for c in long:
        wrong = [e / n for _, _, e, n in c["per_batch"]]
        smooth = [
            100 * statistics.mean(wrong[max(0, i - window + 1) : i + 1]) for i in range(len(wrong))
        ]
        ax.plot(smooth, label=c["method"], lw=1.2)
    per_round = len(long[0]["per_batch"]) // len(long[0]["round_errors"])
    for r in range(1, len(long[0]["round_errors"])):
        ax.axvline(r * per_round, color="0.85", lw=0.6, zorder=0)
    ax.set_xlabel("batch (grey lines: rounds of the 15 corruptions)")
    ax.set_ylabel(f"error % (running mean of {window} batches)")
    ax.set_title(f"Long stream, {long[0]['config']}, ResNet-18 on Fashion-MNIST-C, seed 0")
    ax.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def run_plan(
    plan: list,
    args: argparse.Namespace,
    model: torch.nn.Module,
    calib: list[torch.Tensor],
    quantize: Callable[[torch.nn.Module, str, list[torch.Tensor]], torch.nn.Module],
    methods: dict[str, tuple[str, dict]],
    results: dict,
    out: Path,
    keep_per_batch: bool = False,
) -> None:
    """Every (configuration, setting, method, seed) cell of ``plan`` that ``results`` lacks and
    ``args`` (``configs`` / ``settings`` / ``methods`` / ``seeds``) selects: run, append, save.

    ``quantize(model, config, calib)`` makes a configuration's model (once); the long setting also
    keeps each round's error (and, with ``keep_per_batch``, every batch's, for the plot)."""
    done = {(c["config"], c["setting"], c["method"], c["seed"]) for c in results["cells"]}
    models: dict[str, torch.nn.Module] = {}
    for configs, settings, names, seeds in plan:
        for config in [c for c in configs if args.configs is None or c in args.configs]:
            for setting in [s for s in settings if args.settings is None or s in args.settings]:
                for seed in [s for s in seeds if args.seeds is None or s in args.seeds]:
                    todo = [
                        m
                        for m in names
                        if (args.methods is None or m in args.methods)
                        and (config, setting, m, seed) not in done
                    ]
                    if not todo:
                        continue
                    if config not in models:
                        models[config] = quantize(model, config, calib)
                    stream = stream_for(setting, seed, args.n_per_domain, args.batch_size)
                    for name in todo:
                        method, options = methods[name]
                        torch.manual_seed(seed)
                        start = time.perf_counter()
                        r, _ = run_row(models[config], stream, method, options)
                        cell = {
                            "config": config,
                            "setting": setting,
                            "method": name,
                            "seed": seed,
                            "error": r["errors"]["mean"],
                            "time_ratio": r["time_ratio"],
                            "seconds": time.perf_counter() - start,
                        }
                        if setting == "long":
                            cell["round_errors"] = round_errors(r["per_batch"], stream.rounds)
                            if keep_per_batch:
                                cell["per_batch"] = r["per_batch"]
                        results["cells"].append(cell)
                        done.add((config, setting, name, seed))
                        print(
                            f"{config:14s} {setting:9s} {name:18s} seed {seed}  error "
                            f"{cell['error']:5.1f}%  time x{cell['time_ratio']:5.2f}  "
                            f"({cell['seconds']:5.1f} s)",
                            flush=True,
                        )
                        save(out, results)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS))
    parser.add_argument("--settings", nargs="+", default=None, choices=SETTINGS)
    parser.add_argument("--methods", nargs="+", default=None, choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--n-per-domain", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--calib", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/baselines.json")
    parser.add_argument("--render", default=None, help="print the tables of a results file")
    parser.add_argument("--plot", default=None, help="draw the long stream to this PNG")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.render:
        print(markdown(json.loads(Path(args.render).read_text())), end="")
        return
    if args.plot:
        plot(json.loads(out.read_text()), args.plot)
        return

    torch.set_num_threads(args.threads)
    model = train_source_model("resnet18", "fashion-mnist", epochs=3, max_train=20000)
    train, test = load_source("fashion-mnist", n_test=2000, seed=0)
    calib = [to_channels(train.x[i : i + 64], 3) for i in range(0, args.calib, 64)]
    setup = (
        "ResNet-18 on Fashion-MNIST-C (32 px, RGB-replicated), 15 corruptions at severity 5, "
        f"{args.n_per_domain} images per corruption, batch {args.batch_size}; "
        f"calibration {args.calib} clean training images; "
        f"float clean accuracy {accuracy(model, to_channels(test.x, 3), test.y):.1f}% "
        f"({len(test.x)} test images)"
    )
    results = load_or_start(out, setup, {"cells": []})
    print(setup, flush=True)
    run_plan(PLAN, args, model, calib, quantized, METHODS, results, out, keep_per_batch=True)
    print(markdown(results), end="")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

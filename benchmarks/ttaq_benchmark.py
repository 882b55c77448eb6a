"""TTAQ against min-max PTQ and BRECQ/QDrop, each followed by Tent, on Fashion-MNIST-C (issue 5).

    python benchmarks/ttaq_benchmark.py                      # the published table (docs/ttaq.md)
    python benchmarks/ttaq_benchmark.py --quick              # digits-C, 2 domains: a smoke run

Source model: ``train_source_model("bncnn", "fashion-mnist", epochs=4)`` (a small BN ResNet).
Calibration: ``--calib`` clean training images (1024 by default). For each backend and bit-width,
the PTQ variants are built once: min-max (``qtta_plugins.quantize``), ``qdrop`` (BRECQ with QDrop),
``ttaq`` and its ablations (PEM / PCR / L_logits off, one at a time). Each is reported with its clean
test accuracy and its reconstruction time, then adapted with Tent (and Tent + ABL) on two continual
streams of the 15 corruptions at severity 5: the i.i.d. order and the class-imbalanced
(Dirichlet, delta = 0.1) order. Results go to a JSON file; ``--render`` prints the markdown tables.

``--setting NAME`` runs another stream setting of ``qtta_plugins.data.make_stream`` (reset,
gradual, mixed, long: each in both orders; dirichlet: that order only); ``--reset-every N`` restarts
Tent from the PTQ model every N batches (the RDumb baseline). Both enter the results' setup line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
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
from qtta_plugins.data import SETTINGS, load_source, make_stream  # noqa: E402
from qtta_plugins.models import accuracy, train_source_model  # noqa: E402

#: PTQ variant -> (reconstruction method or None for min-max, options)
PTQ = {
    "min-max": (None, {}),
    "qdrop": ("qdrop", {}),
    "ttaq": ("ttaq", {}),
    "ttaq -pem": ("ttaq", {"pem": False}),
    "ttaq -pcr": ("ttaq", {"pcr": False}),
    "ttaq -logits": ("ttaq", {"logits": False}),
}
#: table row -> (PTQ variant, Tent options)
ROWS = {
    "min-max + Tent": ("min-max", {}),
    "BRECQ/QDrop + Tent": ("qdrop", {}),
    "BRECQ/QDrop + Tent + ABL": ("qdrop", {"abl": True}),
    "TTAQ + Tent": ("ttaq", {}),
    "TTAQ + Tent + ABL": ("ttaq", {"abl": True}),
    "TTAQ -PEM + Tent + ABL": ("ttaq -pem", {"abl": True}),
    "TTAQ -PCR + Tent + ABL": ("ttaq -pcr", {"abl": True}),
    "TTAQ -L_logits + Tent + ABL": ("ttaq -logits", {"abl": True}),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", nargs="+", default=["brevitas", "torchao"])
    parser.add_argument("--bits", nargs="+", default=["w2a4", "w4a4"])
    parser.add_argument("--rows", nargs="+", default=list(ROWS))
    parser.add_argument("--calib", type=int, default=1024, help="calibration images")
    parser.add_argument("--iters", type=int, default=1000, help="reconstruction iterations/block")
    parser.add_argument("--n-per-domain", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--setting", default="continual", choices=SETTINGS, help="stream setting (make_stream)"
    )
    parser.add_argument(
        "--reset-every", type=int, default=None, metavar="N", help="restart every N batches"
    )
    parser.add_argument("--quick", action="store_true", help="digits-C, two domains, 100 iters")
    parser.add_argument("--out", default="benchmarks/results/ttaq.json")
    parser.add_argument("--render", default=None, help="print the tables of a results file")
    parser.add_argument(
        "--append",
        action="store_true",
        help="add to --out's rows (same setup) instead of replacing",
    )
    args = parser.parse_args(argv)
    if args.render:
        print(markdown(json.loads(Path(args.render).read_text())), end="")
        return

    if args.reset_every is not None and args.reset_every < 1:
        parser.error(f"--reset-every must be >= 1, got {args.reset_every}")
    torch.set_num_threads(args.threads)
    source = "digits" if args.quick else "fashion-mnist"
    kw = {"corruptions": ["gaussian_noise", "fog"]} if args.quick else {}
    n_test = None if args.quick else args.n_per_domain
    iters = 100 if args.quick else args.iters
    model = train_source_model("bncnn", source, epochs=12 if args.quick else 4, seed=args.seed)
    train, test = load_source(source, n_test=n_test, seed=args.seed)
    n_calib = min(args.calib, len(train))
    calib = [train.x[i : min(i + 64, n_calib)] for i in range(0, n_calib, 64)]
    orders = ("dirichlet",) if args.setting == "dirichlet" else ("iid", "dirichlet")
    streams = {
        order: make_stream(
            args.setting,
            source,
            severity=None if args.setting == "gradual" else 5,
            batch_size=args.batch_size,
            n_test=n_test,
            seed=args.seed,
            order=order,
            **kw,
        )
        for order in orders
    }
    first = streams[orders[0]]
    setting = "" if args.setting == "continual" else f"{args.setting} setting, "
    severity = "severities 1..5..1" if args.setting == "gradual" else "severity 5"
    resets = "" if args.reset_every is None else f", Tent reset every {args.reset_every} batches"
    results: dict = {
        "setup": f"{source}-C {setting}{severity}, {len(first.domains)} domains, "
        f"{len(first.sets[0])} images each, batch {args.batch_size}, seed {args.seed}; "
        f"calibration {n_calib} clean images, {iters} iterations per block{resets}",
        "float_clean_accuracy": accuracy(model, test.x, test.y),
        "ptq": [],
        "rows": [],
    }
    if args.append and Path(args.out).exists():
        previous = json.loads(Path(args.out).read_text())
        if previous["setup"] != results["setup"]:
            raise SystemExit(f"--append: {args.out} has another setup: {previous['setup']}")
        results["ptq"], results["rows"] = previous["ptq"], previous["rows"]
    print(results["setup"], f"| float clean accuracy {results['float_clean_accuracy']:.1f}%")
    backends = [b for b in args.backends if importlib.util.find_spec(b) is not None]
    needed = {ROWS[r][0] for r in args.rows}
    for backend in backends:
        for bits in args.bits:
            base = qtta_plugins.quantize(model, backend, bits, calib)
            models = {}
            for name, (method, options) in PTQ.items():
                if name not in needed:
                    continue
                start = time.perf_counter()
                qm = (
                    base
                    if method is None
                    else qtta_plugins.reconstruct(
                        base, model, calib, method, iters=iters, seed=args.seed, **options
                    )
                )
                seconds = time.perf_counter() - start
                models[name] = qm
                entry = {
                    "backend": backend,
                    "bits": bits.upper(),
                    "ptq": name,
                    "clean_accuracy": accuracy(qm, test.x, test.y),
                    "seconds": seconds if method else 0.0,
                }
                known = {(p["backend"], p["bits"], p["ptq"]) for p in results["ptq"]}
                if (backend, entry["bits"], name) not in known:
                    results["ptq"].append(entry)
                print(
                    f"{backend:8s} {bits.upper():5s} {name:14s} clean acc "
                    f"{entry['clean_accuracy']:5.1f}%  reconstruction {seconds:6.1f} s",
                    flush=True,
                )
            for row in args.rows:
                ptq, tent = ROWS[row]
                for order, stream in streams.items():
                    run = qtta_plugins.adapt(
                        models[ptq],
                        stream,
                        "tent",
                        progress=False,
                        reset_every=args.reset_every,
                        **tent,
                    )
                    err = run.errors()
                    results["rows"].append(
                        {
                            "backend": backend,
                            "bits": bits.upper(),
                            "row": row,
                            "stream": order,
                            "mean_error": err["mean"],
                            "errors": err,
                        }
                    )
                    print(
                        f"{backend:8s} {bits.upper():5s} {row:30s} {order:9s} "
                        f"err {err['mean']:5.1f}",
                        flush=True,
                    )
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


def markdown(results: dict) -> str:
    """The tables of docs/ttaq.md, from a results file."""
    lines = [
        f"Setup: {results['setup']}. Float model clean accuracy: "
        f"{results['float_clean_accuracy']:.1f}%.",
        "",
        "| backend | bits | PTQ | clean accuracy (%) | reconstruction time (s) |",
        "|---|---|---|---|---|",
    ]
    for p in results["ptq"]:
        lines.append(
            f"| {p['backend']} | {p['bits']} | {p['ptq']} | {p['clean_accuracy']:.1f} | "
            f"{p['seconds']:.0f} |"
        )
    lines += [
        "",
        "| backend | bits | row | mean error, i.i.d. stream | mean error, Dirichlet stream |",
        "|---|---|---|---|---|",
    ]
    cells: dict[tuple, dict[str, float]] = {}
    for r in results["rows"]:
        cells.setdefault((r["backend"], r["bits"], r["row"]), {})[r["stream"]] = r["mean_error"]
    order = list(ROWS)
    ranked = sorted(cells, key=lambda k: (k[0], k[1], order.index(k[2]) if k[2] in order else 99))
    for backend, bits, row in ranked:
        by_stream = cells[(backend, bits, row)]
        iid, dirichlet = by_stream.get("iid"), by_stream.get("dirichlet")
        lines.append(
            f"| {backend} | {bits} | {row} | "
            f"{'' if iid is None else f'{iid:.1f}'} | "
            f"{'' if dirichlet is None else f'{dirichlet:.1f}'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

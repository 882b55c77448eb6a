"""TTAQ against min-max PTQ and BRECQ/QDrop, each followed by Tent and by Tent + ABL (issues 5, 14).

    python benchmarks/ttaq_benchmark.py                      # ResNet-18, Fashion-MNIST-C, 3 seeds (docs/ttaq.md)
    python benchmarks/ttaq_benchmark.py --model bncnn --seeds 0 --iters 500   # the first BN-CNN table
    python benchmarks/ttaq_benchmark.py --quick              # digits-C, 2 domains: a smoke run
    python benchmarks/ttaq_benchmark.py --render benchmarks/results/ttaq_resnet18*.json [--plot F.png]

Source model: ``train_source_model(--model, "fashion-mnist", ...)`` with the architectures issue's
settings (ResNet-18: 3 epochs on 20,000 images; the BN CNN: 4 epochs), trained once (seed 0). A
seed draws the ``--calib`` calibration images, seeds the reconstruction and the stream, exactly as
``lowbit_ptq`` does, so the spread over seeds is that of PTQ and of the stream. For each backend,
bit-width and seed the PTQ variants are built (min-max: ``qtta_plugins.quantize``; ``qdrop``:
BRECQ with QDrop; ``ttaq`` and its ablations, PEM / PCR / L_logits off one at a time, on the
``--ablations-on`` backends only), each reported with its clean test accuracy, and cached on disk
(``benchmarks/_ptq.py``). Each is then run without adaptation, with BN-adapt, Tent and Tent + ABL on
two continual streams of the 15 corruptions at severity 5: the i.i.d. order and the
class-imbalanced (Dirichlet, delta = 0.1) order. Results go to a JSON file, one cell at a time (a
rerun computes only the missing cells); ``--render`` merges files and prints the tables, the
targets as paired differences over seeds, and each component's effect.

``--setting NAME`` runs another stream setting of ``qtta_plugins.data.make_stream`` (reset,
gradual, mixed, long: each in both orders; dirichlet: that order only); ``--reset-every N`` restarts
Tent from the PTQ model every N batches (the RDumb baseline). Both enter the results' setup.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
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
from qtta_plugins.data import SETTINGS, load_source, make_stream, to_channels  # noqa: E402
from qtta_plugins.models import accuracy, input_channels, train_source_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ptq import PTQ, calibration, model_key, ptq_entry, ptq_model  # noqa: E402
from _results import load_or_start, mean_sd, save  # noqa: E402

#: model -> its training settings (the architectures issue's; the BN CNN: the first TTAQ table's)
MODELS = {
    "resnet18": {"epochs": 3, "max_train": 20000},
    "bncnn": {"epochs": 4},
}
#: PTQ variant -> its name in the tables
LABELS = {
    "min-max": "min-max",
    "qdrop": "BRECQ/QDrop",
    "ttaq": "TTAQ",
    "ttaq -pem": "TTAQ -PEM",
    "ttaq -pcr": "TTAQ -PCR",
    "ttaq -logits": "TTAQ -L_logits",
}
#: adaptation -> (method, options)
ADAPT = {
    "no adaptation": ("source", {}),
    # test-batch statistics only: how much of Tent's gain is the normalization (see docs/ttaq.md)
    "BN-adapt": ("norm", {}),
    "Tent": ("tent", {}),
    "Tent + ABL": ("tent", {"abl": True}),
}
#: table row -> (PTQ variant, adaptation)
ROWS = {f"{LABELS[p]} + {a}": (p, a) for p in PTQ for a in ADAPT}
ABLATIONS = ("ttaq -pem", "ttaq -pcr", "ttaq -logits")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet18", choices=sorted(MODELS))
    parser.add_argument("--backends", nargs="+", default=["torchao", "brevitas", "nncf"])
    parser.add_argument("--bits", nargs="+", default=["w2a4", "w4a4"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument(
        "--ablations-on",
        nargs="*",
        default=["torchao"],
        help="backends that get the TTAQ ablation rows (the 2-core budget: one)",
    )
    parser.add_argument("--calib", type=int, default=1024, help="calibration images")
    parser.add_argument("--iters", type=int, default=200, help="reconstruction iterations/block")
    parser.add_argument("--n-per-domain", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--setting", default="continual", choices=SETTINGS, help="stream setting (make_stream)"
    )
    parser.add_argument(
        "--reset-every", type=int, default=None, metavar="N", help="restart every N batches"
    )
    parser.add_argument("--quick", action="store_true", help="digits-C, two domains, 100 iters")
    parser.add_argument("--out", default=None, help="results JSON (cache of computed cells)")
    parser.add_argument(
        "--render", nargs="+", default=None, help="print the tables of results files"
    )
    parser.add_argument("--plot", default=None, help="with --render: the error bars to this PNG")
    args = parser.parse_args(argv)
    if args.render:
        results = merge([json.loads(Path(f).read_text()) for f in args.render])
        print(markdown(results), end="")
        if args.plot:
            plot(results, args.plot)
        return

    if args.reset_every is not None and args.reset_every < 1:
        parser.error(f"--reset-every must be >= 1, got {args.reset_every}")
    torch.set_num_threads(args.threads)
    source = "digits" if args.quick else "fashion-mnist"
    model_name = "bncnn" if args.quick else args.model
    train_kw = {"epochs": 12} if args.quick else MODELS[model_name]
    kw = {"corruptions": ["gaussian_noise", "fog"]} if args.quick else {}
    n_test = None if args.quick else args.n_per_domain
    iters = 100 if args.quick else args.iters
    model = train_source_model(model_name, source, seed=0, **train_kw)
    key = model_key(model_name, source, train_kw)
    channels = input_channels(model_name)
    train, test = load_source(source, n_test=None if args.quick else 2000, seed=0)
    train_x, test_x = to_channels(train.x, channels), to_channels(test.x, channels)
    n_calib = min(args.calib, len(train_x))
    orders = ("dirichlet",) if args.setting == "dirichlet" else ("iid", "dirichlet")

    def streams_for(seed: int) -> dict:
        return {
            order: make_stream(
                args.setting,
                source,
                severity=None if args.setting == "gradual" else 5,
                batch_size=args.batch_size,
                n_test=n_test,
                seed=seed,
                order=order,
                channels=channels,
                **kw,
            )
            for order in orders
        }

    first = streams_for(args.seeds[0])[orders[0]]
    setting = "" if args.setting == "continual" else f"{args.setting} setting, "
    severity = "severities 1..5..1" if args.setting == "gradual" else "severity 5"
    resets = "" if args.reset_every is None else f", Tent reset every {args.reset_every} batches"
    setup = (
        f"{model_name} on {source}; {source}-C {setting}{severity}, {len(first.domains)} domains, "
        f"{len(first.sets[0])} images each, batch {args.batch_size}; calibration {n_calib} clean "
        f"images per seed, {iters} iterations per block{resets}"
    )
    out = Path(args.out or f"benchmarks/results/ttaq_{model_name}.json")
    results = load_or_start(
        out,
        setup,
        {"float_clean_accuracy": None, "clean_test_images": len(test_x), "ptq": [], "rows": []},
    )
    if results["float_clean_accuracy"] is None:
        results["float_clean_accuracy"] = accuracy(model, test_x, test.y)
    print(setup, f"| float clean accuracy {results['float_clean_accuracy']:.1f}%", flush=True)
    have_ptq = {(p["backend"], p["bits"], p["ptq"], p["seed"]) for p in results["ptq"]}
    have_row = {
        (r["backend"], r["bits"], r["row"], r["stream"], r["seed"]) for r in results["rows"]
    }
    backends = [b for b in args.backends if importlib.util.find_spec(b) is not None]
    for bits in args.bits:
        tag = bits.upper()
        for backend in backends:
            rows = [
                r for r in args.rows if ROWS[r][0] not in ABLATIONS or backend in args.ablations_on
            ]
            for seed in args.seeds:
                todo = [
                    (r, o)
                    for r in rows
                    for o in orders
                    if (backend, tag, r, o, seed) not in have_row
                ]
                variants = [p for p in PTQ if any(ROWS[r][0] == p for r in rows)]
                variants = [
                    p
                    for p in variants
                    if (backend, tag, p, seed) not in have_ptq
                    or any(ROWS[r][0] == p for r, _ in todo)
                ]
                if not variants:
                    continue
                calib = calibration(train_x, n_calib, seed)
                base = qtta_plugins.quantize(model, backend, bits, calib)
                streams = streams_for(seed)
                for name in variants:
                    ptq = (model, key, backend, bits, calib, name)
                    if (backend, tag, name, seed) in have_ptq:  # its row exists: the model only
                        qm, _ = ptq_model(*ptq, seed=seed, iters=iters, base=base)
                    else:
                        qm, entry, seconds = ptq_entry(
                            *ptq, (test_x, test.y), seed=seed, iters=iters, base=base
                        )
                        results["ptq"].append(entry)
                        have_ptq.add((backend, tag, name, seed))
                        print(
                            f"{backend:8s} {tag:5s} {name:13s} seed {seed} clean acc "
                            f"{entry['clean_accuracy']:5.1f}%  ({seconds:6.1f} s)",
                            flush=True,
                        )
                        save(out, results)
                    for row, order in todo:
                        if ROWS[row][0] != name:
                            continue
                        method, options = ADAPT[ROWS[row][1]]
                        start = time.perf_counter()
                        run = qtta_plugins.adapt(
                            qm,
                            streams[order],
                            method,
                            progress=False,
                            reset_every=None if method == "source" else args.reset_every,
                            **options,
                        )
                        err = run.errors()
                        results["rows"].append(
                            {
                                "backend": backend,
                                "bits": tag,
                                "row": row,
                                "stream": order,
                                "seed": seed,
                                "mean_error": err["mean"],
                                "errors": err,
                                "seconds": time.perf_counter() - start,
                            }
                        )
                        have_row.add((backend, tag, row, order, seed))
                        print(
                            f"{backend:8s} {tag:5s} {row:34s} {order:9s} seed {seed} "
                            f"err {err['mean']:5.1f}",
                            flush=True,
                        )
                        save(out, results)
    print(markdown(results), end="")
    print(f"wrote {out}")


def merge(files: list[dict]) -> dict:
    """One results dict from several part files (the first file's cells win).

    Files must be of one setup, except for the reconstruction iterations: where the budget runs
    one bit-width with fewer iterations per block than another, files that hold different
    bit-widths merge, and the merged setup names each bit-width's iterations."""
    iters_of = re.compile(r", (\d+) iterations per block")
    base = iters_of.sub("", files[0]["setup"])
    bits_iters: dict[str, int] = {}
    results = {**files[0], "ptq": [], "rows": []}
    seen_ptq, seen_row = set(), set()
    for f in files:
        if iters_of.sub("", f["setup"]) != base:
            sys.exit(f"cannot merge results of another setup: {f['setup']}")
        found = iters_of.search(f["setup"])
        iters = int(found.group(1)) if found else 0
        for bits in {c["bits"] for c in f["ptq"] + f["rows"]}:
            if bits_iters.setdefault(bits, iters) != iters:
                sys.exit(
                    f"{bits} is in files of {bits_iters[bits]} and {iters} iterations per block"
                )
        for p in f["ptq"]:
            key = (p["backend"], p["bits"], p["ptq"], p.get("seed", 0))
            if key not in seen_ptq:
                seen_ptq.add(key)
                results["ptq"].append(p)
        for r in f["rows"]:
            key = (r["backend"], r["bits"], r["row"], r["stream"], r.get("seed", 0))
            if key not in seen_row:
                seen_row.add(key)
                results["rows"].append(r)
    if len(set(bits_iters.values())) > 1:
        per_bits = ", ".join(
            f"{b} {i}" for b, i in sorted(bits_iters.items(), key=lambda kv: _bits_key(kv[0]))
        )
        results["setup"] = f"{base}; iterations per block: {per_bits}"
    return results


def _bits_key(bits: str) -> tuple:
    return (int(bits[1 : bits.index("A")]), bits)


def _errors(results: dict) -> dict[tuple, dict[int, float]]:
    """(backend, bits, row, stream) -> {seed: mean error}."""
    cells: dict[tuple, dict[int, float]] = {}
    for r in results["rows"]:
        key = (r["backend"], r["bits"], r["row"], r["stream"])
        cells.setdefault(key, {})[r.get("seed", 0)] = r["mean_error"]
    return cells


def paired(results: dict, row: str, against: str) -> dict[tuple, list[float]]:
    """(backend, bits, stream) -> ``row`` minus ``against``, per seed both have."""
    cells = _errors(results)
    out: dict[tuple, list[float]] = {}
    for (backend, bits, r, stream), by_seed in cells.items():
        if r != row:
            continue
        other = cells.get((backend, bits, against, stream), {})
        diffs = [by_seed[s] - other[s] for s in sorted(by_seed) if s in other]
        if diffs:
            out[(backend, bits, stream)] = diffs
    return out


#: (what is measured, row, against): each a paired difference of mean error, in points
COMPARISONS = [
    ("target: TTAQ + Tent + ABL - QDrop + Tent", "TTAQ + Tent + ABL", "BRECQ/QDrop + Tent"),
    ("TTAQ's reconstruction, with Tent", "TTAQ + Tent", "BRECQ/QDrop + Tent"),
    ("TTAQ's reconstruction, with Tent + ABL", "TTAQ + Tent + ABL", "BRECQ/QDrop + Tent + ABL"),
    ("ABL, after TTAQ", "TTAQ + Tent + ABL", "TTAQ + Tent"),
    ("ABL, after QDrop", "BRECQ/QDrop + Tent + ABL", "BRECQ/QDrop + Tent"),
    ("without PEM", "TTAQ -PEM + Tent + ABL", "TTAQ + Tent + ABL"),
    ("without PCR", "TTAQ -PCR + Tent + ABL", "TTAQ + Tent + ABL"),
    ("without L_logits", "TTAQ -L_logits + Tent + ABL", "TTAQ + Tent + ABL"),
    ("without PEM, with Tent", "TTAQ -PEM + Tent", "TTAQ + Tent"),
    ("without PCR, with Tent", "TTAQ -PCR + Tent", "TTAQ + Tent"),
    ("without L_logits, with Tent", "TTAQ -L_logits + Tent", "TTAQ + Tent"),
    ("TTAQ's reconstruction, no adaptation", "TTAQ + no adaptation", "BRECQ/QDrop + no adaptation"),
    (
        "QDrop's reconstruction, no adaptation",
        "BRECQ/QDrop + no adaptation",
        "min-max + no adaptation",
    ),
    ("QDrop's reconstruction, with BN-adapt", "BRECQ/QDrop + BN-adapt", "min-max + BN-adapt"),
    ("QDrop's reconstruction, with Tent", "BRECQ/QDrop + Tent", "min-max + Tent"),
    ("Tent over BN-adapt, after TTAQ", "TTAQ + Tent", "TTAQ + BN-adapt"),
]


def markdown(results: dict) -> str:
    """The tables of docs/ttaq.md, from (merged) results."""
    lines = [
        f"Setup: {results['setup']}. Float model clean accuracy: "
        f"{results['float_clean_accuracy']:.1f}%. Mean ± sd over seeds (n shown where under 3).",
        "",
        "| backend | bits | PTQ | clean accuracy (%) |",
        "|---|---|---|---|",
    ]
    clean: dict[tuple, list[float]] = {}
    for p in results["ptq"]:
        clean.setdefault((p["backend"], p["bits"], p["ptq"]), []).append(p["clean_accuracy"])
    order = list(PTQ)
    for key in sorted(clean, key=lambda k: (k[0], _bits_key(k[1]), order.index(k[2]))):
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {mean_sd(clean[key])} |")
    lines += [
        "",
        "| backend | bits | row | mean error, i.i.d. stream | mean error, Dirichlet stream |",
        "|---|---|---|---|---|",
    ]
    cells = _errors(results)
    rows = list(ROWS)
    keys = sorted(
        {k[:3] for k in cells},
        key=lambda k: (k[0], _bits_key(k[1]), rows.index(k[2]) if k[2] in rows else 99),
    )
    for backend, bits, row in keys:
        iid = list(cells.get((backend, bits, row, "iid"), {}).values())
        dirichlet = list(cells.get((backend, bits, row, "dirichlet"), {}).values())
        lines.append(f"| {backend} | {bits} | {row} | {mean_sd(iid)} | {mean_sd(dirichlet)} |")
    lines += [
        "",
        "Paired differences of mean error over seeds (points; negative: the first row is better):",
        "",
        "| comparison | backend | bits | i.i.d. stream | Dirichlet stream |",
        "|---|---|---|---|---|",
    ]
    for label, row, against in COMPARISONS:
        diffs = paired(results, row, against)
        for backend, bits in sorted({k[:2] for k in diffs}, key=lambda k: (k[0], _bits_key(k[1]))):
            iid = diffs.get((backend, bits, "iid"), [])
            dirichlet = diffs.get((backend, bits, "dirichlet"), [])
            lines.append(
                f"| {label} | {backend} | {bits} | {mean_sd(iid)} | {mean_sd(dirichlet)} |"
            )
    room = headroom(results)
    if room:
        lines += [
            "",
            "Room left for a better reconstruction: the row's error minus the W8A8 model's (min-max,"
            " the same adaptation, backend and seed), paired over seeds (points):",
            "",
            "| row | backend | bits | i.i.d. stream | Dirichlet stream |",
            "|---|---|---|---|---|",
        ]
        for (row, backend, bits), by_stream in sorted(
            room.items(), key=lambda kv: (kv[0][0], kv[0][1], _bits_key(kv[0][2]))
        ):
            lines.append(
                f"| {row} | {backend} | {bits} | {mean_sd(by_stream.get('iid', []))} | "
                f"{mean_sd(by_stream.get('dirichlet', []))} |"
            )
    return "\n".join(lines) + "\n"


#: row at low bits -> the W8A8 row it is measured against
HEADROOM = {
    "BRECQ/QDrop + Tent": "min-max + Tent",
    "TTAQ + Tent + ABL": "min-max + Tent + ABL",
    "BRECQ/QDrop + no adaptation": "min-max + no adaptation",
}


def headroom(results: dict) -> dict[tuple, dict[str, list[float]]]:
    """(row, backend, bits) -> stream -> the row's error minus W8A8's, per seed both have."""
    cells = _errors(results)
    out: dict[tuple, dict[str, list[float]]] = {}
    for (backend, bits, row, stream), by_seed in cells.items():
        if bits == "W8A8" or row not in HEADROOM:
            continue
        ref = cells.get((backend, "W8A8", HEADROOM[row], stream), {})
        diffs = [by_seed[s] - ref[s] for s in sorted(by_seed) if s in ref]
        if diffs:
            out.setdefault((row, backend, bits), {})[stream] = diffs
    return out


def plot(results: dict, path: str):
    """Mean error ± sd of the headline rows, one panel per bit-width and stream; returns the
    matplotlib figure (saved to ``path``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = _errors(results)
    headline = [
        "min-max + Tent",
        "BRECQ/QDrop + Tent",
        "BRECQ/QDrop + Tent + ABL",
        "TTAQ + Tent",
        "TTAQ + Tent + ABL",
    ]
    bits_all = sorted({k[1] for k in cells}, key=_bits_key)
    backends = sorted({k[0] for k in cells})
    streams = [s for s in ("iid", "dirichlet") if any(k[3] == s for k in cells)]
    fig, axes = plt.subplots(
        len(bits_all),
        len(streams),
        figsize=(5.5 * len(streams), 3.2 * len(bits_all)),
        squeeze=False,
    )
    width = 0.8 / len(headline)
    for i, bits in enumerate(bits_all):
        for j, stream in enumerate(streams):
            ax = axes[i][j]
            for k, row in enumerate(headline):
                means, sds = [], []
                for backend in backends:
                    v = list(cells.get((backend, bits, row, stream), {}).values())
                    means.append(statistics.mean(v) if v else float("nan"))
                    sds.append(statistics.stdev(v) if len(v) > 1 else 0.0)
                xs = [b + (k - (len(headline) - 1) / 2) * width for b in range(len(backends))]
                ax.bar(xs, means, width, yerr=sds, label=row, capsize=2)
            ax.set_xticks(range(len(backends)), backends)
            ax.set_title(f"{bits}, {'i.i.d.' if stream == 'iid' else 'Dirichlet'} stream")
            ax.set_ylabel("mean error (%)")
            # the range of the bars drawn (the no-adaptation rows sit 40 points above them)
            drawn = [
                statistics.mean(v.values())
                for (_, b, row, s), v in cells.items()
                if b == bits and s == stream and row in headline and v
            ]
            if drawn:
                ax.set_ylim(max(0.0, min(drawn) - 8), max(drawn) + 5)
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
    return fig


if __name__ == "__main__":
    sys.exit(main())

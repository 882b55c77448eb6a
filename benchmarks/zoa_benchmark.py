"""ZOA against FOA and the baselines on Fashion-MNIST-C, per backend and bit-width (issue 4).

    python benchmarks/zoa_benchmark.py                       # the published table (docs/zoa.md)
    python benchmarks/zoa_benchmark.py --quick               # digits-C, 2 domains: a smoke run

Stream: Fashion-MNIST-C, 15 corruptions at severity 5, continual, no reset, batch 64, seed 0
(``--n-per-domain`` test images per corruption); and the 10-round protocol for ZOA (W4A4). Rows:
source, norm (BN-adapt), Tent, FOA, ZOA and ZOA with the bank / the shift / the detector off.
Columns: mean error; forward passes per batch (counted); time per batch as a ratio to plain
inference of the same quantized model (``model(x)`` on a copy, timed just before each step on the
same batch, so both see the same machine load);
peak memory above the row's starting RSS (sampled); bank bytes per stored domain as a fraction of
the model's bytes. Also ZOA on torchao's converted integer model, eager and ``torch.compile``d, with
its time ratio to plain inference of that same model. Results go to a JSON file; ``--plot`` draws
the error along the stream.

``--setting NAME`` runs the rows on another stream setting of ``qtta_plugins.data.make_stream``
(reset, gradual, mixed, dirichlet, long); ``--reset-every N`` restarts every row's method every N
batches (the RDumb baseline). Both enter the results' stream line; the 10-round ZOA run keeps its
continual stream (with the reset, if asked).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import warnings
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("QTTA_QUIET", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import qtta_plugins  # noqa: E402
from qtta_plugins.bench.measure import run_row  # noqa: E402  (the harness's one time ratio)
from qtta_plugins.data import SETTINGS, continual_stream, load_source, make_stream  # noqa: E402
from qtta_plugins.models import accuracy, train_source_model  # noqa: E402

ROWS = {
    "source": ("source", {}),
    "norm": ("norm", {}),
    "tent": ("tent", {}),
    "foa": ("foa", {}),
    "zoa": ("zoa", {}),
    "zoa -bank": ("zoa", {"bank": False}),
    "zoa -shift": ("zoa", {"shift": False}),
    "zoa -detector": ("zoa", {"detector": False}),
}


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def packed_weight_bytes(model: torch.nn.Module) -> float:
    """The quantized weights at their bit-widths (what an integer deployment stores)."""
    view = qtta_plugins.quant_view(model)
    return sum(
        layer.weight.numel() * (layer.weight_quantizer.bits if layer.weight_quantizer else 32) / 8
        for layer in view.layers()
    )


def round_errors(per_batch, rounds: int) -> list[float]:
    """Mean over domains of the error (%) in each round."""
    out = []
    for r in range(rounds):
        domains: dict[str, list[int]] = {}
        for rnd, dom, err, n in per_batch:
            if rnd == r:
                acc = domains.setdefault(dom, [0, 0])
                acc[0] += err
                acc[1] += n
        out.append(statistics.mean(100 * e / n for e, n in domains.values()))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", nargs="+", default=None)
    parser.add_argument("--bits", nargs="+", default=["w8a8", "w4a4"])
    parser.add_argument("--rows", nargs="+", default=list(ROWS))
    parser.add_argument("--n-per-domain", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--rounds10-bits", default="w4a4", help="bits of the 10-round ZOA run ('' skips it)"
    )
    parser.add_argument(
        "--no-compiled", action="store_true", help="skip the torchao integer-path rows"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--setting", default="continual", choices=SETTINGS, help="stream setting (make_stream)"
    )
    parser.add_argument(
        "--reset-every", type=int, default=None, metavar="N", help="restart every N batches"
    )
    parser.add_argument("--quick", action="store_true", help="digits-C, two domains, fewer rows")
    parser.add_argument("--out", default="benchmarks/results/zoa.json")
    parser.add_argument("--plot", default=None)
    parser.add_argument(
        "--append",
        action="store_true",
        help="keep the rows already in --out and run only the backend x bits not there yet",
    )
    parser.add_argument(
        "--render", default=None, help="print the markdown tables of a results file and exit"
    )
    args = parser.parse_args(argv)
    if args.render:
        results = json.loads(Path(args.render).read_text())
        print(markdown(results), end="")
        if args.plot:
            plot(results, args.plot)
        return None

    if args.reset_every is not None and args.reset_every < 1:
        parser.error(f"--reset-every must be >= 1, got {args.reset_every}")
    torch.set_num_threads(args.threads)
    backends = args.backends or [
        b for b in ("torchao", "brevitas", "nncf") if importlib.util.find_spec(b) is not None
    ]
    source = "digits" if args.quick else "fashion-mnist"
    corruptions = ["gaussian_noise", "fog"] if args.quick else None
    kw = {"corruptions": corruptions} if corruptions else {}
    n_test = None if args.quick else args.n_per_domain
    epochs = 12 if args.quick else 4
    model = train_source_model("bncnn", source, epochs=epochs, seed=args.seed)
    train, test = load_source(source, n_test=n_test, seed=args.seed)
    calib = [train.x[i : i + 64] for i in range(0, 512, 64)]
    stream = make_stream(
        args.setting,
        source,
        severity=None if args.setting == "gradual" else 5,
        batch_size=args.batch_size,
        n_test=n_test,
        seed=args.seed,
        **kw,
    )
    setting = "" if args.setting == "continual" else f"{args.setting} setting, "
    severity = "severities 1..5..1" if args.setting == "gradual" else "severity 5"
    resets = "" if args.reset_every is None else f", reset every {args.reset_every} batches"
    results: dict = {
        "stream": f"{source}-C {setting}{severity}, {len(stream.domains)} domains, "
        f"{len(stream.sets[0])} images each, batch {args.batch_size}, seed {args.seed}{resets}",
        "float_clean_accuracy": accuracy(model, test.x, test.y),
        "rows": [],
        "rounds10": [],
        "integer_path": [],
    }
    if args.append and Path(args.out).exists():
        previous = json.loads(Path(args.out).read_text())
        if previous["stream"] != results["stream"]:
            raise SystemExit(f"{args.out} was measured on another stream: {previous['stream']}")
        results = previous
    done = {(r["backend"], r["bits"]) for r in results["rows"]}
    print(
        results["stream"],
        f"| float clean accuracy {results['float_clean_accuracy']:.1f}%",
        flush=True,
    )

    for backend in backends:
        for bits in args.bits:
            if (backend, bits.upper()) in done:
                print(f"{backend} {bits.upper()}: in {args.out} already", flush=True)
                continue
            qm = qtta_plugins.quantize(model, backend, bits, calib)
            clean = accuracy(qm, test.x, test.y)
            size, packed = model_bytes(qm), packed_weight_bytes(qm)
            for row in args.rows:
                method, options = ROWS[row]
                if args.quick and method == "foa":
                    options = {**options, "population": 7}
                res, run = run_row(qm, stream, method, options, reset_every=args.reset_every)
                bank = (
                    run.method.bank_bytes_per_domain
                    if getattr(run.method.config, "bank", False)
                    else None
                )
                entry = {
                    "backend": backend,
                    "bits": bits.upper(),
                    "row": row,
                    "clean_accuracy": clean,
                    "mean_error": res["errors"]["mean"],
                    "errors": res["errors"],
                    "passes_per_batch": res["passes_per_batch"],
                    "time_ratio": res["time_ratio"],
                    "peak_extra_mb": res["peak_extra_mb"],
                    "bank_bytes_per_domain": bank,
                    "bank_fraction_of_model": bank / size if bank else None,
                    "bank_fraction_of_packed_weights": bank / packed if bank else None,
                    "stored_domains": int(run.method.bank_deltas.shape[0]) if bank else None,
                    "detected_changes": len(run.method.changes)
                    if hasattr(run.method, "changes")
                    else None,
                }
                results["rows"].append(entry)
                print(
                    f"{backend:8s} {bits.upper():5s} {row:14s} err {entry['mean_error']:5.1f}  "
                    f"passes {entry['passes_per_batch']:4.1f}  time x{entry['time_ratio']:5.2f}  "
                    f"mem +{entry['peak_extra_mb']:6.1f} MB"
                    + (f"  bank {bank} B = {100 * bank / size:.2f}% of model" if bank else ""),
                    flush=True,
                )
            if bits == args.rounds10_bits:
                long = continual_stream(
                    source,
                    severity=5,
                    batch_size=args.batch_size,
                    n_test=n_test,
                    seed=args.seed,
                    rounds=10,
                    **kw,
                )
                res, run = run_row(qm, long, "zoa", {}, reset_every=args.reset_every)
                per_round = round_errors(res["per_batch"], 10)
                results["rounds10"].append(
                    {
                        "backend": backend,
                        "bits": bits.upper(),
                        "round_errors": per_round,
                        "stored_domains": int(run.method.bank_deltas.shape[0]),
                        "detected_changes": len(run.method.changes),
                        "per_batch": res["per_batch"],
                    }
                )
                print(
                    f"{backend:8s} {bits.upper():5s} zoa 10 rounds: "
                    + " ".join(f"{e:.1f}" for e in per_round),
                    flush=True,
                )
            if backend == "torchao" and not args.no_compiled:
                try:
                    results["integer_path"] += integer_path(qm, stream, bits, args.reset_every)
                except Exception as exc:  # reported, not fatal: the other rows stand on their own
                    print(f"torchao integer path failed: {type(exc).__name__}: {exc}", flush=True)
                    results["integer_path"].append(
                        {"bits": bits.upper(), "error": f"{type(exc).__name__}: {exc}"}
                    )
            if not args.quick:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(results, indent=1))

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")


def integer_path(qm, stream, bits, reset_every=None):
    """ZOA on torchao's converted integer model, eager and compiled (inductor, weights not frozen)."""
    from qtta_torchao.export import compile_converted, convert

    out = []
    converted = convert(qm)
    for label in ("convert_pt2e eager", "convert_pt2e + torch.compile"):
        for method in ("source", "zoa"):
            if "eager" in label:
                res, _ = run_row(converted, stream, method, {}, reset_every=reset_every)
            else:
                # Adapt a compiled copy in place, and time plain inference on another compiled copy.
                target = compile_converted(qtta_plugins.copy_model(converted), freeze=False)
                plain = compile_converted(qtta_plugins.copy_model(converted), freeze=False)
                res, _ = run_row(
                    target,
                    stream,
                    method,
                    {},
                    inplace=True,
                    plain_model=plain,
                    reset_every=reset_every,
                )
            out.append(
                {
                    "bits": bits.upper(),
                    "model": label,
                    "row": method,
                    "mean_error": res["errors"]["mean"],
                    "passes_per_batch": res["passes_per_batch"],
                    "time_ratio": res["time_ratio"],
                }
            )
            print(
                f"torchao  {bits.upper():5s} {label:30s} {method:6s} err {res['errors']['mean']:5.1f}  time x{res['time_ratio']:5.2f}",
                flush=True,
            )
    return out


def markdown(results: dict) -> str:
    """The tables of docs/zoa.md, from a results file."""
    lines = [
        f"Stream: {results['stream']}. Float model clean accuracy: {results['float_clean_accuracy']:.1f}%.",
        "",
        "| backend | bits | clean acc. | row | mean error | passes / batch | time / batch (x plain) "
        "| peak memory (+MB) | bank B / domain (% of model; % of packed weights) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        bank = (
            f"{r['bank_bytes_per_domain']} ({100 * r['bank_fraction_of_model']:.2f}%; "
            f"{100 * r['bank_fraction_of_packed_weights']:.1f}%)"
            if r["bank_bytes_per_domain"]
            else ""
        )
        lines.append(
            f"| {r['backend']} | {r['bits']} | {r['clean_accuracy']:.1f} | {r['row']} | "
            f"{r['mean_error']:.1f} | {r['passes_per_batch']:.0f} | {r['time_ratio']:.2f} | "
            f"{r['peak_extra_mb']:.1f} | {bank} |"
        )
    if results["rounds10"]:
        lines += [
            "",
            "| backend | bits | ZOA mean error per round, rounds 1..10 | last - first | stored domains | detected changes |",
            "|---|---|---|---|---|---|",
        ]
        for r in results["rounds10"]:
            e = r["round_errors"]
            lines.append(
                f"| {r['backend']} | {r['bits']} | {' / '.join(f'{v:.1f}' for v in e)} | "
                f"{e[-1] - e[0]:+.1f} | {r['stored_domains']} | {r['detected_changes']} |"
            )
    if results["integer_path"]:
        lines += [
            "",
            "| bits | torchao model | row | mean error | time / batch (x plain, same model) |",
            "|---|---|---|---|---|",
        ]
        for r in results["integer_path"]:
            if "error" in r:
                lines.append(f"| {r['bits']} | failed: {r['error']} | | | |")
                continue
            lines.append(
                f"| {r['bits']} | {r['model']} | {r['row']} | {r['mean_error']:.1f} | {r['time_ratio']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r["bits"] == "W4A4"]
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, axes = plt.subplots(
        1, len(backends) + 1, figsize=(5 * (len(backends) + 1), 4), squeeze=False
    )
    for ax, backend in zip(axes[0], backends, strict=False):
        for r in rows:
            if r["backend"] != backend or r["row"] not in ("source", "norm", "tent", "foa", "zoa"):
                continue
            domains = [d for d in r["errors"] if d != "mean"]
            ax.plot(
                range(len(domains)),
                [r["errors"][d] for d in domains],
                marker="o",
                ms=3,
                label=f"{r['row']} ({r['mean_error']:.1f})",
            )
        ax.set_xticks(range(len(domains)))
        ax.set_xticklabels([d.replace("_", " ") for d in domains], rotation=70, fontsize=7)
        ax.set_title(f"{backend} W4A4: error per domain along the stream")
        ax.set_ylabel("error (%)")
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    for r in results["rounds10"]:
        ax.plot(
            range(1, len(r["round_errors"]) + 1),
            r["round_errors"],
            marker="o",
            ms=3,
            label=f"{r['backend']} {r['bits']}",
        )
    ax.set_title("ZOA over 10 rounds (mean error per round)")
    ax.set_xlabel("round")
    ax.set_ylabel("mean error (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())

"""ZOA over the 10-round protocol on the Fashion-MNIST BN CNN: does the error drift, and why (issue 14, part 2).

    python benchmarks/zoa_rounds.py                                    # every backend, ZOA's defaults
    python benchmarks/zoa_rounds.py --backends torchao --zoa '{"norm_layers": "middle", "skip_converged": false}'
    python benchmarks/zoa_rounds.py --backends torchao --torchao-minmax-acts   # torchao's old ranges
    python benchmarks/zoa_rounds.py --render benchmarks/results/zoa_rounds_cnn.json

The setup of ``zoa_benchmark.py``'s 10-round run (``train_source_model("bncnn", "fashion-mnist",
epochs=4)``, 8 x 64 calibration images, Fashion-MNIST-C at severity 5, 256 images per corruption,
batch 64, the 15 corruptions 10 times over without reset; ``--seeds`` draw the stream and ZOA's
randomness, seed 0 is zoa_benchmark's), one cell per (backend, bits, ZOA options, activation
ranges, seed). Per cell: ZOA's mean error in each round, and which entries of the
model's state differ after the stream from the quantized model it started from: a drift that
comes from the backend (an observer still calibrating, a quantizer's range moving) shows there,
one that comes from ZOA's adapted parameters does not.

``--torchao-minmax-acts`` is a diagnostic: torchao's activation observers go back to min-max
below 8 bit (what they were before the shared range rule, docs/backends.md). Cells are cached in
the results JSON.
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
os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import qtta_plugins  # noqa: E402
from qtta_plugins.data import continual_stream, load_source  # noqa: E402
from qtta_plugins.models import accuracy, train_source_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import load_or_start, save  # noqa: E402
from zoa_benchmark import round_errors  # noqa: E402

ROUNDS = 10


def changed_state(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    """Names of the state entries that differ (batch counters left out: they only count)."""
    out = []
    for name, value in before.items():
        if name.endswith("num_batches_tracked"):
            continue
        new = after.get(name)
        if new is None or new.shape != value.shape or not torch.equal(new, value):
            out.append(name)
    return out


def run_cell(
    model, calib, test, backend: str, bits: str, zoa: dict, minmax: bool, seed: int
) -> dict:
    if minmax:  # the diagnostic: torchao's activation observers as they were (min-max)
        import qtta_torchao.observers as observers
        from torchao.quantization.pt2e import MinMaxObserver

        observers.PercentileObserver = MinMaxObserver
    qm = qtta_plugins.quantize(model, backend, bits, calib)
    before = {k: v.detach().clone() for k, v in qm.state_dict().items() if torch.is_tensor(v)}
    stream = continual_stream(
        "fashion-mnist", severity=5, batch_size=64, n_test=256, seed=seed, rounds=ROUNDS
    )
    run = qtta_plugins.adapt(qm, None, "zoa", progress=False, seed=seed, **zoa)
    per_batch = []
    for batch in stream:
        logits = run.step(batch.x, batch.y, batch.domain)
        per_batch.append(
            (batch.round, batch.domain, int((logits.argmax(1) != batch.y).sum()), len(batch.y))
        )
    errors = round_errors(per_batch, ROUNDS)
    # what ZOA adapts: its norms' affines, and the output shift, which lives in the head's bias
    head = qtta_plugins.quant_view(run.model).layers()[-1].name
    adapted = {f"{n}.{p}" for n in run.method.norm_names for p in ("weight", "bias")}
    adapted.add(f"{head}.bias")
    changed = changed_state(before, run.model.state_dict())
    return {
        "clean_accuracy": accuracy(qm, test.x, test.y),
        "round_errors": errors,
        "last_minus_first": errors[-1] - errors[0],
        "round_sd": statistics.stdev(errors),
        "changed_state": changed,
        "changed_besides_zoa": [n for n in changed if n not in adapted],
        "stored_domains": int(run.method.bank_deltas.shape[0]),
        "detected_changes": len(run.method.changes),
    }


def markdown(results: dict) -> str:
    lines = [
        results["setup"],
        "",
        "| backend | bits | torchao act. ranges | ZOA options | seed | clean "
        "| error per round, 1..10 "
        "| last - first | sd over rounds | state changed besides ZOA's parameters |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in results["cells"]:
        extra = c["changed_besides_zoa"]
        lines.append(
            f"| {c['backend']} | {c['bits']} | {c['act_ranges']} | {c['zoa'] or 'defaults'} "
            f"| {c['seed']} "
            f"| {c['clean_accuracy']:.1f} | {' / '.join(f'{e:.1f}' for e in c['round_errors'])} "
            f"| {c['last_minus_first']:+.1f} | {c['round_sd']:.2f} | {', '.join(extra) or 'none'} |"
        )
    groups: dict[tuple, list[dict]] = {}
    for c in results["cells"]:
        key = (c["backend"], c["bits"], c["act_ranges"], json.dumps(c["zoa"]))
        groups.setdefault(key, []).append(c)
    lines += [
        "",
        "| backend | bits | torchao act. ranges | ZOA options | seeds | last - first (mean ± sd) "
        "| worst round - first (mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (backend, bits, ranges, zoa), cells in groups.items():
        drift = [c["last_minus_first"] for c in cells]
        worst = [max(c["round_errors"]) - c["round_errors"][0] for c in cells]
        sd = statistics.stdev(drift) if len(drift) > 1 else 0.0
        lines.append(
            f"| {backend} | {bits} | {ranges} | {json.loads(zoa) or 'defaults'} "
            f"| {len(cells)} | {statistics.mean(drift):+.1f} ± {sd:.1f} "
            f"| {statistics.mean(worst):+.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", nargs="+", default=None)
    parser.add_argument("--bits", default="w4a4")
    parser.add_argument("--zoa", default="{}", help="ZOAConfig options as JSON")
    parser.add_argument("--torchao-minmax-acts", action="store_true")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="stream seeds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/zoa_rounds_cnn.json")
    parser.add_argument("--render", default=None)
    args = parser.parse_args(argv)
    if args.render:
        print(markdown(json.loads(Path(args.render).read_text())), end="")
        return
    zoa = json.loads(args.zoa)
    if not isinstance(zoa, dict):
        parser.error(f"--zoa must be a JSON object, got {args.zoa!r}")
    torch.set_num_threads(args.threads)
    backends = args.backends or [
        b for b in ("torchao", "brevitas", "nncf") if importlib.util.find_spec(b) is not None
    ]
    if args.torchao_minmax_acts and backends != ["torchao"]:
        parser.error("--torchao-minmax-acts is a torchao diagnostic: pass --backends torchao")
    model = train_source_model("bncnn", "fashion-mnist", epochs=4, seed=0)
    train, test = load_source("fashion-mnist", n_test=256, seed=0)
    calib = [train.x[i : i + 64] for i in range(0, 512, 64)]
    setup = (
        "bncnn on fashion-mnist (epochs 4, seed 0); Fashion-MNIST-C severity 5, 15 corruptions x "
        f"256 images, batch 64, {ROUNDS} rounds without reset; a seed draws the stream and ZOA's "
        "randomness; clean accuracy on 256 images"
    )
    out = Path(args.out)
    results = load_or_start(out, setup, {"cells": []})
    ranges = "min-max" if args.torchao_minmax_acts else "shared rule"
    for seed in args.seeds:
        for backend in backends:
            key = (backend, args.bits.upper(), ranges, zoa, seed)
            if any(
                (c["backend"], c["bits"], c["act_ranges"], c["zoa"], c["seed"]) == key
                for c in results["cells"]
            ):
                print(f"{backend} {args.bits} {ranges} {zoa} seed {seed}: cached", flush=True)
                continue
            cell = run_cell(
                model, calib, test, backend, args.bits, zoa, args.torchao_minmax_acts, seed
            )
            cell = {
                "backend": backend,
                "bits": args.bits.upper(),
                "act_ranges": ranges,
                "zoa": zoa,
                "seed": seed,
                **cell,
            }
            results["cells"].append(cell)
            save(out, results)
            print(
                f"{backend} {args.bits} {ranges} {zoa or 'defaults'} seed {seed}: "
                + " ".join(f"{e:.1f}" for e in cell["round_errors"])
                + f"  last - first {cell['last_minus_first']:+.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()

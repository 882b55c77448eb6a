"""What NNCF's ``reconstruct`` costs against torchao's on the demo's model (issue 36).

    python benchmarks/nncf_reconstruct_cost.py                 # paired, qdrop and ttaq, ratio printed
    python benchmarks/nncf_reconstruct_cost.py --profile       # + where NNCF's reconstruction spends it
    python benchmarks/nncf_reconstruct_cost.py --threads 1 2 --methods qdrop --iters 10
                                           # 1 thread, then the demo's default 2: both backends

The demo's own set-up (``qtta_plugins.app.tour``): the digits BN CNN (``train_source_model("bncnn",
"digits")``, cached), 8 calibration batches of 64 training images, W4A4, ``reconstruct`` with
``qdrop`` and ``ttaq`` at the demo's 40 iterations per block, seed 0. Both backends are quantized
first (NNCF compiles its C++ extension on its first quantizer call, outside the timing); then, per
method and repeat, torchao's reconstruction and NNCF's run back to back in this one process, so the
ratio compares runs under the same machine load. Also printed: each reconstructed model's clean
accuracy on the digits test split (the figure a speed change must not move).

``--threads 1 2`` measures the pairs at each thread count in turn: on a two-core machine that also
runs other work, two threads slow every backend's reconstruction several-fold (docs/backends.md,
"Reconstruction cost on NNCF"). Exit status 1 when NNCF's total over torchao's exceeds
``--max-ratio`` (default 2) at any thread count.

Not a harness config: it compares two backends' reconstruction wall times back to back and
profiles where NNCF's spends them (a ratio of reconstruction times, not the harness's time per
batch against plain inference), and neither is a cell; docs/backends.md ("Reconstruction cost on
NNCF") publishes its figures.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import os
import pstats
import sys
import time
import warnings
from typing import Any

os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")  # no time limit on NNCF's first build
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("QTTA_QUIET", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from qtta_plugins import quantize, reconstruct  # noqa: E402
from qtta_plugins.app.tour import DEMO_ITERS  # noqa: E402
from qtta_plugins.data import load_source  # noqa: E402
from qtta_plugins.models import accuracy, train_source_model  # noqa: E402

BACKENDS = ("torchao", "nncf")  # the order of each pair
METHODS = ("qdrop", "ttaq")

#: Parts of a reconstruction, each the cumulative time of one function (``--profile``), named
#: ``module:qualified name``: the backend-neutral simulation and its training loop, and what only an
#: NNCF model adds.
PARTS = {
    "block-wise training on the float simulation (every backend)": (
        "qtta_plugins.methods.ttaq:_reconstruct_block"
    ),
    "building the simulation (reads the view's layers and grids)": (
        "qtta_plugins.methods.ttaq:Simulation.__init__"
    ),
    "NNCF graph traces (NNCFView's structure)": "qtta_nncf.graph:trace_structure",
    "source statistics after reconstruction (features + NNCF batch extremes)": (
        "qtta_plugins.features:measure_source_statistics"
    ),
    "  of which NNCF's batch-mode activation extremes": (
        "qtta_nncf.recalibration:_activation_extremes"
    ),
    "copies of the model (reconstruct works on a copy)": "qtta_plugins.view:copy_model",
    "write-back into NNCF's quantizers": "qtta_plugins.methods.ttaq:Simulation.write_back",
}


def profile_key(target: str) -> tuple[str, int, str] | None:
    """The ``pstats`` key of ``module:qualified.name``, or ``None`` where it does not exist (the
    code moved: that part is reported as not found)."""
    module_name, _, qualname = target.partition(":")
    try:
        obj: object = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    code = getattr(obj, "__code__", None)
    if code is None:
        return None
    return code.co_filename, code.co_firstlineno, code.co_name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1],
        help="torch thread counts, each measured in turn (default 1; the demo's default is 2)",
    )
    parser.add_argument(
        "--iters", type=int, default=DEMO_ITERS, help="iterations per block (the demo's)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="pairs per method")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="cProfile NNCF's reconstructions")
    parser.add_argument("--max-ratio", type=float, default=2.0)
    args = parser.parse_args(argv)
    for name in ("iters", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if any(t < 1 for t in args.threads):
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.max_ratio <= 0:
        parser.error(f"--max-ratio must be > 0, got {args.max_ratio}")
    return args


def measure_pairs(
    args: argparse.Namespace,
    threads: int,
    qmodels: dict[str, torch.nn.Module],
    model: torch.nn.Module,
    calib: list[torch.Tensor],
    test: Any,
    profile: cProfile.Profile | None,
) -> dict[str, float]:
    """Every method's reconstruction, torchao's then NNCF's, ``args.repeats`` times, at
    ``threads`` torch threads; prints a row per pair and returns the seconds per backend."""
    torch.set_num_threads(threads)
    totals = dict.fromkeys(BACKENDS, 0.0)
    for method in args.methods:
        for repeat in range(args.repeats):
            row, accs = [], []
            for backend in BACKENDS:
                on = profile is not None and backend == "nncf"
                start = time.perf_counter()
                if on:
                    profile.enable()
                result = reconstruct(
                    qmodels[backend],
                    model,
                    calib,
                    method,
                    iters=args.iters,
                    seed=args.seed,
                    progress=False,
                )
                if on:
                    profile.disable()
                took = time.perf_counter() - start
                totals[backend] += took
                row.append(took)
                accs.append(accuracy(result, test.x, test.y))
            print(
                f"{threads:>7}  {method:<7}{repeat:>7}"
                + "".join(f"{s:>9.1f}s" for s in row)
                + f"{row[1] / row[0]:>8.2f}   "
                + " / ".join(f"{a:.1f}" for a in accs),
                flush=True,
            )
    return totals


def print_profile(profile: cProfile.Profile, total: float) -> None:
    """NNCF's reconstruction time by part (:data:`PARTS`)."""
    entries = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    print(f"\nwhere NNCF's reconstructions spent {total:.1f}s (cProfile, cumulative):")
    for label, target in PARTS.items():
        key = profile_key(target)
        if key is None:
            print(f"  {'n/a':>8} {'':>6}  {label} ({target} not found)")
            continue
        _, calls, _, spent, _ = entries.get(key, (0, 0, 0.0, 0.0, {}))
        print(f"  {spent:>7.2f}s {100 * spent / total:>5.1f}%  {label} ({calls} call(s))")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads[0])
    model = train_source_model("bncnn", "digits", seed=args.seed, progress=False)
    train, test = load_source("digits", seed=args.seed)
    calib = [train.x[i : i + 64] for i in range(0, min(len(train), 512), 64)]
    qmodels = {b: quantize(model, backend=b, bits="w4a4", calib=calib) for b in BACKENDS}
    print(
        f"digits BN CNN, W4A4, {len(calib)} calibration batches of 64, {args.iters} iterations per "
        "block; clean accuracy after quantize: "
        + ", ".join(f"{b} {accuracy(q, test.x, test.y):.1f}%" for b, q in qmodels.items())
    )
    print(
        f"\n{'threads':>7}  {'method':<7}{'repeat':>7}"
        + "".join(f"{b:>10}" for b in BACKENDS)
        + "   ratio   accuracy % (torchao / nncf)"
    )
    profile = cProfile.Profile() if args.profile else None
    ratios = {}
    nncf_seconds = 0.0
    for threads in args.threads:
        totals = measure_pairs(args, threads, qmodels, model, calib, test, profile)
        nncf_seconds += totals["nncf"]
        ratios[threads] = totals["nncf"] / totals["torchao"]
        print(
            f"ratio nncf / torchao at {threads} thread(s) (total over {len(args.methods)} "
            f"method(s) x {args.repeats} repeat(s), measured in this run): "
            f"{ratios[threads]:.2f}  (torchao {totals['torchao']:.1f}s, nncf {totals['nncf']:.1f}s)",
            flush=True,
        )
    if profile is not None:
        print_profile(profile, nncf_seconds)
    worst = max(ratios.values())
    if worst > args.max_ratio:
        print(
            f"NNCF's reconstruction costs {worst:.2f}x torchao's, over the limit of "
            f"{args.max_ratio}x",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

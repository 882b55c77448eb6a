"""Forward time per batch of each backend's quantized model, as a ratio to the float model in eager.

    python benchmarks/forward_time.py [--backends torchao brevitas nncf] [--bits w8a8 w4a4 w2a4]

Every figure is measured in the same run as its float reference (same model, batch, threads), with
``torch.utils.benchmark`` (blocked autorange, median). Absolute times on shared 2-core machines are
noise; the ratios are what to read. torchao also gets its deployment path: ``convert_pt2e`` (integer
Q/DQ graph) eager and under ``torch.compile`` (inductor, freezing).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import warnings

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")
os.environ.setdefault("QTTA_QUIET", "1")

import torch
from torch.utils import benchmark

import qtta_plugins
from qtta_plugins.data import load_source
from qtta_plugins.models import train_source_model


def median_ms(fn, x: torch.Tensor, min_run_time: float) -> float:
    with torch.inference_mode():
        for _ in range(3):
            fn(x)
        timer = benchmark.Timer(
            stmt="fn(x)", globals={"fn": fn, "x": x}, num_threads=torch.get_num_threads()
        )
        return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["torchao", "brevitas", "nncf"])
    parser.add_argument("--bits", nargs="+", default=["w8a8", "w4a4", "w2a4"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per measurement")
    parser.add_argument(
        "--no-compile", action="store_true", help="skip torchao's torch.compile path"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    model = train_source_model("bncnn", "digits", progress=False)
    train, test = load_source("digits")
    calib = [train.x[i : i + 64] for i in range(0, 512, 64)]
    x = test.x[: args.batch_size]

    rows = []
    if not args.no_compile:
        # Context for the compiled rows: how much of their speed is compilation, not integers.
        float_ms = median_ms(model, x, args.min_run_time)
        compiled_float = torch.compile(model)
        rows.append(
            (
                "float",
                "-",
                "torch.compile",
                median_ms(compiled_float, x, args.min_run_time) / float_ms,
            )
        )
    for backend in args.backends:
        if importlib.util.find_spec(backend) is None:
            print(f"# {backend}: not installed, skipped")
            continue
        for bits in args.bits:
            qmodel = qtta_plugins.quantize(model, backend, bits, calib)
            qtta_plugins.quant_view(qmodel).set_norm_mode("source")
            float_ms = median_ms(model, x, args.min_run_time)
            rows.append(
                (
                    backend,
                    bits,
                    "fake-quant eager",
                    median_ms(qmodel, x, args.min_run_time) / float_ms,
                )
            )
            if backend == "torchao":
                from qtta_torchao.export import compile_converted, convert

                converted = convert(qmodel)
                rows.append(
                    (
                        backend,
                        bits,
                        "convert_pt2e eager",
                        median_ms(converted, x, args.min_run_time) / float_ms,
                    )
                )
                if not args.no_compile:
                    compiled = compile_converted(converted)
                    rows.append(
                        (
                            backend,
                            bits,
                            "convert_pt2e + torch.compile",
                            median_ms(compiled, x, args.min_run_time) / float_ms,
                        )
                    )

    print(
        f"\nforward time per batch of {args.batch_size} (1x32x32), {args.threads} threads, ratio to float eager "
        "measured in the same run (lower is faster)\n"
    )
    print("| backend | bits | path | time / float eager |\n|---|---|---|---|")
    for backend, bits, path, ratio in rows:
        print(f"| {backend} | {bits.upper()} | {path} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()

"""Forward time per batch of each backend's quantized model, as a ratio to the float model in eager.

    python benchmarks/forward_time.py [--backends torchao brevitas nncf] [--bits w8a8 w4a4 w2a4]
        [--out benchmarks/results/forward_time.json]

Not a ``qtta bench`` config: a harness cell times an adaptation step against plain inference of
the same quantized model, while this times deployment forms that cannot adapt (``convert_pt2e``,
eager and under ``torch.compile`` with inductor and freezing) against the float model.

Every ratio is measured the harness's way (``qtta_plugins.bench.measure``): each form runs on the
same batch just after the float model, both timed, batch after batch in the same run; the ratio
is the median time of the form over the median time of the float model, the first batch left
out (lazy set-up, compilation). Absolute times on shared 2-core machines are noise; the ratios are
what to read.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import time
import warnings

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")
os.environ.setdefault("QTTA_QUIET", "1")

import torch

import qtta_plugins
from qtta_plugins.data import load_source
from qtta_plugins.models import train_source_model


def cpu_name() -> str:
    """The CPU's model name (Linux), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def paired_ratio(fn, reference, batches: list[torch.Tensor]) -> float:
    """Median time of ``fn`` over median time of ``reference``, paired batch by batch (each batch
    runs through ``reference`` then ``fn``), the first batch left out: the timing of
    :func:`qtta_plugins.bench.measure.run_row` for two forward passes (the harness exposes it
    only around an adaptation step)."""
    fn_times, ref_times = [], []
    with torch.inference_mode():
        for x in batches:
            t = time.perf_counter()
            reference(x)
            ref_times.append(time.perf_counter() - t)
            t = time.perf_counter()
            fn(x)
            fn_times.append(time.perf_counter() - t)
    return statistics.median(fn_times[1:]) / statistics.median(ref_times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["torchao", "brevitas", "nncf"])
    parser.add_argument("--bits", nargs="+", default=["w8a8", "w4a4", "w2a4"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--rounds", type=int, default=10, help="passes over the test batches per measurement"
    )
    parser.add_argument(
        "--no-compile", action="store_true", help="skip torchao's torch.compile path"
    )
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    model = train_source_model("bncnn", "digits", progress=False)
    train, test = load_source("digits")
    calib = [train.x[i : i + 64] for i in range(0, 512, 64)]
    n = len(test.x) // args.batch_size * args.batch_size  # full batches only
    batches = list(test.x[:n].split(args.batch_size)) * args.rounds

    rows = []
    if not args.no_compile:
        # Context for the compiled rows: how much of their speed is compilation, not integers.
        compiled_float = torch.compile(model)
        rows.append(("float", "-", "torch.compile", paired_ratio(compiled_float, model, batches)))
    for backend in args.backends:
        if importlib.util.find_spec(backend) is None:
            print(f"# {backend}: not installed, skipped")
            continue
        for bits in args.bits:
            qmodel = qtta_plugins.quantize(model, backend, bits, calib)
            qtta_plugins.quant_view(qmodel).set_norm_mode("source")
            rows.append((backend, bits, "fake-quant eager", paired_ratio(qmodel, model, batches)))
            if backend == "torchao":
                from qtta_torchao.export import compile_converted, convert

                converted = convert(qmodel)
                rows.append(
                    (backend, bits, "convert_pt2e eager", paired_ratio(converted, model, batches))
                )
                if not args.no_compile:
                    compiled = compile_converted(converted)
                    ratio = paired_ratio(compiled, model, batches)
                    rows.append((backend, bits, "convert_pt2e + torch.compile", ratio))

    print(
        f"\nforward time per batch of {args.batch_size} (1x32x32), {args.threads} threads, ratio to "
        "float eager paired batch by batch in the same run, medians (lower is faster)\n"
    )
    print("| backend | bits | path | time / float eager |\n|---|---|---|---|")
    for backend, bits, path, ratio in rows:
        print(f"| {backend} | {bits.upper()} | {path} | {ratio:.2f}x |")
    if args.out:
        from pathlib import Path

        from qtta_plugins.bench.cache import write_json_atomic

        write_json_atomic(
            Path(args.out),
            {
                "setup": f"digits BN CNN, batch {args.batch_size} of 1x32x32, {args.threads} "
                f"threads, {args.rounds} rounds over the test batches; ratio to float eager, "
                "paired batch by batch, medians, first batch left out",
                "machine": cpu_name(),
                "rows": [
                    {"backend": b, "bits": bits, "path": path, "ratio": r}
                    for b, bits, path, r in rows
                ],
            },
        )


if __name__ == "__main__":
    main()

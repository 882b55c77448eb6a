"""A quick check of every method against batch size, and at batch 1 through a window (issue 38).

    python benchmarks/small_batch.py                                  # the table in docs/edge.md
    python benchmarks/small_batch.py --methods norm tent --sizes 64 1 --window 32

Model: the digits BN CNN (``train_source_model("bncnn", "digits", seed=0)``), W8A8 by
``qtta_plugins.quantize`` on torchao. Stream: digits-C at severity 5, three domains (gaussian
noise, defocus blur, contrast), ``--per-domain`` images each (200: 600 in all), continual, one
seed. Accuracy (%) per method and batch size; a method that refuses the batch size prints the
error's class. The last column is batch 1 with ``window=--window``. One thread. This is a small
sanity check of the refusal and the window, not the benchmark of issue 38 part 4 (ResNet-18 and
the ViT on Fashion-MNIST-C, several seeds, cost): that has not been run.

Not yet a ``qtta bench`` config: a config has one batch size (a column here is a run with
``batch_size=N``), but ``adapt``'s ``window`` is not an option a method row takes, and a method
that refuses a batch size (``SmallBatchError``) fails its cell instead of being recorded as
refused.
"""

from __future__ import annotations

import argparse
import os
import warnings

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("QTTA_QUIET", "1")

import torch

import qtta_plugins
from qtta_plugins.data import continual_stream, load_source
from qtta_plugins.models import train_source_model

METHODS = ("source", "norm", "tent", "eata", "sar", "cotta", "zoa", "foa", "rotta")
DOMAINS = ("gaussian_noise", "defocus_blur", "contrast")


def accuracy(qmodel: torch.nn.Module, stream: list, method: str, window: int | None) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = qtta_plugins.adapt(qmodel, stream, method, window=window, progress=False)
    except qtta_plugins.SmallBatchError:
        return "refused"
    return f"{100 - run.errors()['mean']:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 16, 4, 2, 1])
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--per-domain", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)  # small model: more threads only contend

    model = train_source_model("bncnn", "digits", seed=0, progress=False)
    train, _ = load_source("digits", seed=0)
    calib = [train.x[i : i + 64] for i in range(0, 512, 64)]
    qmodel = qtta_plugins.quantize(model, "torchao", "w8a8", calib)

    def stream(batch_size: int) -> list:
        kept = continual_stream(
            "digits", severity=5, corruptions=DOMAINS, batch_size=batch_size,
            per_domain=args.per_domain, progress=False,
        )  # fmt: skip
        return list(kept)

    streams = {n: stream(n) for n in args.sizes}
    ones = streams.get(1) or stream(1)
    header = [f"batch {n}" for n in args.sizes] + [f"batch 1, window={args.window}"]
    print("| method | " + " | ".join(header) + " |")
    print("|---" * (len(header) + 1) + "|")
    for method in args.methods:
        row = [accuracy(qmodel, streams[n], method, None) for n in args.sizes]
        row.append(accuracy(qmodel, ones, method, args.window))
        print(f"| {method} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()

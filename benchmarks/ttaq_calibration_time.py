"""How long a 1024-image reconstruction of the Fashion-MNIST BN ResNet takes on 2 cores (issue 5).

    python benchmarks/ttaq_calibration_time.py

torchao at W4A4 and W2A4; min-max PTQ, then ``qdrop`` and ``ttaq`` (1000 iterations per block,
batch 32, seed 0), each with its wall time and clean accuracy on 2000 Fashion-MNIST test images.
Run it alone: the times are absolute seconds on this machine.

Not a harness config: its figure is the wall time of ``reconstruct`` run alone, which a harness
cell records only in passing (``reconstruct_seconds``, and not at all when the reconstructed model
comes from the cache); docs/ttaq.md ("Reconstruction time") publishes it.
"""

from __future__ import annotations

import os
import time
import warnings

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("QTTA_QUIET", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import qtta_plugins  # noqa: E402
from qtta_plugins.data import load_source  # noqa: E402
from qtta_plugins.models import accuracy, train_source_model  # noqa: E402


def main() -> None:
    torch.set_num_threads(2)
    model = train_source_model("bncnn", "fashion-mnist", epochs=4, seed=0)
    train, test = load_source("fashion-mnist", n_test=2000, seed=0)
    calib = [train.x[i : i + 64] for i in range(0, 1024, 64)]
    for bits in ("w4a4", "w2a4"):
        qm = qtta_plugins.quantize(model, "torchao", bits, calib)
        print(bits, "min-max clean acc", accuracy(qm, test.x, test.y), flush=True)
        for method in ("qdrop", "ttaq"):
            start = time.perf_counter()
            out = qtta_plugins.reconstruct(qm, model, calib, method)
            seconds = time.perf_counter() - start
            print(
                bits, method, f"{seconds:.0f} s", "clean acc", accuracy(out, test.x, test.y),
                flush=True,
            )  # fmt: skip


if __name__ == "__main__":
    main()

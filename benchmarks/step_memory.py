"""The memory one adaptation step needs, against plain inference, measured the same way for every
row (issue 15, part 5).

Not a config: a warm step's own working memory needs each row in a fresh process with glibc's mmap
threshold fixed, where a harness cell measures its whole adaptation loop, set-up included, in one
process (``peak_extra_mb``); the peak itself is the harness's (``qtta_plugins.bench.measure
.PeakMemory``: the kernel's high-water mark, reset before and read after the measured steps).

    python benchmarks/step_memory.py                     # ResNet-18, W8A8, batch 64 and 256
    python benchmarks/step_memory.py --backends brevitas --batch-sizes 256

Each (backend, row, batch size) runs in a fresh process: the cached ResNet-18 of
benchmarks/configs/zoa_cost.yaml, quantized W8A8 by ``qtta_plugins.quantize``, two warm-up steps on a batch
of Fashion-MNIST test images (the lazy set-up: prefix probe, source statistics, optimizer state),
then the resident set size is read, the kernel's high-water mark is reset (``/proc/self/clear_refs``)
and three more steps run (``PeakMemory`` does both). A step's working memory is the high-water mark over the resident size
before it: what the step allocates and frees, activations kept for a backward pass included.
glibc's malloc runs with a fixed mmap threshold (``MALLOC_MMAP_THRESHOLD_``), so that every tensor
of more than 64 KiB comes from, and goes back to, the kernel: otherwise freed warm-up buffers are
kept in the heap and later steps reuse them unseen. Linux only. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

ROWS = {
    "plain": None,
    "norm": ("norm", {}),
    "tent": ("tent", {}),
    "zoa": ("zoa", {"norm_layers": "middle", "skip_converged": False}),
    "zoa, two whole passes": (
        "zoa",
        {"norm_layers": "middle", "skip_converged": False, "reuse_prefix": False},
    ),
    "zoa, late norms": ("zoa", {"norm_layers": "late", "skip_converged": False}),
    "zoa, late norms + skip_converged": ("zoa", {"norm_layers": "late", "skip_converged": True}),
    "foa": ("foa", {}),
}


def child(backend: str, row: str, batch_size: int, threads: int) -> dict[str, float]:
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    os.environ.setdefault("QTTA_QUIET", "1")
    warnings.filterwarnings("ignore")
    import torch

    import qtta_plugins
    from qtta_plugins.bench.measure import PeakMemory
    from qtta_plugins.data import load_source, to_channels
    from qtta_plugins.models import train_source_model

    torch.set_num_threads(threads)
    model = train_source_model("resnet18", "fashion-mnist", epochs=3, max_train=20000)
    train, test = load_source("fashion-mnist", n_test=batch_size)
    calib_x = to_channels(train.x[:512], 3)
    calib = [calib_x[i : i + 64] for i in range(0, 512, 64)]
    x = to_channels(test.x[:batch_size], 3)
    qmodel = qtta_plugins.quantize(model, backend, "w8a8", calib)
    del model, train, calib, calib_x
    if ROWS[row] is None:
        plain = qtta_plugins.copy_model(qmodel).eval()

        def step() -> None:
            with torch.no_grad():
                plain(x)

    else:
        method, options = ROWS[row]
        run = qtta_plugins.adapt(qmodel, None, method, progress=False, **options)

        def step() -> None:
            run.step(x)

    for _ in range(2):
        step()
    with PeakMemory() as memory:  # the resident size, then the high-water mark reset to it
        for _ in range(3):
            step()
    if memory.method != "VmHWM":
        raise RuntimeError(f"step_memory needs Linux's VmHWM; got {memory.method}")
    return {"step_mb": memory.extra_mb, "rss_mb": memory.start_kb / 1024}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", nargs="+", default=None)
    parser.add_argument("--rows", nargs="+", default=list(ROWS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/step_memory.json")
    parser.add_argument(
        "--child", nargs=3, metavar=("BACKEND", "ROW", "BATCH"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    from qtta_plugins.bench.cache import write_json_atomic

    if args.child:
        backend, row, batch = args.child
        print(json.dumps(child(backend, row, int(batch), args.threads)))
        return
    backends = args.backends or [
        b for b in ("torchao", "brevitas", "nncf") if importlib.util.find_spec(b) is not None
    ]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    results: dict[str, dict] = {"setup": vars(args), "rows": {}}
    print("| backend | batch | row | step working memory (MB) | x plain inference |")
    print("|---|---|---|---|---|")
    for backend in backends:
        for batch in args.batch_sizes:
            plain_mb = None
            for row in ["plain", *[r for r in args.rows if r != "plain"]]:
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--threads",
                        str(args.threads),
                        "--child",
                        backend,
                        row,
                        str(batch),
                    ],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                measured = json.loads(out.stdout.strip().splitlines()[-1])
                if row == "plain":
                    plain_mb = measured["step_mb"]
                ratio = measured["step_mb"] / plain_mb if plain_mb else float("nan")
                measured["x_plain"] = ratio
                results["rows"].setdefault(backend, {}).setdefault(str(batch), {})[row] = measured
                print(
                    f"| {backend} | {batch} | {row} | {measured['step_mb']:.1f} | {ratio:.2f}x |",
                    flush=True,
                )
                write_json_atomic(Path(args.out), results)


if __name__ == "__main__":
    main()

"""Peak memory when streaming from disk: adapting over 2,000 images costs what adapting over 64 does.

    python benchmarks/stream_memory.py [--images 2000] [--small 64] [--batch-size 32]
                                       [--num-workers 0] [--threads 1] [--out FILE]

Issue 35's streaming target: adapting over a 2,000-image, 224 px ImageNet-C-layout tree keeps the
process's peak resident memory within 300 MB of adapting over 64 images of it. What runs:

* the data: an ImageNet-C tree, ``<cache>/stream-memory/imagenet-c-<n>/ImageNet-C/gaussian_noise/5/
  <wnid>/*.JPEG`` under :func:`qtta_plugins.data.cache_dir`, of ``--images`` generated noise images
  (224 x 224 RGB JPEGs, 20 classes), written once and reused;
* the model: torchvision's ResNet-18 (1,000 classes) with random weights drawn under seed 0, saved
  once to a state-dict file next to the tree and loaded through
  ``qtta_plugins.models.load_model("torchvision:resnet18", weights=...)``; quantized by torchao
  at W8A8 on the first 64 images of the stream (the same calibration in both runs);
* the run: ``qtta_plugins.adapt(qmodel, stream, "norm")`` over the whole stream, and over 64 images
  of it (``per_domain=64``), each in a fresh subprocess (``make_stream("continual", "imagenet-c",
  ...)``: a DataLoader decodes batch by batch, ``--num-workers`` worker processes, 0 by default so
  that decoding happens in the measured process too).

Each subprocess reports two peaks, both the kernel's high-water mark ``VmHWM`` of
``/proc/self/status``: the whole process's (set-up included: imports, the model, torchao's export
and calibration), and the adaptation loop's alone (the mark is reset by writing ``5`` to
``/proc/self/clear_refs`` just before ``adapt``, so it is the loop's peak resident memory, the
model and everything set up before it included). The target is read on both differences. With
workers, their own peak (``ru_maxrss`` of the children, after they exit) is reported beside it.
The results go to ``--out`` (default ``benchmarks/results/stream_memory.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("QTTA_QUIET", "1")

CORRUPTION, SEVERITY, CLASSES, SIZE = "gaussian_noise", 5, 20, 224
TARGET_MB = 300.0
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def status_kb(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmHWM``, ``VmRSS``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux >= 4.0); False where refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# --- the data and the weights, written once ---------------------------------------------------------
def workdir() -> Path:
    from qtta_plugins.data import cache_dir

    return Path(cache_dir()) / "stream-memory"


def ensure_tree(images: int) -> Path:
    """The ImageNet-C tree of ``images`` noise JPEGs (written once: a marker says it is whole)."""
    import numpy as np
    from PIL import Image

    root = workdir() / f"imagenet-c-{images}"
    marker = root / "complete.json"
    if marker.exists() and json.loads(marker.read_text()).get("images") == images:
        return root
    rng = np.random.default_rng(0)
    base = root / "ImageNet-C" / CORRUPTION / str(SEVERITY)
    for i in range(images):
        folder = base / f"n{i % CLASSES:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        # smooth colour noise plus pixel noise: a JPEG of a realistic size (tens of kB)
        coarse = Image.fromarray((rng.random((14, 14, 3)) * 255).astype(np.uint8))
        pixels = np.asarray(coarse.resize((SIZE, SIZE), Image.BILINEAR), dtype=np.int16)
        pixels = pixels + rng.integers(-24, 25, (SIZE, SIZE, 3))
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        image.save(folder / f"image_{i:05d}.JPEG", quality=90)
    marker.write_text(json.dumps({"images": images, "size": SIZE, "classes": CLASSES}))
    return root


def ensure_weights() -> Path:
    """ResNet-18's random weights under seed 0, as a state-dict file (written once)."""
    import torch

    from qtta_plugins.models import load_model

    path = workdir() / "resnet18-random-seed0.pt"
    if not path.exists():
        torch.manual_seed(0)
        model = load_model("torchvision:resnet18", num_classes=1000)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)
    return path


# --- one measured run, in its own process -----------------------------------------------------------
def child(args: argparse.Namespace) -> None:
    import warnings

    import torch

    import qtta_plugins
    from qtta_plugins.data import make_stream
    from qtta_plugins.models import load_model
    from qtta_plugins.models.zoo import import_torchvision

    warnings.filterwarnings("ignore")  # torchvision's build, torch.export's notes: not measured
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    T = import_torchvision().transforms  # through the zoo: a wheel whose ops do not load works
    transform = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])

    def stream(per_domain: int | None):
        return make_stream(
            "continual",
            "imagenet-c",
            root=args.root,
            corruptions=[CORRUPTION],
            severity=SEVERITY,
            batch_size=args.batch_size,
            per_domain=per_domain,
            transform=transform,
            num_workers=args.num_workers,
            seed=0,
        )

    model = load_model("torchvision:resnet18", weights=args.weights)
    calib = [b.x for b in stream(args.small)]  # the same 64 images in both runs
    qmodel = qtta_plugins.quantize(model, "torchao", "w8a8", calib)
    del model
    setup_s = time.perf_counter() - start
    setup_hwm, setup_rss = status_kb("VmHWM"), status_kb("VmRSS")
    reset = reset_peak()  # from here the mark is the loop's peak
    data = stream(None if args.child == args.images else args.child)
    start = time.perf_counter()
    run = qtta_plugins.adapt(qmodel, data, "norm", inplace=True, progress=False)
    adapt_s = time.perf_counter() - start
    end_hwm = status_kb("VmHWM")
    out = {
        "images": int(run.predictions.numel()),
        "batches": run.batches,
        "peak_process_mb": max(setup_hwm, end_hwm) / 1024,
        "peak_loop_mb": end_hwm / 1024 if reset else None,
        "rss_before_loop_mb": setup_rss / 1024,
        "peak_workers_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "setup_seconds": round(setup_s, 1),
        "adapt_seconds": round(adapt_s, 1),
    }
    print(json.dumps(out), flush=True)


def measure(args: argparse.Namespace, n: int, root: Path, weights: Path) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        str(n),
        "--root",
        str(root),
        "--weights",
        str(weights),
        "--images",
        str(args.images),
        "--small",
        str(args.small),
        "--batch-size",
        str(args.batch_size),
        "--num-workers",
        str(args.num_workers),
        "--threads",
        str(args.threads),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"the run over {n} images failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="images in the tree")
    parser.add_argument("--small", type=int, default=64, help="images of the short run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", default="benchmarks/results/stream_memory.json")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args)
        return
    if not 0 < args.small < args.images:
        parser.error("--small must be between 0 and --images")
    t = time.perf_counter()
    root, weights = ensure_tree(args.images), ensure_weights()
    print(f"data: {root} ({args.images} images, {time.perf_counter() - t:.0f} s to prepare)")
    runs = {n: measure(args, n, root, weights) for n in (args.small, args.images)}
    small, full = runs[args.small], runs[args.images]
    print(
        f"resnet18 (random weights), torchao W8A8, method norm, batch {args.batch_size}, "
        f"{SIZE} px JPEGs, num_workers {args.num_workers}, {args.threads} thread(s)"
    )
    print(f"{'images':>7} {'batches':>8} {'peak, process':>14} {'peak, loop':>11} {'seconds':>8}")
    for r in (small, full):
        loop = f"{r['peak_loop_mb']:.0f} MB" if r["peak_loop_mb"] is not None else "n/a"
        seconds = r["setup_seconds"] + r["adapt_seconds"]
        print(
            f"{r['images']:>7} {r['batches']:>8} {r['peak_process_mb']:>11.0f} MB {loop:>11} "
            f"{seconds:>8.0f}"
        )
    diff = {"process": full["peak_process_mb"] - small["peak_process_mb"]}
    if full["peak_loop_mb"] is not None and small["peak_loop_mb"] is not None:
        diff["loop"] = full["peak_loop_mb"] - small["peak_loop_mb"]
    for key, value in diff.items():
        verdict = "within" if value <= TARGET_MB else "MISSES"
        print(f"difference, {key} peak: {value:+.0f} MB ({verdict} the {TARGET_MB:.0f} MB target)")
    if args.num_workers:
        print(
            "decoding workers' peak: "
            + ", ".join(
                f"{r['images']} images {r['peak_workers_mb']:.0f} MB" for r in runs.values()
            )
        )
    record = {
        "command": "python benchmarks/stream_memory.py "
        + " ".join(
            f"--{k.replace('_', '-')} {getattr(args, k)}"
            for k in ("images", "small", "batch_size", "num_workers", "threads")
        ),
        "model": "torchvision:resnet18, random weights (seed 0), torchao w8a8, method norm",
        "image_size": SIZE,
        "runs": [small, full],
        "difference_mb": diff,
        "target_mb": TARGET_MB,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"results: {out}")


if __name__ == "__main__":
    main()

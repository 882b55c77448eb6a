"""The architectures users ship, on every backend: docs/architectures.md (issue 13).

    python benchmarks/architectures.py                    # trains (cached), measures, writes JSON
    python benchmarks/architectures.py --render benchmarks/results/architectures.json

Models: torchvision ResNet-18, MobileNetV2, MobileNetV3-Small and a timm ViT (patch 4, 4 blocks,
width 192), unmodified, trained on Fashion-MNIST at 32 px (gray replicated to RGB) on a seeded
subset of the training split (``--max-train``; a 2-core CPU takes minutes per full epoch), and
cached. Per (architecture, backend): clean accuracy of the float model, W8A8 and W4A4 (our
``quantize``, 512 calibration images, first / last layer at 8 bit) on ``--n-clean`` test images;
mean error on Fashion-MNIST-C (15 corruptions, severity 5, continual, no reset, ``--n-per-domain``
images per corruption, batch 64) at W8A8 for source, norm, tent and zoa; time per batch of each
method as a ratio to plain inference of the same quantized model, paired batch by batch in the
same run (``zoa_benchmark.run_row``). One seed: this page says what works on which model, it does
not rank methods (the seeded comparisons are in docs/zoa.md, docs/ttaq.md and their issues).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("QTTA_QUIET", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import qtta_plugins  # noqa: E402
from qtta_plugins.data import continual_stream, load_source, to_channels  # noqa: E402
from qtta_plugins.models import accuracy, train_source_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoa_benchmark import run_row  # noqa: E402

ARCHS = ("resnet18", "mobilenet_v2", "mobilenet_v3_small", "timm-vit")
#: training recipe per architecture (AdamW, one-cycle; see train_source_model)
RECIPES = {
    "resnet18": {"epochs": 3, "lr": 2e-3},
    "mobilenet_v2": {"epochs": 3, "lr": 2e-3},
    "mobilenet_v3_small": {"epochs": 3, "lr": 2e-3},
    "timm-vit": {"epochs": 3, "lr": 1e-3},
}
METHODS = ("source", "norm", "tent", "zoa")


def train(arch: str, max_train: int, seed: int) -> tuple[torch.nn.Module, float]:
    """The cached source model, and the seconds it took to train (0.0 when it came from the cache)."""
    start = time.perf_counter()
    model = train_source_model(
        arch, "fashion-mnist", seed=seed, max_train=max_train, **RECIPES[arch]
    )
    return model, time.perf_counter() - start


def has_batch_norm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--archs", nargs="+", default=list(ARCHS))
    parser.add_argument("--backends", nargs="+", default=None)
    parser.add_argument("--max-train", type=int, default=20000)
    parser.add_argument("--n-clean", type=int, default=2000)
    parser.add_argument("--n-per-domain", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/architectures.json")
    parser.add_argument("--render", default=None, help="print the markdown of a results file")
    args = parser.parse_args(argv)
    if args.render:
        print(markdown(json.loads(Path(args.render).read_text())), end="")
        return
    torch.set_num_threads(args.threads)
    backends = args.backends or [
        b for b in ("torchao", "brevitas", "nncf") if importlib.util.find_spec(b) is not None
    ]
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {"archs": {}}
    results["setup"] = {
        "max_train": args.max_train,
        "n_clean": args.n_clean,
        "n_per_domain": args.n_per_domain,
        "threads": args.threads,
        "seed": args.seed,
        "recipes": RECIPES,
    }
    train_set, test = load_source("fashion-mnist", n_test=args.n_clean, seed=args.seed)
    x_clean, y_clean = to_channels(test.x, 3), test.y
    calib_x = to_channels(train_set.x[:512], 3)
    calib = [calib_x[i : i + 64] for i in range(0, 512, 64)]
    for arch in args.archs:
        model, seconds = train(arch, args.max_train, args.seed)
        entry = results["archs"].setdefault(arch, {"backends": {}})
        if seconds > 5:  # trained now, not loaded
            entry["train_seconds"] = seconds
        entry["params"] = sum(p.numel() for p in model.parameters())
        entry["float"] = accuracy(model, x_clean, y_clean)
        print(f"{arch}: float {entry['float']:.1f}% (trained in {seconds:.0f} s)", flush=True)
        if args.train_only:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1))
            continue
        stream = continual_stream(
            "fashion-mnist",
            severity=5,
            batch_size=64,
            n_test=args.n_per_domain,
            seed=args.seed,
            channels=3,
        )
        for backend in backends:
            row: dict = {}
            for bits in ("w8a8", "w4a4"):
                qmodel = qtta_plugins.quantize(model, backend, bits, calib)
                row[bits] = accuracy(qmodel, x_clean, y_clean)
            qmodel = qtta_plugins.quantize(model, backend, "w8a8", calib)
            for method in METHODS:
                if method == "norm" and not has_batch_norm(model):
                    continue
                stats, _ = run_row(qmodel, stream, method, {})
                row[method] = {
                    "mean_error": stats["errors"]["mean"],
                    "time_ratio": stats["time_ratio"],
                }
            entry["backends"][backend] = row
            print(f"  {backend}: {json.dumps(row)}", flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1))
    print(markdown(results), end="")


def markdown(results: dict) -> str:
    setup = results["setup"]
    lines = [
        f"Clean accuracy on {setup['n_clean']} Fashion-MNIST test images; mean error (%) on "
        f"Fashion-MNIST-C (15 corruptions, severity 5, continual, {setup['n_per_domain']} "
        "images each, batch 64) at W8A8; time per batch as a ratio to plain inference of the "
        f"same quantized model ({setup['threads']} threads, seed {setup['seed']}).",
        "",
        "| model | backend | float | W8A8 | W4A4 | source | norm | tent | zoa | "
        "norm time | tent time | zoa time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arch, entry in results["archs"].items():
        for backend, row in entry.get("backends", {}).items():

            def err(m: str, row: dict = row) -> str:
                return f"{row[m]['mean_error']:.1f}" if m in row else "n/a"

            def ratio(m: str, row: dict = row) -> str:
                return f"{row[m]['time_ratio']:.2f}x" if m in row else "n/a"

            lines.append(
                f"| {arch} | {backend} | {entry['float']:.1f} | {row['w8a8']:.1f} | "
                f"{row['w4a4']:.1f} | {err('source')} | {err('norm')} | {err('tent')} | "
                f"{err('zoa')} | {ratio('norm')} | {ratio('tent')} | {ratio('zoa')} |"
            )
    lines += ["", "| model | parameters | training images | epochs | training time (s) |"]
    lines += ["|---|---|---|---|---|"]
    for arch, entry in results["archs"].items():
        recipe = setup["recipes"][arch]
        seconds = entry.get("train_seconds")
        lines.append(
            f"| {arch} | {entry['params'] / 1e6:.2f} M | {setup['max_train']} | "
            f"{recipe['epochs']} | {f'{seconds:.0f}' if seconds else 'cached'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""Train the realistic-strength source models of issue 37's regime and record what they cost.

Each model is ``train_source_model(arch, "fashion-mnist", ...)`` on the whole 60,000-image training
split at 32 px (gray replicated to RGB for the shipped architectures), the package's recipe:
random shifts of up to 2 px, AdamW with a one-cycle schedule, batch 64, seed 0. The model lands in
the user cache (``~/.cache/qtta-plugins/models``), where a config's ``model: {spec: ARCH, train:
{source: fashion-mnist, epochs: E, ...}}`` finds it. The record (results file) holds the recipe,
the training time in minutes at the stated thread count, and the clean accuracy on the whole
10,000-image Fashion-MNIST test split.

    python benchmarks/source_models.py resnet18 --epochs 10
    python benchmarks/source_models.py timm-vit --epochs 14 --lr 1e-3
    python benchmarks/source_models.py mobilenet_v2 --epochs 12

Records are merged into ``benchmarks/results/source_models.json`` (one entry per arch + recipe), so
two archs can train at once in two processes of one thread each. A model already in the cache is
loaded, not retrained: its entry then keeps the training time of the run that trained it.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("QTTA_QUIET", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from qtta_plugins.data import load_source, to_channels  # noqa: E402
from qtta_plugins.models import (  # noqa: E402
    accuracy,
    input_channels,
    source_model_path,
    train_source_model,
)

OUT = Path("benchmarks/results/source_models.json")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("arch")
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    recipe = {
        "source": "fashion-mnist",
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "seed": args.seed,
    }
    path = source_model_path(args.arch, **recipe)
    trained_here = not path.exists()
    start = time.perf_counter()
    model = train_source_model(args.arch, progress=False, **recipe)
    minutes = (time.perf_counter() - start) / 60
    _, test = load_source("fashion-mnist")
    with torch.no_grad():
        clean = accuracy(model, to_channels(test.x, input_channels(args.arch)), test.y)
    entry = {
        "arch": args.arch,
        "recipe": recipe,
        "train_images": 60000,
        "test_images": len(test),
        "clean_accuracy": round(clean, 2),
        "cache_file": path.name,
    }
    if trained_here:
        entry.update(
            train_minutes=round(minutes, 1),
            threads=args.threads,
            cpu=platform.processor() or platform.machine(),
        )
    _merge(args.out, f"{args.arch} e{args.epochs} lr{args.lr} s{args.seed}", entry)
    print(json.dumps(entry, indent=1))


def _merge(out: Path, key: str, entry: dict) -> None:
    """Add ``entry`` under ``key`` to the results file, holding a lock so that two processes
    training at once both land; an entry trained before keeps its training time."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(Path(tempfile.gettempdir()) / "qtta_source_models.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        records = json.loads(out.read_text()) if out.exists() else {}
        old = records.get(key, {})
        records[key] = {**{k: v for k, v in old.items() if k not in entry}, **entry}
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
        tmp.replace(out)


if __name__ == "__main__":
    main()

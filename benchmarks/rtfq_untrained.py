"""The bank before any training: what BN recalibration on the target alone gives (issue 14, part 4).

    python benchmarks/rtfq_untrained.py --task "fashion->fashion-fog" --seeds 0 1 2

For each seed, the source model and splits of ``rtfq_benchmark.py``; the default bank is built and
not trained, and chosen subnets are evaluated on the held-out target split with their norm
statistics recalibrated on target images (as every trained bank's are). Against source only
(source statistics) and the benchmark's float UDA and bank rows, this separates what the target's
norm statistics do from what 100 steps of UDA training do. The float model is also trained 25 and
100 steps on the UDA loss (``float_uda``, target statistics after), and 100 steps on the source
cross-entropy alone (no information maximisation): where UDA loses against recalibration alone,
this says which term loses it.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("QTTA_QUIET", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from qtta_plugins.methods.rtfq import RTFQConfig, Subnet, SubnetBank  # noqa: E402
from qtta_plugins.models import accuracy  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rtfq_benchmark import float_uda, task_data  # noqa: E402

SUBNETS = (Subnet(1.0, 32, 8), Subnet(0.75, 28, 6), Subnet(0.5, 24, 4))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", default="fashion->fashion-fog")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = {"float UDA 25 steps": (25, 1.0), "float UDA 100 steps": (100, 1.0)}
    runs["float, source CE only, 100 steps"] = (100, 0.0)
    names = [f"untrained bank {s.name}" for s in SUBNETS] + list(runs)
    print("| seed | source only | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 2) + "|")
    for seed in args.seeds:
        data = task_data(args.task, seed, False, "resnet18")
        x, y = data["test"]
        bank = SubnetBank(data["model"], data["target"], RTFQConfig(seed=seed, progress=False))
        cells = []
        for subnet in SUBNETS:
            bank.recalibrate(subnet)
            cells.append(f"{accuracy(bank, x, y):.1f}")
        source, target, lr = data["source"], data["target"], RTFQConfig.lr
        for steps, im_weight in runs.values():
            model = float_uda(data["model"], source, target, steps, 64, lr, seed, im_weight)
            cells.append(f"{accuracy(model, x, y):.1f}")
        source = accuracy(data["model"].eval(), x, y)
        print(f"| {seed} | {source:.1f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

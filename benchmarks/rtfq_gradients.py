"""Why a bank on a pretrained ResNet-18 does not adapt its largest subnet (issue 14, part 4).

    python benchmarks/rtfq_gradients.py --task "mnist->digits" --seed 0

On one training batch of the untrained default bank, each subnet of a SandwichQ step (the largest
at the top bits as teacher, the smallest at the lowest bits, one subnet of each width at every
bit-width) is run on the bank's UDA loss and its gradient on the shared weights taken alone.
Printed per subnet: the loss, the gradient's norm, and its cosine with the teacher's gradient;
then the norm of the students' mean gradient (what ``train_bank`` adds to the teacher's) and its
cosine with the teacher's. No distillation term: at the first step its weight is 0 (warm-up).
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
import torch.nn.functional as F  # noqa: E402

from qtta_plugins.methods.rtfq import (  # noqa: E402
    RTFQConfig,
    Subnet,
    SubnetBank,
    step_sizes,
    uda_loss,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rtfq_benchmark import task_data  # noqa: E402


def gradient(bank: SubnetBank, subnet: Subnet, x_s, y_s, x_t) -> tuple[float, torch.Tensor]:
    """The UDA loss of ``subnet`` on the batch and its gradient on the shared weights (flat)."""
    bank.zero_grad(set_to_none=True)
    bank.set_subnet(subnet)
    loss = uda_loss(bank(torch.cat([x_s, x_t])), y_s, im_weight=1.0)
    loss.backward()
    scales = {id(p) for p in step_sizes(bank)}
    flat = [
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
        for p in bank.parameters()
        if p.requires_grad and id(p) not in scales
    ]
    return float(loss), torch.cat(flat)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", default="mnist->digits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = task_data(args.task, args.seed, False, "resnet18")
    cfg = RTFQConfig(seed=args.seed, progress=False)
    bank = SubnetBank(data["model"], data["target"], cfg)
    bank.train()
    gen = torch.Generator().manual_seed(args.seed)
    (xs, ys), xt = data["source"], data["target"]
    i = torch.randperm(len(xs), generator=gen)[: cfg.batch_size]
    j = torch.randperm(len(xt), generator=gen)[: cfg.batch_size]
    x_s, y_s, x_t = xs[i], ys[i], xt[j]
    teacher = Subnet(max(cfg.widths), max(cfg.resolutions), max(cfg.bits))
    students = [Subnet(min(cfg.widths), min(cfg.resolutions), min(cfg.bits))]
    students += [Subnet(w, max(cfg.resolutions), b) for w in cfg.widths for b in cfg.bits]
    students = [s for s in dict.fromkeys(students) if s != teacher]
    loss_t, g_t = gradient(bank, teacher, x_s, y_s, x_t)
    print(f"{args.task} seed {args.seed}, one batch of the untrained bank")
    print("| subnet | role | loss | gradient norm | cosine with the teacher's |")
    print("|---|---|---|---|---|")
    print(f"| {teacher.name} | teacher | {loss_t:.2f} | {g_t.norm():.1f} | 1 |")
    grads = []
    for s in students:
        loss, g = gradient(bank, s, x_s, y_s, x_t)
        grads.append(g)
        cos = float(F.cosine_similarity(g, g_t, dim=0))
        print(f"| {s.name} | student | {loss:.2f} | {g.norm():.1f} | {cos:.2f} |")
    mean = torch.stack(grads).mean(0)
    cos = float(F.cosine_similarity(mean, g_t, dim=0))
    print(f"| mean of the {len(grads)} students | | | {mean.norm():.1f} | {cos:.2f} |")


if __name__ == "__main__":
    main()

"""Training a bank: the plan of subnets per step (SandwichQ, multi-bit), the UDA loss, the
distillation, and the gradient averaging across ranks under ``torch.distributed``."""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ...progress import show_progress
from ...view import model_device
from .bank import SubnetBank
from .config import RTFQConfig, Subnet
from .data import image_supply, labelled_supply


# --- training ---------------------------------------------------------------------------------------
def plan(config: RTFQConfig, rng: random.Random) -> list[tuple[Subnet, bool]]:
    """The subnets of one step, teacher first: ``(subnet, is_teacher)``, each at most once."""
    largest = (max(config.widths), max(config.resolutions))
    smallest = (min(config.widths), min(config.resolutions))
    archs = [
        (rng.choice(config.widths), rng.choice(config.resolutions)) for _ in range(config.n_random)
    ]
    steps: list[tuple[Subnet, bool]] = []
    if config.sandwich:
        steps.append((Subnet(*largest, max(config.bits)), True))
        steps.append((Subnet(*smallest, min(config.bits)), False))
    else:
        archs += [(rng.choice(config.widths), rng.choice(config.resolutions)) for _ in range(2)]
    for w, r in archs:
        chosen = config.bits if config.multi_bit else (rng.choice(config.bits),)
        steps += [(Subnet(w, r, b), False) for b in chosen]
    # once per step each (a one-subnet bank's sandwich is that subnet, trained once)
    seen: set[Subnet] = set()
    return [(s, t) for s, t in steps if not (s in seen or seen.add(s))]


def information_maximisation(logits: torch.Tensor) -> torch.Tensor:
    """Mean prediction entropy minus the entropy of the mean prediction (SHOT's IM loss)."""
    p = logits.softmax(1)
    entropy = -(p * logits.log_softmax(1)).sum(1).mean()
    mean = p.mean(0)
    diversity = -(mean * mean.clamp_min(1e-8).log()).sum()
    return entropy - diversity


def uda_loss(logits: torch.Tensor, y_source: torch.Tensor, im_weight: float) -> torch.Tensor:
    """The bank's UDA loss on one forward pass of ``[source; target]``: cross-entropy on the
    first ``len(y_source)`` rows plus ``im_weight`` x information maximisation on the rest."""
    n = len(y_source)
    return F.cross_entropy(logits[:n], y_source) + im_weight * information_maximisation(logits[n:])


def step_sizes(bank: SubnetBank) -> list[nn.Parameter]:
    """The bank's activation step sizes, each once (layers reading one tensor share theirs)."""
    return list(
        {id(p): p for layer in bank.layers.values() for p in layer.act_scale.values()}.values()
    )


def train_bank(
    bank: SubnetBank,
    source: tuple[torch.Tensor, torch.Tensor] | Iterable[Any],
    target: torch.Tensor | Iterable[Any],
    config: RTFQConfig | None = None,
    *,
    teacher: nn.Module | None = None,
) -> dict[str, float]:
    """UDA training of every subnet at once (SandwichQ + multi-bit + distillation, as switched in
    ``config``, default the bank's). Single process, or one rank of an initialised
    ``torch.distributed`` group. Returns the wall time and the last step's loss.

    ``source``: labelled source batches, ``(x, y)`` pairs (a ``DataLoader`` over a labelled set),
    or one ``(images, labels)`` pair of tensors; ``target``: unlabelled target batches (tensors, or
    ``(x, y)`` pairs whose labels are not used), or one tensor of images. Each step takes one
    batch of each: from tensors, ``config.batch_size`` images drawn without replacement under
    ``config.seed`` (a new permutation each epoch); from batches, the next batch as it comes
    (their batch size is the loader's), reading the data again from the start when it runs out,
    so a loader is never held in memory (a one-shot iterator that runs out is an error: the steps
    done so far stay in the bank). Batches move to the bank's device. Under ``torch.distributed``
    every rank takes its share of each batch, so every rank must see the same batches (tensors
    do, under the shared seed; a shuffled loader needs the same seeded generator on each rank).

    ``teacher``: a fixed model (say the float model after UDA) whose predictions on each target
    batch, at the images' own resolution, every subnet of the plan is distilled towards (with
    ``config.distill``); the bank's largest subnet is then a student like the others. This is
    the distilled separate baseline: a one-subnet bank trained this way is that subnet distilled
    from the float UDA model. The teacher is run in eval mode and not trained."""
    import time

    cfg = config or bank.config
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
    if teacher is not None and not cfg.distill:
        raise ValueError("a teacher is only used with distill=True in the config")
    fixed_teacher = teacher
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    world = torch.distributed.get_world_size() if distributed else 1
    rng = random.Random(cfg.seed)  # the same plan on every rank
    gen = torch.Generator().manual_seed(cfg.seed)
    # both draw lazily from one generator, source first at each step (the order of the draws)
    source_batches = labelled_supply(source, cfg.batch_size, gen, rank, world)
    target_batches = image_supply(target, cfg.batch_size, gen, rank, world)
    device = model_device(bank)
    scales = step_sizes(bank)
    scale_ids = {id(p) for p in scales}
    weights = [p for p in bank.parameters() if p.requires_grad and id(p) not in scale_ids]
    optimizer = torch.optim.Adam(
        [
            {"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
            {"params": scales, "lr": cfg.lr_act},
        ]
    )
    bank.train()
    start = time.perf_counter()
    bar = tqdm(
        range(cfg.train_steps),
        desc="RTF-Q bank",
        disable=not show_progress(cfg.progress) or rank != 0,
        leave=False,
    )
    last = 0.0
    first_steps = round(cfg.largest_first * cfg.train_steps)
    largest = Subnet(max(cfg.widths), max(cfg.resolutions), max(cfg.bits))
    # the distillation warm-up starts where the SandwichQ plan does
    warmup_steps = cfg.distill_warmup * (cfg.train_steps - first_steps)
    for step in bar:
        (x_s, y_s), x_t = next(source_batches), next(target_batches)
        distill_weight = cfg.distill_weight * (
            min(1.0, max(0, step - first_steps) / warmup_steps) if warmup_steps > 0 else 1.0
        )
        x_s, y_s, x_t = x_s.to(device), y_s.to(device), x_t.to(device)
        teacher: torch.Tensor | None = None
        if fixed_teacher is not None:
            teacher = _predict(fixed_teacher, x_t)
        elif cfg.distill and not cfg.sandwich and step >= first_steps:
            bank.set_subnet(largest)
            with torch.no_grad():
                teacher = bank(x_t).softmax(1)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        steps_plan = plan(cfg, rng)  # drawn every step: the same draws whatever largest_first
        if step < first_steps:
            steps_plan = [(largest, fixed_teacher is None)]
        if fixed_teacher is not None:  # every subnet learns from the fixed teacher
            steps_plan = [(subnet, False) for subnet, _ in steps_plan]
        # The teacher's loss counts once and the students' losses are averaged: summed, the
        # students' distillation outweighs the teacher's own adaptation as the plan grows (7
        # students under multi-bit) and every subnet settles on the teacher's early, unadapted
        # target predictions (measured: ~55% on digits for every subnet, against ~80% averaged).
        n_students = max(1, sum(not t for _, t in steps_plan))
        for subnet, is_teacher in steps_plan:
            bank.set_subnet(subnet)
            logits = bank(torch.cat([x_s, x_t]))
            logits_t = logits[len(x_s) :]
            loss = uda_loss(logits, y_s, cfg.im_weight)
            if is_teacher:
                teacher = logits_t.detach().softmax(1)
            elif cfg.distill and teacher is not None:
                kl = F.kl_div(logits_t.log_softmax(1), teacher, reduction="batchmean")
                loss = loss + distill_weight * kl
            if not is_teacher:
                loss = loss / n_students
            loss.backward()
            total += float(loss.detach())
        if distributed:
            _average_gradients(bank, world)
        optimizer.step()
        with torch.no_grad():
            for p in scales:
                p.clamp_(min=1e-8)
        last = total
        bar.set_postfix(loss=f"{total:.3f}")
    bank.eval()
    return {"seconds": time.perf_counter() - start, "loss": last}


def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model``'s class probabilities in eval mode, its own mode left as it was."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(x).softmax(1)
    finally:
        model.train(was_training)


def _average_gradients(model: nn.Module, world: int) -> None:
    """All-reduce every gradient (one flat buffer), then divide by the world size."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n

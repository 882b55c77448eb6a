"""``rtfq``: one set of weights holding many quantized subnets, trained once for a target domain.

Our formulation of RTF-Q (Du et al., arXiv 2408.05752; the paper has no public code: this docstring
and docs/rtfq.md give the algorithm as we run it). A :class:`SubnetBank` wraps a pretrained float CNN (its weights load directly: the
largest subnet *is* the model) and switches three dimensions at run time:

- width: each conv keeps its first ``round(width * C_out)`` output channels and reads as many input
  channels as the tensor it gets has (first-k slicing); batch norms slice alongside; a linear layer
  slices its inputs only, so the classifier keeps every class;
- input resolution: the image is resized (bilinear) before the network; global pooling makes the
  rest size-agnostic;
- bit-width: weights per output channel, symmetric on the backends' narrow grid
  ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` with the scale ``max|w_row| / qmax`` of the sliced weight (what
  every backend's weight observer computes, so a materialized subnet rounds the same way);
  activations per tensor on ``[0, 2^b - 1]`` (signed and symmetric where a layer's input can be
  negative), with a learned step size per (layer, bit-width), LSQ-style; the first and the last
  layer stay at ``first_last_bits`` as :func:`qtta_plugins.quantize` keeps them.

Training (:func:`train_bank`) is unsupervised domain adaptation: cross-entropy on labelled source
batches plus information maximisation on unlabelled target batches (mean prediction entropy minus the
entropy of the mean prediction). Each step runs a *plan* of subnets and takes one optimizer step on
the teacher's loss plus the mean of the other subnets' losses (a sum would let the students'
distillation drown the teacher's own adaptation once the plan grows, see :func:`train_bank`):

- SandwichQ (``sandwich``): the largest architecture at the highest precision, the smallest at the
  lowest, and ``n_random`` random architectures; without it, ``n_random + 2`` random ones;
- multi-bit (``multi_bit``): every random architecture at every bit-width in the same step;
  without it, at one random bit-width;
- distillation (``distill``): every subnet but the largest also fits the largest's target
  predictions (KL); without SandwichQ the teacher is the largest at the highest precision run
  without gradient. Its weight rises linearly from 0 over the first ``distill_warmup`` of the
  steps (default: all of them): at the start the teacher's target predictions are the unadapted
  source model's, and distilling them early held the whole bank there;
- largest first (``largest_first``, default 0: off): the first fraction of the steps trains the
  largest subnet at the highest precision alone, then the plan above runs (OFA's order: adapt the
  full network, then shrink). Measured on a ResNet-18 dev seed it did not help (docs/rtfq.md).

Norm statistics are recalibrated per subnet on target images after training (training itself uses
batch statistics), so every (width, resolution, bits) has its own. Under ``torchrun`` (any
initialised ``torch.distributed`` group, gloo on CPU) every rank draws the same plan and the same
batch indices, takes its share of each batch and gradients are averaged with ``all_reduce`` before
the step: the plan runs several forward passes before one backward, which torch's DDP wrapper does not
support when a bit-width's step sizes go unused in a step, so the averaging is done here.

:meth:`SubnetBank.table` has, per subnet: MACs (``torch.utils.flop_counter``), BitOPs (each layer's
MACs times its weight and activation bits), weight bytes, and accuracy on a held-out target split.
:func:`select_subnet` picks the most accurate subnet within a budget and materializes it with a
backend's own quantizer, writing the bank's learned activation step sizes into the backend's grids.

The code: :mod:`.config` (subnets and the config), :mod:`.layers` (switchable layers),
:mod:`.bank` (the bank, costs, materialization), :mod:`.training` (plan, loss, distributed),
:mod:`.selection` (the budgeted choice); the plugin's hooks are here.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ...hookspecs import hookimpl
from ..base import MethodInfo
from .bank import AtResolution, SubnetBank
from .config import BUDGET_KEYS, RTFQConfig, Subnet
from .layers import SwitchableBatchNorm, SwitchableLayer
from .selection import SubnetChoice, choose
from .training import information_maximisation, plan, step_sizes, train_bank, uda_loss

__all__ = [
    "BUDGET_KEYS",
    "AtResolution",
    "RTFQConfig",
    "Subnet",
    "SubnetBank",
    "SubnetChoice",
    "SwitchableBatchNorm",
    "SwitchableLayer",
    "choose",
    "information_maximisation",
    "plan",
    "step_sizes",
    "train_bank",
    "uda_loss",
]


# --- the plugin -------------------------------------------------------------------------------------
@hookimpl
def qtta_methods() -> list[MethodInfo]:
    return [
        MethodInfo(
            "rtfq",
            "select_subnet",
            "RTF-Q: a bank of quantized subnets (width x resolution x bits) in one set of weights",
            needs_backward=True,
        )
    ]


@hookimpl
def qtta_select_subnet(
    bank: Any, budget: dict[str, float], backend: str | None
) -> nn.Module | None:
    if not isinstance(bank, SubnetBank):
        return None
    row = choose(bank.table(), budget)
    model = bank.materialize(row["subnet"], backend or "torchao")
    model.qtta_subnet = SubnetChoice(row, backend or "torchao", dict(budget))
    return model

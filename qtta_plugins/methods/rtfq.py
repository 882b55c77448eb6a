"""``rtfq``: one set of weights holding many quantized subnets, trained once for a target domain.

Our formulation of RTF-Q (Du et al., arXiv 2408.05752; the paper has no public code, DESIGN §4 gives
the algorithm). A :class:`SubnetBank` wraps a pretrained float CNN (its weights load directly: the
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
  source model's, and distilling them early held the whole bank there.

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
"""

from __future__ import annotations

import itertools
import math
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..hookspecs import hookimpl
from ..models import accuracy
from ..progress import show_progress
from ..view import copy_model, round_ste
from .base import MethodInfo

BUDGET_KEYS = ("macs", "bitops", "bytes")


@dataclass(frozen=True, order=True)
class Subnet:
    """One subnet of a bank: a width multiplier, an input resolution (px) and a bit-width (WbAb)."""

    width: float
    resolution: int
    bits: int

    @property
    def name(self) -> str:
        return f"x{self.width:g}-{self.resolution}px-W{self.bits}A{self.bits}"


@dataclass
class RTFQConfig:
    """How a bank is built and trained; every training ingredient can be switched off (ablations)."""

    widths: tuple[float, ...] = (0.5, 0.75, 1.0)
    resolutions: tuple[int, ...] = (32, 28, 24)
    bits: tuple[int, ...] = (8, 6, 4)
    first_last_bits: int | None = 8
    steps: int = 300
    batch_size: int = 64
    lr: float = 5e-4  # Adam on the shared weights and norm affine parameters
    lr_act: float = 1e-3  # Adam on the activation step sizes
    weight_decay: float = 0.0
    n_random: int = 2
    sandwich: bool = True
    multi_bit: bool = True
    distill: bool = True
    distill_weight: float = 1.0
    # fraction of the steps over which the distillation weight rises linearly from 0: the teacher's
    # target predictions are the unadapted source model's at the start (measured: docs/rtfq.md)
    distill_warmup: float = 1.0
    im_weight: float = 1.0  # information maximisation on the target batch
    recalib_images: int = 512  # target images that set each subnet's norm statistics
    seed: int = 0
    progress: bool | None = None

    def __post_init__(self) -> None:
        self.widths = tuple(sorted(float(w) for w in self.widths))
        self.resolutions = tuple(sorted(int(r) for r in self.resolutions))
        self.bits = tuple(sorted(int(b) for b in self.bits))
        if not self.widths or any(not 0 < w <= 1 for w in self.widths):
            raise ValueError(f"RTFQConfig.widths must be in (0, 1], got {self.widths}")
        if not self.resolutions or any(r < 8 for r in self.resolutions):
            raise ValueError(f"RTFQConfig.resolutions must be >= 8 px, got {self.resolutions}")
        if not self.bits or any(not 2 <= b <= 8 for b in self.bits):
            raise ValueError(f"RTFQConfig.bits must be in 2..8, got {self.bits}")
        if self.first_last_bits is not None and not 2 <= self.first_last_bits <= 8:
            raise ValueError("RTFQConfig.first_last_bits must be 2..8 or None")
        for name in ("steps", "batch_size", "recalib_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RTFQConfig.{name} must be a positive int, got {value!r}")
        if (
            isinstance(self.n_random, bool)
            or not isinstance(self.n_random, int)
            or self.n_random < 0
        ):
            raise ValueError(f"RTFQConfig.n_random must be an int >= 0, got {self.n_random!r}")
        if not isinstance(self.distill_warmup, int | float) or not 0 <= self.distill_warmup <= 1:
            raise ValueError(
                f"RTFQConfig.distill_warmup must be in [0, 1], got {self.distill_warmup!r}"
            )
        for name in ("lr", "lr_act", "weight_decay", "distill_weight", "im_weight"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0 or not math.isfinite(value):
                raise ValueError(f"RTFQConfig.{name} must be a finite number >= 0, got {value!r}")

    def subnets(self) -> list[Subnet]:
        return [
            Subnet(w, r, b)
            for w, r, b in itertools.product(self.widths, self.resolutions, self.bits)
        ]


# --- the switchable network ------------------------------------------------------------------------
class _Switch:
    """What the bank runs now: shared by every switchable layer (a plain object, not a module)."""

    def __init__(self) -> None:
        self.width = 1.0
        self.bits: int | None = None  # None: float
        self.recalibrating = False


def _channels(c: int, width: float) -> int:
    return max(1, round(c * width))


def _quantize_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per output channel, symmetric, narrow range, scale ``max|w_row| / qmax`` (straight-through)."""
    qmax = 2 ** (bits - 1) - 1
    scale = w.detach().abs().flatten(1).amax(1).clamp_min(1e-12) / qmax
    scale = scale.reshape((-1,) + (1,) * (w.ndim - 1))
    return torch.clamp(round_ste(w / scale), -qmax, qmax) * scale


def _act_range(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


class SwitchableLayer(nn.Module):
    """A conv2d / linear whose width, and whose weight and input bit-widths, follow the switch."""

    def __init__(
        self, module: nn.Conv2d | nn.Linear, switch: _Switch, bits: tuple[int, ...]
    ) -> None:
        super().__init__()
        self.depthwise = isinstance(module, nn.Conv2d) and module.groups != 1
        if self.depthwise and not (
            module.groups == module.in_channels == module.out_channels
            and module.weight.shape[1] == 1
        ):
            raise ValueError(
                "RTF-Q's width slicing supports ungrouped and depthwise convolutions "
                f"(groups == channels); got groups={module.groups} for "
                f"{module.in_channels} -> {module.out_channels} channels"
            )
        self.is_conv = isinstance(module, nn.Conv2d)
        self.weight = nn.Parameter(module.weight.detach().clone())
        self.bias = None if module.bias is None else nn.Parameter(module.bias.detach().clone())
        if self.is_conv:
            self.stride, self.padding, self.dilation = (
                module.stride,
                module.padding,
                module.dilation,
            )
        self.switch = switch
        # per bit-width of the bank: this layer's bits (first / last layers may stay higher)
        self.layer_bits: dict[int, int] = {b: b for b in bits}
        self.act_scale = nn.ParameterDict()  # str(bits) -> step size, set by calibrate()
        self.act_signed = False
        self.in_k = self.out_k = 0  # the slice the last forward used

    def out_channels(self, width: float) -> int:
        return _channels(self.weight.shape[0], width) if self.is_conv else self.weight.shape[0]

    @property
    def weight_elements(self) -> int:
        """Elements of the weight slice the last forward used (a depthwise filter reads one
        channel)."""
        per_filter = (
            self.weight[0].numel() if self.depthwise else self.in_k * self.weight[0, 0].numel()
        )
        return self.out_k * per_filter

    def act_grid(self, bits: int) -> tuple[torch.Tensor, int, int]:
        qmin, qmax = _act_range(self.layer_bits[bits], self.act_signed)
        return self.act_scale[str(bits)], qmin, qmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_k = x.shape[1] if self.is_conv else x.shape[-1]
        # a depthwise conv keeps one filter per channel it receives: its groups follow the width
        out_k = in_k if self.depthwise else self.out_channels(self.switch.width)
        self.in_k, self.out_k = in_k, out_k
        w = self.weight[:out_k, :in_k]
        b = None if self.bias is None else self.bias[:out_k]
        bits = self.switch.bits
        if bits is not None:
            scale, qmin, qmax = self.act_grid(bits)
            x = torch.clamp(round_ste(x / scale), qmin, qmax) * scale
            w = _quantize_weight(w, self.layer_bits[bits])
        if self.is_conv:
            groups = in_k if self.depthwise else 1
            return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, groups)
        return F.linear(x, w, b)


class SwitchableBatchNorm(nn.Module):
    """A BatchNorm2d sliced to its input's channels. Training uses batch statistics; evaluation the
    statistics of the active subnet (loaded by the bank); recalibration accumulates them."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        if not bn.affine:
            raise ValueError("RTF-Q needs affine batch norms")
        self.weight = nn.Parameter(bn.weight.detach().clone())
        self.bias = nn.Parameter(bn.bias.detach().clone())
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())
        self.eps = bn.eps
        self.sums: list[torch.Tensor] | None = None  # [n, sum of means, sum of variances]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[1]
        w, b = self.weight[:k], self.bias[:k]
        if self.sums is not None:  # recalibration: normalise with the batch, average its stats
            with torch.no_grad():
                var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=True)
                self.sums = [self.sums[0] + 1, self.sums[1] + mean, self.sums[2] + var]
            return F.batch_norm(x, None, None, w, b, True, 0.0, self.eps)
        if self.training:
            return F.batch_norm(x, None, None, w, b, True, 0.0, self.eps)
        return F.batch_norm(
            x, self.running_mean[:k], self.running_var[:k], w, b, False, 0.0, self.eps
        )


class SubnetBank(nn.Module):
    """A float CNN made switchable in width, input resolution and bit-width (see the module doc).

    ``model``: the pretrained float model (not modified); ``calib``: unlabelled target images that
    set the initial activation step sizes, each subnet's norm statistics and a materialized
    subnet's backend calibration. ``table`` is filled by :meth:`evaluate`.
    """

    def __init__(
        self, model: nn.Module, calib: torch.Tensor, config: RTFQConfig | None = None
    ) -> None:
        super().__init__()
        self.config = config or RTFQConfig()
        if not isinstance(calib, torch.Tensor) or calib.ndim != 4 or len(calib) == 0:
            raise ValueError("calib must be a non-empty (N, C, H, W) tensor of target images")
        if not torch.isfinite(calib).all():
            raise ValueError("calib contains NaN or Inf")
        self.native_resolution = int(calib.shape[-1])
        if max(self.config.resolutions) > self.native_resolution:
            raise ValueError(
                f"resolutions {self.config.resolutions} exceed the images' "
                f"{self.native_resolution} px"
            )
        self.template = copy_model(model).eval()  # the float original, for materialization
        for p in self.template.parameters():
            p.requires_grad_(False)
        self.register_buffer("calib", calib.detach().clone()[: self.config.recalib_images])
        self.switch = _Switch()
        self.resolution = self.native_resolution
        self.net = copy_model(model).eval()
        self.layers: dict[str, SwitchableLayer] = {}
        self.norms: dict[str, SwitchableBatchNorm] = {}
        for name, module in list(self.net.named_modules()):
            if isinstance(module, nn.Conv2d | nn.Linear):
                new: nn.Module = SwitchableLayer(module, self.switch, self.config.bits)
                self.layers[name] = new  # type: ignore[assignment]
            elif isinstance(module, nn.BatchNorm2d):
                new = SwitchableBatchNorm(module)
                self.norms[name] = new  # type: ignore[assignment]
            elif isinstance(module, nn.modules.batchnorm._NormBase | nn.LayerNorm | nn.GroupNorm):
                raise ValueError(
                    f"RTF-Q's width slicing supports Conv2d / Linear / BatchNorm2d models; "
                    f"{name!r} is a {type(module).__name__}"
                )
            else:
                continue
            self.net.set_submodule(name, new)
        if not self.layers:
            raise ValueError("the model has no Conv2d / Linear layer to quantize")
        self.order = self._forward_order()
        flb = self.config.first_last_bits
        if flb is not None:
            for name in (self.order[0], self.order[-1]):
                self.layers[name].layer_bits = {b: flb for b in self.config.bits}
        self._calibrate_act_scales()
        self.norm_stats: dict[Subnet, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.rows: list[dict[str, Any]] = []
        self.eval()

    # -- switching ----------------------------------------------------------------------------------
    def set_subnet(self, subnet: Subnet | None, *, bits: int | None = None) -> None:
        """Run ``subnet`` from now on (its norm statistics too, once recalibrated); ``None``: the
        full float model (``bits`` then picks a precision for the full width and resolution)."""
        if subnet is None:
            self.switch.width, self.resolution, self.switch.bits = 1.0, self.native_resolution, bits
            return
        self.switch.width, self.resolution, self.switch.bits = (
            subnet.width,
            subnet.resolution,
            subnet.bits,
        )
        stats = self.norm_stats.get(subnet)
        if stats is not None:
            with torch.no_grad():
                for name, (mean, var) in stats.items():
                    bn = self.norms[name]
                    bn.running_mean[: len(mean)].copy_(mean)
                    bn.running_var[: len(var)].copy_(var)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = _resize(x, self.resolution)
        return self.net(x)

    def _forward_order(self) -> list[str]:
        order: list[str] = []
        hooks = [
            m.register_forward_pre_hook(
                lambda _m, _a, n=n: order.append(n) if n not in order else None
            )
            for n, m in self.layers.items()
        ]
        try:
            with torch.no_grad():
                self.net(self.calib[:2])
        finally:
            for h in hooks:
                h.remove()
        return order

    @torch.no_grad()
    def _calibrate_act_scales(self) -> None:
        """Each layer's input range on the calibration images (full float model) -> step sizes.

        Layers that read the same tensor (a block's first conv and its shortcut conv) share one
        set of step sizes: the tensor is quantized once, as NNCF (one quantizer where the branches
        split) and pt2e (one observer per edge, set alike here) materialize it."""
        lo: dict[str, float] = {}
        hi: dict[str, float] = {}
        first_inputs: dict[str, torch.Tensor] = {}  # held, so no two live inputs share an id

        def hook_for(name: str):
            def hook(_m: nn.Module, args: tuple) -> None:
                x = args[0]
                first_inputs.setdefault(name, x)
                lo[name] = min(lo.get(name, 0.0), float(x.min()))
                hi[name] = max(hi.get(name, 0.0), float(x.max()))

            return hook

        hooks = [m.register_forward_pre_hook(hook_for(n)) for n, m in self.layers.items()]
        self.set_subnet(None)
        try:
            for i in range(0, len(self.calib), 256):
                self.net(self.calib[i : i + 256])
        finally:
            for h in hooks:
                h.remove()
        for name, layer in self.layers.items():
            layer.act_signed = lo[name] < 0
            for b in self.config.bits:
                _, qmax = _act_range(layer.layer_bits[b], layer.act_signed)
                extent = max(hi[name], -lo[name]) if layer.act_signed else hi[name]
                layer.act_scale[str(b)] = nn.Parameter(torch.tensor(max(extent, 1e-8) / qmax))
        for i, name in enumerate(self.order):
            layer = self.layers[name]
            for earlier in self.order[:i]:
                other = self.layers[earlier]
                if first_inputs[earlier] is first_inputs[name] and (
                    other.layer_bits == layer.layer_bits
                ):
                    layer.act_scale = other.act_scale  # the same ParameterDict: one step size
                    break

    # -- norm statistics ----------------------------------------------------------------------------
    @torch.no_grad()
    def recalibrate(self, subnet: Subnet) -> None:
        """This subnet's norm statistics, averaged over batches of the calibration images."""
        self.set_subnet(subnet)
        was_training = self.training
        self.eval()
        for bn in self.norms.values():
            bn.sums = [0, 0.0, 0.0]
        try:
            for i in range(0, len(self.calib), 128):
                self(self.calib[i : i + 128])
            stats = {}
            for name, bn in self.norms.items():
                n, mean, var = bn.sums  # type: ignore[misc]
                stats[name] = (mean / n, var / n)
        finally:
            for bn in self.norms.values():
                bn.sums = None
            self.train(was_training)
        self.norm_stats[subnet] = stats
        self.set_subnet(subnet)

    # -- costs --------------------------------------------------------------------------------------
    @torch.no_grad()
    def costs(self, subnet: Subnet) -> dict[str, float]:
        """MACs (flop counter), BitOPs and weight bytes of ``subnet`` on one image."""
        from torch.utils.flop_counter import FlopCounterMode

        self.set_subnet(subnet)
        was_training = self.training
        self.eval()
        x = self.calib[:1]
        counter = FlopCounterMode(display=False)
        try:
            with counter:
                self(x)
        finally:
            self.train(was_training)
        per_module = counter.get_flop_counts()
        bitops = weight_bytes = 0.0
        for name, layer in self.layers.items():
            key = next((k for k in per_module if k.endswith(f"net.{name}")), None)
            flops = sum(per_module[key].values()) if key is not None else 0
            lb = layer.layer_bits[subnet.bits]
            bitops += flops / 2 * lb * lb
            weight_bytes += layer.weight_elements * lb / 8
            if layer.bias is not None:
                weight_bytes += 4 * layer.out_k
        for bn in self.norms.values():
            # a batch norm follows a conv of the same width: weight and bias over its slice
            weight_bytes += 4 * 2 * _channels(len(bn.running_mean), subnet.width)
        macs = sum(per_module.get("Global", {}).values()) / 2
        return {"macs": macs, "bitops": bitops, "bytes": weight_bytes}

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> list[dict[str, Any]]:
        """Recalibrate every subnet and fill :attr:`rows`: costs and accuracy on ``(x, y)``."""
        rows = []
        for subnet in self.config.subnets():
            self.recalibrate(subnet)
            row = {"subnet": subnet, "name": subnet.name, **self.costs(subnet)}
            row["accuracy"] = accuracy(self, x, y)
            rows.append(row)
        self.rows = rows
        return rows

    def table(self) -> list[dict[str, Any]]:
        if not self.rows:
            raise ValueError("the bank has no table yet: call bank.evaluate(x, y) on target data")
        return self.rows

    # -- materialization ----------------------------------------------------------------------------
    @torch.no_grad()
    def float_subnet(self, subnet: Subnet) -> nn.Module:
        """``subnet`` as a plain float model of the original architecture (sliced modules, its own
        norm statistics), resizing its input first when its resolution is not native."""
        if subnet not in self.norm_stats:
            self.recalibrate(subnet)
        self.set_subnet(subnet)
        self.eval()
        self(self.calib[:1])  # records every layer's slice
        model = copy_model(self.template)
        for name, layer in self.layers.items():
            w = layer.weight[: layer.out_k, : layer.in_k].detach().clone()
            b = None if layer.bias is None else layer.bias[: layer.out_k].detach().clone()
            old = model.get_submodule(name)
            if layer.is_conv:
                new: nn.Module = nn.Conv2d(
                    layer.in_k,
                    layer.out_k,
                    old.kernel_size,
                    old.stride,
                    old.padding,
                    old.dilation,
                    groups=layer.in_k if layer.depthwise else 1,
                    bias=b is not None,
                    padding_mode=old.padding_mode,
                )
            else:
                new = nn.Linear(layer.in_k, layer.out_k, bias=b is not None)
            new.weight.copy_(w)
            if b is not None:
                new.bias.copy_(b)
            model.set_submodule(name, new)
        for name, (mean, var) in self.norm_stats[subnet].items():
            bn_old, sw = model.get_submodule(name), self.norms[name]
            k = len(mean)
            bn = nn.BatchNorm2d(k, eps=bn_old.eps, momentum=bn_old.momentum)
            bn.weight.copy_(sw.weight[:k])
            bn.bias.copy_(sw.bias[:k])
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            model.set_submodule(name, bn)
        model.eval()
        if subnet.resolution != self.native_resolution:
            model = AtResolution(model, subnet.resolution).eval()
        return model

    def materialize(self, subnet: Subnet, backend: str) -> nn.Module:
        """``subnet`` quantized by ``backend`` (its own kind of model), with the bank's activation
        step sizes written into the backend's grids where the grids have the bank's form."""
        import qtta_plugins

        from .features import measure_source_statistics

        model = self.float_subnet(subnet)
        prefix = "net." if isinstance(model, AtResolution) else ""
        calib = [self.calib[i : i + 64] for i in range(0, len(self.calib), 64)]
        qmodel = qtta_plugins.quantize(
            model,
            backend,
            (subnet.bits, subnet.bits),
            calib,
            first_last_bits=self.config.first_last_bits,
        )
        view = qtta_plugins.quant_view(qmodel)
        mismatched: list[str] = []
        placed: set[str] = set()
        for qlayer in view.layers():
            name = qlayer.name[len(prefix) :] if qlayer.name.startswith(prefix) else qlayer.name
            layer = self.layers.get(name)
            if layer is None:
                continue
            handle = qlayer.input_quantizer
            if handle is not None and handle.enabled:
                placed.add(handle.name)
                scale, qmin, qmax = layer.act_grid(subnet.bits)
                grid = handle.grid()
                if (grid.qmin, grid.qmax, grid.ch_axis) == (qmin, qmax, None):
                    handle.set_grid(
                        scale.detach().clone().reshape(grid.scale.shape),
                        torch.zeros_like(grid.zero_point),
                    )
                else:
                    mismatched.append(handle.name)
            handle = qlayer.weight_quantizer
            if handle is not None and handle.enabled:
                # The bank's weight scale is max|w_row| / qmax; a backend may calibrate another
                # (e.g. MSE thresholds). Per-channel scaling commutes with a per-channel factor the
                # backend folds in (torchao's w * gamma / sigma), so the max-abs scale of what the
                # backend's quantizer sees rounds exactly as the bank does.
                placed.add(handle.name)
                grid = handle.grid()
                qmax = 2 ** (layer.layer_bits[subnet.bits] - 1) - 1
                if (grid.qmin, grid.qmax, grid.ch_axis) == (-qmax, qmax, 0):
                    seen = view.weight_quantizer_input(qlayer).detach()
                    scale = seen.abs().flatten(1).amax(1).clamp_min(1e-12) / qmax
                    handle.set_grid(scale.reshape(grid.scale.shape), grid.zero_point)
                else:
                    mismatched.append(handle.name)
        # Quantizers the bank has no counterpart for (NNCF also quantizes batch-norm outputs before
        # residual sums): switched off, so the model computes what the bank's table measured.
        extra = [q for q in view.quantizers() if q.enabled and q.name not in placed]
        for q in extra:
            q.enabled = False
        if mismatched:
            warnings.warn(
                f"{backend} quantizes {', '.join(mismatched)} on another grid than the bank's; "
                "those keep the backend's own calibration",
                stacklevel=2,
            )
        qmodel.qtta_disabled_quantizers = [q.name for q in extra]
        # the source statistics quantize kept describe the grids before the bank's were written
        measure_source_statistics(qmodel, calib)
        return qmodel


class AtResolution(nn.Module):
    """Resize the input to ``size`` px (bilinear, as the bank does), then run ``net``."""

    def __init__(self, net: nn.Module, size: int) -> None:
        super().__init__()
        self.net, self.size = net, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(_resize(x, self.size))


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


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


def _batches(n: int, size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    while True:
        order = torch.randperm(n, generator=gen)
        for i in range(0, n - size + 1, size):
            yield order[i : i + size]


def train_bank(
    bank: SubnetBank,
    source: tuple[torch.Tensor, torch.Tensor],
    target: torch.Tensor,
    config: RTFQConfig | None = None,
) -> dict[str, float]:
    """UDA training of every subnet at once (SandwichQ + multi-bit + distillation, as switched in
    ``config``, default the bank's). Single process, or one rank of an initialised
    ``torch.distributed`` group. Returns the wall time and the last step's loss."""
    import time

    cfg = config or bank.config
    xs, ys = source
    if len(xs) < cfg.batch_size or len(target) < cfg.batch_size:
        raise ValueError(f"source and target need at least batch_size={cfg.batch_size} images")
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    world = torch.distributed.get_world_size() if distributed else 1
    rng = random.Random(cfg.seed)  # the same plan on every rank
    gen = torch.Generator().manual_seed(cfg.seed)
    source_batches = _batches(len(xs), cfg.batch_size, gen)
    target_batches = _batches(len(target), cfg.batch_size, gen)
    # layers reading one tensor share their step sizes: each parameter once
    scales = list(
        {id(p): p for layer in bank.layers.values() for p in layer.act_scale.values()}.values()
    )
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
        range(cfg.steps),
        desc="RTF-Q bank",
        disable=not show_progress(cfg.progress) or rank != 0,
        leave=False,
    )
    last = 0.0
    warmup_steps = cfg.distill_warmup * cfg.steps
    for step in bar:
        i_s, i_t = next(source_batches)[rank::world], next(target_batches)[rank::world]
        distill_weight = cfg.distill_weight * (
            min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0
        )
        x_s, y_s, x_t = xs[i_s], ys[i_s], target[i_t]
        teacher: torch.Tensor | None = None
        if cfg.distill and not cfg.sandwich:
            bank.set_subnet(Subnet(max(cfg.widths), max(cfg.resolutions), max(cfg.bits)))
            with torch.no_grad():
                teacher = bank(x_t).softmax(1)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        steps_plan = plan(cfg, rng)
        # The teacher's loss counts once and the students' losses are averaged: summed, the
        # students' distillation outweighs the teacher's own adaptation as the plan grows (7
        # students under multi-bit) and every subnet settles on the teacher's early, unadapted
        # target predictions (measured: ~55% on digits for every subnet, against ~80% averaged).
        n_students = max(1, sum(not t for _, t in steps_plan))
        for subnet, is_teacher in steps_plan:
            bank.set_subnet(subnet)
            logits = bank(torch.cat([x_s, x_t]))
            logits_s, logits_t = logits[: len(x_s)], logits[len(x_s) :]
            loss = F.cross_entropy(logits_s, y_s) + cfg.im_weight * information_maximisation(
                logits_t
            )
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


# --- selection --------------------------------------------------------------------------------------
def choose(rows: list[dict[str, Any]], budget: dict[str, float]) -> dict[str, Any]:
    """The most accurate row within ``budget`` (ties: the cheaper in BitOPs)."""
    feasible = [r for r in rows if all(r[k] <= v for k, v in budget.items())]
    if not feasible:
        needs = ", ".join(f"{k} >= {min(r[k] for r in rows):.4g}" for k in budget)
        raise ValueError(
            f"no subnet of the bank fits the budget {budget}; the smallest feasible budget is "
            f"{needs} (the cheapest subnet per resource)"
        )
    return max(feasible, key=lambda r: (r["accuracy"], -r["bitops"]))


@dataclass
class SubnetChoice:
    """What :func:`select_subnet` picked, attached to the returned model as ``qtta_subnet``."""

    row: dict[str, Any]
    backend: str
    budget: dict[str, float] = field(default_factory=dict)


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

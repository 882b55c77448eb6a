"""The switchable layers: convs / linears that slice their width and quantize their weights and
inputs at the running bit-width, batch norms that slice alongside and keep per-subnet statistics."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...fakequant import fake_quant


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
    return fake_quant(w, scale, None, -qmax, qmax, ste=True)


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
            x = fake_quant(x, scale, None, qmin, qmax, ste=True)
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

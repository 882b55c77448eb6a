"""Range search shared by the adapters: the clipping ratio with the least quantization error.

Min-max ranges leave 2- to 4-bit grids nearly empty (most values round to zero); shrinking the range
to the ratio of the min-max one whose quantization error is least is the usual PTQ fix (BRECQ /
QDrop initialise their weight scales so). Each adapter quantizes with its backend's own grid, so it
passes that as ``error``; the search itself lives here once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .fakequant import fake_quant


def least_error_ratio(
    ratios: Iterable[float | torch.Tensor], error: Callable[[float], torch.Tensor]
) -> torch.Tensor:
    """Per group (a channel, or one tensor), the ratio whose ``error(ratio)`` is least.

    ``error(ratio)`` returns the quantization error of every group with the range scaled by
    ``ratio`` (a tensor of per-group errors, or a 0-d one). On ties the earlier ratio wins. Returns
    the chosen ratios, shaped as the errors.
    """
    best_err: torch.Tensor | None = None
    best: torch.Tensor | None = None
    for ratio in ratios:
        r = float(ratio)
        err = error(r)
        if best_err is None or best is None:
            best_err, best = err, torch.full_like(err, r)
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    if best is None:
        raise ValueError("least_error_ratio needs at least one ratio")
    return best


def symmetric_weight_error(w: torch.Tensor, qmax: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per output channel of ``w`` (``(C, ...)``), the squared error of symmetric round-to-nearest
    quantization on ``[-qmax, qmax]`` with threshold ``threshold`` (``(C,)``)."""
    flat = w.detach().reshape(w.shape[0], -1)

    def error(threshold: torch.Tensor) -> torch.Tensor:
        scale = (threshold / qmax)[:, None]
        return ((fake_quant(flat, scale, None, -qmax, qmax) - flat) ** 2).sum(1)

    return error


def mse_symmetric_thresholds(w: torch.Tensor, qmax: int, steps: int = 100) -> torch.Tensor:
    """Per output channel of ``w`` (``(C, ...)``), the symmetric clipping threshold among ``steps``
    fractions of the channel's absolute maximum whose round-to-nearest error on ``[-qmax, qmax]``
    is least (``(C,)``). What Brevitas' and torchao's weight ranges use."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    flat = w.detach().reshape(w.shape[0], -1).float()
    absmax = flat.abs().amax(1).clamp_min(1e-8)
    error = symmetric_weight_error(flat, qmax)
    fractions = torch.linspace(1.0 / steps, 1.0, steps)
    ratio = least_error_ratio(fractions, lambda r: error(r * absmax))
    return ratio * absmax


# Activation ranges. One rule for every backend below 8 bit: per calibration batch, the 99.999th
# percentile of the values (Brevitas' default activation statistic, ``AbsPercentile`` /
# ``PercentileInterval``), averaged over the batches. Min-max over the whole calibration set lets
# the rarest value set the step (measured: torchao's 4-bit steps 1.0-1.5x Brevitas' layer by layer,
# 9.5 points of W2A4 accuracy); a least-MSE clip overcorrects at 4 bit (NNCF's steps 0.4-0.8x, 5
# points of W4A4 on the digits CNN), because the rare large activations it clips carry the class.
HIGH_PERCENTILE = 99.999


def percentile(x: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-th percentile (0..100) of all of ``x``'s values (nearest rank, as
    ``torch.kthvalue``; ``torch.quantile`` refuses tensors over 2**24 elements)."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q!r}")
    flat = x.detach().reshape(-1).float()
    if flat.numel() == 0:
        raise ValueError("percentile of an empty tensor")
    k = min(max(round(q / 100.0 * flat.numel()), 1), flat.numel())
    return flat.kthvalue(k).values


class ActivationRange:
    """Running activation statistics for one quantizer: per batch the ``high`` percentile of
    ``|x|`` (a symmetric range's threshold) and the ``100 - high`` / ``high`` percentiles of ``x``
    (an asymmetric range's ends), averaged over the batches seen."""

    def __init__(self, high: float = HIGH_PERCENTILE) -> None:
        self.high = high
        self._abs: list[torch.Tensor] = []
        self._low: list[torch.Tensor] = []
        self._high: list[torch.Tensor] = []

    def update(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        self._abs.append(percentile(x.abs(), self.high))
        self._low.append(percentile(x, 100.0 - self.high))
        self._high.append(percentile(x, self.high))

    @property
    def batches(self) -> int:
        return len(self._abs)

    def threshold(self) -> torch.Tensor:
        """The symmetric clipping threshold: mean over batches of the percentile of ``|x|``."""
        if not self._abs:
            raise ValueError("ActivationRange saw no batch")
        return torch.stack(self._abs).mean()

    def interval(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The asymmetric range ``(low, high)``, widened to hold 0 (so that 0 is on the grid)."""
        if not self._low:
            raise ValueError("ActivationRange saw no batch")
        low = torch.stack(self._low).mean().clamp(max=0.0)
        high = torch.stack(self._high).mean().clamp(min=0.0)
        return low, high

"""Range search shared by the adapters: the clipping ratio with the least quantization error.

Min-max ranges leave 2- to 4-bit grids nearly empty (most values round to zero); shrinking the range
to the ratio of the min-max one whose quantization error is least is the usual PTQ fix (BRECQ /
QDrop initialise their weight scales so). Each adapter quantizes with its backend's own grid, so it
passes that as ``error``; the search itself lives here once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


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
        return ((torch.clamp(torch.round(flat / scale), -qmax, qmax) * scale - flat) ** 2).sum(1)

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

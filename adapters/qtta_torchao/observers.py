"""Range observers for torchao's pt2e fake quantizers: per-channel MSE weights, percentile activations.

torchao's pt2e observers offer min-max (and histogram, for activations) ranges; its MSE line-search
observer (``torchao.quantization.observer.AffineQuantizedMSEObserver``) belongs to the affine-quantized
tensor flow and does not fit pt2e's ``FakeQuantize`` (different constructor, no ``calculate_qparams``
over ``qscheme``). Min-max weight ranges leave a 2-bit grid with most weights in the zero bin (W2A4
sat at chance on every reconstruction), so this module subclasses torchao's own
``PerChannelMinMaxObserver`` and replaces only how the range is chosen: per output channel, the
clipping threshold with the least quantization error (:func:`qtta_plugins.ranges.mse_symmetric_thresholds`,
the search Brevitas' and NNCF's ranges use as well). Scale and zero point still come from torchao's
``calculate_qparams``, so the graph, ``convert_pt2e`` and export are torchao's, unchanged.
"""

from __future__ import annotations

import torch

from qtta_plugins.ranges import HIGH_PERCENTILE, mse_symmetric_thresholds, percentile

from ._backend import torchao_module

_pt2e = torchao_module("torchao.quantization.pt2e")


class PerChannelMSEObserver(_pt2e.PerChannelMinMaxObserver):
    """Symmetric per-channel weight observer: ``min_val`` / ``max_val`` are ``-/+`` the MSE threshold.

    The range is that of the tensor seen last (a weight observer sees the same weight on every
    calibration batch: in the QAT graph it is the conv weight with the batch norm folded in on the
    source statistics). The search runs again only when that tensor changes.
    """

    def __init__(self, *args: object, steps: int = 100, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        if self.qscheme != torch.per_channel_symmetric:
            raise ValueError("PerChannelMSEObserver is for per-channel symmetric weights")
        self.steps = steps
        self._searched: torch.Tensor | None = None  # what the current range was chosen for

    def _forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        if x_orig.numel() == 0:
            return x_orig
        x = x_orig.detach()
        if self._searched is not None and torch.equal(self._searched, x):
            return x_orig
        y = x.transpose(0, self.ch_axis) if self.ch_axis else x
        qmax = min(abs(int(self.quant_min)), int(self.quant_max))
        threshold = mse_symmetric_thresholds(y, qmax, self.steps).to(self.min_val.dtype)
        self.min_val.resize_(threshold.shape)
        self.max_val.resize_(threshold.shape)
        self.min_val.copy_(-threshold)
        self.max_val.copy_(threshold)
        self._searched = x.clone()
        return x_orig

    def release(self) -> None:
        """Drop the copy of the last weight (kept only to skip repeated searches in calibration)."""
        self._searched = None


class PercentileObserver(_pt2e.MinMaxObserver):
    """Per-tensor activation observer with the shared percentile rule
    (:mod:`qtta_plugins.ranges`): ``min_val`` / ``max_val`` are the per-batch ``100 - high`` /
    ``high`` percentiles averaged over the batches observed, where torchao's ``MinMaxObserver``
    keeps the extremes of all of them. Below 8 bit the extremes set a step that leaves most
    values in a few bins (measured on the digits CNN at W2A4: 9.5 points of accuracy after
    ``qdrop``); Brevitas' default statistic is this one. Scale and zero point come from
    torchao's ``calculate_qparams``, unchanged."""

    def __init__(self, *args: object, high: float = HIGH_PERCENTILE, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.high = high
        self._batches = 0
        self._low_sum = 0.0
        self._high_sum = 0.0

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        if x_orig.numel() == 0:
            return x_orig
        x = x_orig.detach().to(self.min_val.dtype)
        self._batches += 1
        self._low_sum += float(percentile(x, 100.0 - self.high))
        self._high_sum += float(percentile(x, self.high))
        self.min_val.copy_(torch.tensor(self._low_sum / self._batches))
        self.max_val.copy_(torch.tensor(self._high_sum / self._batches))
        return x_orig

    def reset_min_max_vals(self) -> None:
        super().reset_min_max_vals()
        self._batches = 0
        self._low_sum = self._high_sum = 0.0

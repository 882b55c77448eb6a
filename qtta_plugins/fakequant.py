"""The quantization arithmetic the library shares: one fake-quantization function.

Every place that simulates a quantizer (the view's reference :func:`~qtta_plugins.view.
fake_quantize`, TTAQ's learnable-step activation quantizer, RTF-Q's switchable layers, the
shared range search) computes ``(clamp(round(x / s) + zp, qmin, qmax) - zp) * s`` through
:func:`fake_quant`, so the rounding rule and the order of operations are written once. AdaRound's
weight (``floor(w / s) + h(V)``) learns its rounding instead of taking the nearest and keeps its
own expression in :mod:`qtta_plugins.methods.ttaq`.
"""

from __future__ import annotations

import torch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass (the straight-through estimator
    that quantization-aware training and reconstruction learn through)."""
    return (x.round() - x).detach() + x


def fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor | float,
    zero_point: torch.Tensor | float | None,
    qmin: int,
    qmax: int,
    *,
    ste: bool = False,
) -> torch.Tensor:
    """``(clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale``.

    ``scale`` and ``zero_point`` broadcast against ``x`` as given (shape them along the channel
    axis first, e.g. with :meth:`~qtta_plugins.view.Grid.along`); ``zero_point=None`` is a
    symmetric grid (no zero point: ``clamp(round(x / scale), qmin, qmax) * scale``, the same values
    as a zero point of 0). ``torch.round`` rounds half to even, as torch's, torchao's, Brevitas'
    and NNCF's quantizers do. ``ste=True`` rounds with a straight-through gradient
    (:func:`round_ste`): the gradient on ``x`` passes inside the range, and a learnable ``scale``
    gets LSQ's gradient; without it the function is the reference, not a training op.
    """
    steps = x / scale
    rounded = round_ste(steps) if ste else torch.round(steps)
    if zero_point is None:
        return torch.clamp(rounded, qmin, qmax) * scale
    return (torch.clamp(rounded + zero_point, qmin, qmax) - zero_point) * scale


__all__ = ["fake_quant", "round_ste"]

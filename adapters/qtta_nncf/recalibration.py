"""The batch-overflow policy: activation ranges that batch statistics overflow, found and
recalibrated.

NNCF calibrates every activation quantizer, batch-norm outputs and residual sums included, under
the running statistics. A test-time method that normalises with batch statistics (norm, tent, zoa,
foa) moves those tensors; where the running statistics are far from any batch's the ranges no
longer fit (see :func:`recalibrate_activations`). The view's ``measure_source`` keeps the source
data's batch-mode extremes (:func:`measure_source_extremes`), and its ``prepare_adaptation``
recalibrates from them when they overflow the calibrated ranges
(:func:`recalibrate_if_overflowing`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from qtta_plugins.view import NormMode, kept_source_statistics, source_sample

from .handles import NNCFQuantizerHandle, quantizers_off

if TYPE_CHECKING:
    from .hook_view import NNCFView

EXTREMES_KEY = "nncf_batch_extremes"
"""Where :func:`measure_source_extremes` keeps its figures among the source statistics that
``qtta_plugins.quantize`` keeps (``SourceStatistics.adapter``)."""


def _view(model: nn.Module, example_input: torch.Tensor | None = None) -> NNCFView:
    # Imported here: the view's module imports this one (its prepare_adaptation applies the policy).
    from .hook_view import NNCFView

    return NNCFView(model, example_input=example_input)


def _act_handles(model: nn.Module) -> list[NNCFQuantizerHandle]:
    return [h for h in _view(model).quantizers() if h.role == "act" and h.enabled]


def _activation_extremes(
    model: nn.Module,
    handles: list[NNCFQuantizerHandle],
    batches: list[torch.Tensor],
    mode: NormMode,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per quantizer of ``handles``: the min and max (per channel where it is per channel) of
    what reaches it in the float function (all quantizers off), batch norms in ``mode``."""
    view = _view(model, example_input=batches[0][:1])
    saved_mode = view.norm_mode
    # batch-mode forwards count batches: the model's counters are put back as they were
    counters = {
        name: buf.clone()
        for name, buf in model.named_buffers()
        if name.endswith("num_batches_tracked")
    }
    found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def recorder(handle: NNCFQuantizerHandle):
        shape = tuple(handle.module.scale_shape)

        def record(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            keep = (
                {x.ndim - len(shape) + i for i, n in enumerate(shape) if n != 1}
                if handle.module.per_channel
                else set()
            )
            dims = [d for d in range(x.ndim) if d not in keep]
            lo, hi = x.amin(dims), x.amax(dims)
            if handle.name in found:
                lo = torch.minimum(found[handle.name][0], lo)
                hi = torch.maximum(found[handle.name][1], hi)
            found[handle.name] = (lo, hi)

        return record

    hooks = [h.module.register_forward_pre_hook(recorder(h)) for h in handles]
    try:
        view.set_norm_mode(mode)
        with quantizers_off(model), torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for hook in hooks:
            hook.remove()
        view.set_norm_mode(saved_mode)
        buffers = dict(model.named_buffers())
        for name, value in counters.items():
            buffers[name].copy_(value)
    return found


def _current_range(handle: NNCFQuantizerHandle) -> tuple[torch.Tensor, torch.Tensor]:
    q = handle.module
    with torch.no_grad():
        if handle.symmetric:
            threshold = q.scale.detach().flatten()
            return (-threshold if q.signed else torch.zeros_like(threshold)), threshold
        low = q.input_low.detach().flatten()
        return low, low + q.input_range.detach().flatten()


def batch_mode_overflow(
    model: nn.Module, batches: list[torch.Tensor], factor: float = 1.5
) -> list[str]:
    """The enabled activation quantizers whose calibrated range the float function's tensors
    exceed by more than ``factor`` (or whose unsigned range meets negative values) when the batch
    norms use the statistics of ``batches``; see :func:`recalibrate_activations`."""
    handles = _act_handles(model)
    return _overflowing(handles, _activation_extremes(model, handles, batches, "batch"), factor)


def _overflowing(
    handles: list[NNCFQuantizerHandle],
    extremes: dict[str, tuple[torch.Tensor, torch.Tensor]],
    factor: float = 1.5,
) -> list[str]:
    over = []
    for h in handles:
        lo, hi = (t.flatten() for t in extremes[h.name])
        low, high = _current_range(h)
        span = (high - low).clamp_min(1e-8)
        if bool(
            ((hi - high) > (factor - 1) * span).any() or ((low - lo) > (factor - 1) * span).any()
        ):
            over.append(h.name)
    return over


def recalibrate_activations(
    model: nn.Module, batches: list[torch.Tensor], *, mode: NormMode = "batch"
) -> list[str]:
    """Re-estimate every enabled NNCF activation quantizer's range and sign (min-max of what
    reaches it in the float function, all quantizers off) on ``batches``, with the batch norms in
    ``mode``; in place. Returns the quantizers' names.

    NNCF quantizes batch-norm outputs and residual sums too, all calibrated under the running
    statistics. A test-time method that normalises with batch statistics (norm, tent, zoa, foa)
    moves those tensors: where the running statistics are far from any batch's (a briefly trained
    model, or a strong shift), on a MobileNetV2 the batch-mode tensors spanned 3-4x the calibrated
    ranges, and quantizers calibrated unsigned met negative values. Calibrated on clean source
    batches in batch mode, the ranges are those the adapted model runs in."""
    handles = _act_handles(model)
    _write_ranges(handles, _activation_extremes(model, handles, batches, mode))
    return [h.name for h in handles]


def _write_ranges(
    handles: list[NNCFQuantizerHandle], extremes: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """Each quantizer's sign and range set to cover its ``extremes`` (and zero)."""
    with torch.no_grad():
        for h in handles:
            q = h.module
            lo, hi = extremes[h.name]
            lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
            if h.symmetric:
                q.signed = bool((lo < 0).any())
                threshold = torch.maximum(-lo, hi).clamp_min(1e-8)
                value = threshold.log() if q.is_using_log_scale_storage else threshold
                q._scale_param_storage.copy_(value.reshape(q._scale_param_storage.shape))
            else:
                span = (hi - lo).clamp_min(1e-8)
                value = span.log() if q.is_using_log_scale_storage else span
                q.input_low.copy_(lo.reshape(q.input_low.shape))
                q._input_range_param_storage.copy_(value.reshape(q.input_low.shape))


def _device(model: nn.Module) -> torch.device:
    return next((t.device for t in model.parameters()), torch.device("cpu"))


def measure_source_extremes(view: NNCFView, batches: Sequence[torch.Tensor]) -> dict[str, object]:
    """What :func:`recalibrate_if_overflowing` needs of the source data: each activation
    quantizer's extremes in batch-statistics mode on the first 4 batches (none for a model without
    batch norm statistics)."""
    if not batches or not any(n.has_statistics for n in view.norms()):
        return {}
    device = _device(view.model)
    handles = _act_handles(view.model)
    first = [b.to(device) for b in batches[:4]]
    extremes = _activation_extremes(view.model, handles, first, "batch")
    return {
        EXTREMES_KEY: {
            name: (lo.detach().cpu(), hi.detach().cpu()) for name, (lo, hi) in extremes.items()
        }
    }


def source_extremes(
    view: NNCFView, handles: list[NNCFQuantizerHandle]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """Batch-mode activation extremes on clean data: measured on the calibration sample when
    the model keeps one, else those ``qtta_plugins.quantize`` measured, while the model is
    still as quantized; ``None`` when neither is known."""
    sample = source_sample(view.model)
    if sample is not None and len(sample) >= 2:
        batches = [sample[i : i + 64] for i in range(0, min(len(sample), 256), 64)]
        return _activation_extremes(view.model, handles, batches, "batch")
    stats = kept_source_statistics(view.model)
    if stats is None or EXTREMES_KEY not in stats.adapter:
        return None
    kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = stats.adapter[EXTREMES_KEY]  # type: ignore[assignment]
    if any(h.name not in kept for h in handles) or not stats.matches(view):
        return None
    device = _device(view.model)
    return {name: (lo.to(device), hi.to(device)) for name, (lo, hi) in kept.items()}


def recalibrate_if_overflowing(view: NNCFView) -> list[str]:
    """The policy of :meth:`NNCFView.prepare_adaptation` for activation ranges: on a model with
    batch norm statistics, compare the calibrated ranges with the source data's batch-mode
    extremes (:func:`source_extremes`) and, where batch statistics overflow them, recalibrate every
    activation range from the same measurement (:func:`recalibrate_activations`). Returns the
    messages for the user (none when nothing was found or done)."""
    messages: list[str] = []
    if not any(n.has_statistics for n in view.norms()):
        return messages
    handles = _act_handles(view.model)
    extremes = source_extremes(view, handles)
    if extremes is None:
        if kept_source_statistics(view.model) is not None:
            messages.append(
                "NNCF activation ranges were not checked against batch statistics: the "
                "source measurements qtta_plugins.quantize kept describe the model it "
                "returned, and this one has changed since. Quantize with "
                "keep_calibration_sample=True to have them measured on the model as it is."
            )
        return messages
    over = _overflowing(handles, extremes)
    if over:  # recalibrated from the same batch-mode measurement (recalibrate_activations)
        _write_ranges(handles, extremes)
        messages.append(
            f"{len(over)} NNCF activation range(s) (e.g. {over[0]}) were calibrated under "
            "running statistics that the source data's batch statistics overflow (a model "
            "whose running statistics are far from its batches'): every activation range was "
            "recalibrated on the source sample in batch-statistics mode, which adaptation runs in."
        )
    return messages

"""Quantizing float models with Brevitas: a module swap that keeps the model's own structure.

Every ``nn.Conv1d/2d/3d`` and ``nn.Linear`` becomes the matching ``brevitas.nn.QuantConv*d`` /
``QuantLinear`` with

* a per-output-channel, symmetric, narrow-range weight quantizer whose threshold is an
  ``nn.Parameter`` (``Int8WeightPerChannelFloat`` with ``scaling_impl_type=PARAMETER_FROM_STATS``,
  so it is learnable; a stats-based scale would be recomputed from the weight on every call and
  could not be adapted or reconstructed), set per channel to the clipping range that minimises the
  weights' squared quantization error (:func:`mse_weight_thresholds`);
* a per-tensor input quantizer (``input_quant``) with a learnable threshold initialised from
  runtime statistics: unsigned (``Uint8ActPerTensorFloat``, grid ``0..2^b-1``) when the layer's
  input was non-negative on every calibration batch (after a ReLU), signed
  (``Int8ActPerTensorFloat``, ``-2^(b-1)..2^(b-1)-1``) otherwise;
* a float bias (no bias quantizer: Brevitas' ``Int32Bias`` needs the input scale, which breaks as
  soon as an input quantizer is switched off).

Batch norms, layer norms, activations and functional ops stay as they are (a quantizer on every
compute layer's input covers the functional ReLUs of residual blocks, which a module swap of
``nn.ReLU`` would miss), so BN-adapt and Tent find the norms where the float model had them.
Brevitas' own ``layerwise_quantize`` does a similar swap, but with per-tensor, stats-recomputed
weight scales and one signedness for all inputs.

Calibration: ``brevitas.graph.calibrate.calibration_mode`` on the model in eval mode (batch norms
use their running statistics; only the activation quantizers collect statistics, averaged over the
calibration batches), then each weight quantizer is initialised once so that every threshold is a
materialised parameter in the state dict. This is the plain "MSE / min-max calibration without
reconstruction" baseline (docs/design.md, "Where each method lives"); reconstruction improves on it.

``correct_bn=True`` (off by default; also read from a ``bn_correction`` field of the config, should
:class:`~qtta_plugins.config.QuantConfig` grow one) additionally shifts the batch norms' running
statistics by what quantization moved (:func:`correct_batchnorm`). On the digits BN-CNN it brings
the output error vs float from 0.03 / 0.27 / 1.15 to 0.01 / 0.10 / 0.44 at W8A8 / W4A4 / W2A4
(accuracy at W2A4 from 25 % to 96 %), but the corrected statistics are no longer the float
model's, so switching every quantizer off no longer reproduces the float model (a contract of the
uniform view's conformance suite); hence opt-in.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from qtta_plugins.config import QuantConfig
from qtta_plugins.ranges import mse_symmetric_thresholds

from ._backend import brevitas_module

_COMPUTE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def weight_quantizer(bits: int):
    """Per-output-channel symmetric narrow-range weights (``[-(2^(b-1)-1), 2^(b-1)-1]``) with a
    learnable per-channel threshold, initialised from the weight's absolute maximum on the first
    call (:func:`mse_weight_thresholds` then refines it)."""
    brevitas_module()
    from brevitas.inject.enum import ScalingImplType
    from brevitas.quant import Int8WeightPerChannelFloat

    return Int8WeightPerChannelFloat.let(
        bit_width=bits, scaling_impl_type=ScalingImplType.PARAMETER_FROM_STATS
    )


def act_quantizer(bits: int, signed: bool):
    """Per-tensor activations with a learnable threshold initialised from runtime statistics (the
    99.999th percentile of ``|x|``, averaged over the calibration batches)."""
    brevitas_module()
    from brevitas.quant import Int8ActPerTensorFloat, Uint8ActPerTensorFloat

    return (Int8ActPerTensorFloat if signed else Uint8ActPerTensorFloat).let(bit_width=bits)


def trace_compute_layers(
    model: nn.Module, batches: Sequence[torch.Tensor]
) -> tuple[list[str], dict[str, bool]]:
    """Names of the conv / linear modules in the order the forward pass first calls them, and
    whether each one's input went negative on any of ``batches``."""
    order: list[str] = []
    signed: dict[str, bool] = {}
    handles = []

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            if name not in signed:
                order.append(name)
                signed[name] = False
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.numel():
                signed[name] = signed[name] or bool(x.min() < 0)

        return record

    for name, module in model.named_modules():
        if isinstance(module, _COMPUTE_TYPES):
            handles.append(module.register_forward_pre_hook(hook(name)))
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        for h in handles:
            h.remove()
    return order, signed


def quant_layer(module: nn.Module, w_bits: int, a_bits: int, signed_input: bool) -> nn.Module:
    """The Brevitas counterpart of a float conv / linear, holding the same weight and bias."""
    brevitas_module()
    import brevitas.nn as qnn

    common = {
        "weight_quant": weight_quantizer(w_bits),
        "input_quant": act_quantizer(a_bits, signed_input),
        "bias_quant": None,
        "output_quant": None,
        "return_quant_tensor": False,
        "bias": module.bias is not None,
        "device": module.weight.device,
        "dtype": module.weight.dtype,
    }
    if isinstance(module, nn.Linear):
        q = qnn.QuantLinear(module.in_features, module.out_features, **common)
    else:
        cls = {
            nn.Conv1d: qnn.QuantConv1d,
            nn.Conv2d: qnn.QuantConv2d,
            nn.Conv3d: qnn.QuantConv3d,
        }[next(t for t in (nn.Conv1d, nn.Conv2d, nn.Conv3d) if isinstance(module, t))]
        q = cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            padding_mode=module.padding_mode,
            **common,
        )
    with torch.no_grad():
        q.weight.copy_(module.weight)
        if module.bias is not None:
            q.bias.copy_(module.bias)
    q.train(module.training)
    return q


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def init_weight_scales(model: nn.Module) -> None:
    """Run each weight quantizer once: a ``PARAMETER_FROM_STATS`` threshold is initialised from the
    weight on its first call, and only then appears in the state dict."""
    brevitas_module()
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer as QuantWBIOL

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, QuantWBIOL) and module.weight_quant.is_quant_enabled:
                module.quant_weight()


def mse_weight_thresholds(model: nn.Module, steps: int = 100) -> None:
    """Per output channel, pick the weight threshold (clipping range) that minimises the squared
    quantization error of that channel's weights, among ``steps`` fractions of its absolute maximum.

    Min-max thresholds leave 2- and 3-bit grids nearly empty (most weights round to zero); the MSE
    choice is the usual PTQ fix (BRECQ / QDrop initialise their weight scales the same way). It is
    written into Brevitas' own ``scaling_impl.value`` parameter, so Brevitas' forward uses it.
    """
    brevitas_module()
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer as QuantWBIOL

    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, QuantWBIOL) or not module.weight_quant.is_quant_enabled:
                continue
            tensor_quant = module.weight_quant.tensor_quant
            value = getattr(tensor_quant.scaling_impl, "value", None)
            if not isinstance(value, nn.Parameter) or value.numel() != module.weight.shape[0]:
                continue
            bits = float(tensor_quant.msb_clamp_bit_width_impl())
            threshold = mse_symmetric_thresholds(module.weight, int(2 ** (bits - 1) - 1), steps)
            value.copy_(threshold.reshape(value.shape).to(value.dtype))


def _quant_proxies(model: nn.Module) -> list[nn.Module]:
    brevitas_module()
    from brevitas.proxy.quant_proxy import QuantProxyFromInjector

    return [m for m in model.modules() if isinstance(m, QuantProxyFromInjector)]


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [d for d in range(x.dim()) if d != 1]
    return x.mean(dims), x.var(dims, unbiased=False)


def correct_batchnorm(
    model: nn.Module, batches: Sequence[torch.Tensor], samples: int = 256
) -> None:
    """Shift each batch norm's running statistics by what quantization changed in its input.

    A BN kept after a quantized conv normalises with statistics of the *float* conv's output, and
    quantizing the weights moves each channel's mean and spread (by a large fraction at 2 bits).
    On ``samples`` calibration images, each BN's per-channel input mean and variance are measured
    with the quantizers off and on (BNs corrected in forward order, so each sees its corrected
    predecessors); the running mean moves by the difference of the means and the running variance
    scales by the ratio of the variances. The source statistics learned in training are kept, only
    the quantization-induced shift is removed (re-estimating them on the calibration set instead
    would replace them with a small-sample estimate and cost accuracy at 8 bits).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    bns = [m for m in bns if m.track_running_stats and m.running_mean is not None]
    if not bns:
        return
    x = torch.cat(list(batches))[:samples]
    float_stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(module: nn.Module, args: tuple) -> None:
        float_stats[id(module)] = _channel_stats(args[0])

    def correct(module: nn.Module, args: tuple) -> None:
        if id(module) not in float_stats:
            return
        mean_f, var_f = float_stats.pop(id(module))  # once per module
        mean_q, var_q = _channel_stats(args[0])
        ratio = ((var_q + module.eps) / (var_f + module.eps)).clamp(0.01, 100.0)
        module.running_mean.add_(mean_q - mean_f)
        module.running_var.mul_(ratio)

    proxies = _quant_proxies(model)
    flags = [p.disable_quant for p in proxies]
    training = model.training
    model.eval()
    with torch.no_grad():
        handles = [bn.register_forward_pre_hook(record) for bn in bns]
        try:
            for p in proxies:
                p.disable_quant = True
            model(x)
        finally:
            for h in handles:
                h.remove()
            for p, flag in zip(proxies, flags, strict=True):
                p.disable_quant = flag
        handles = [bn.register_forward_pre_hook(correct) for bn in bns]
        try:
            model(x)
        finally:
            for h in handles:
                h.remove()
    model.train(training)


def quantize(
    model: nn.Module,
    config: QuantConfig,
    calib: Sequence[torch.Tensor],
    *,
    correct_bn: bool = False,
) -> nn.Module:
    """A calibrated Brevitas copy of ``model`` at ``config``'s bit-widths, in eval mode.

    The first and last compute layers in forward order keep ``config.first_last_bits`` for their
    weights and inputs (unless it is ``None``); ``calib[: config.calib_batches]`` calibrates the
    activation thresholds; ``correct_bn`` see the module docstring. ``model`` is not modified.
    """
    calibration_mode = brevitas_module("brevitas.graph.calibrate").calibration_mode

    batches = list(calib)[: config.calib_batches]
    if not batches:
        raise ValueError("brevitas quantization needs at least one calibration batch")
    model = copy.deepcopy(model).eval()
    order, signed = trace_compute_layers(model, batches)
    # Layers the forward pass never reached are still quantized (at the inner bit-widths), except
    # the projections of nn.MultiheadAttention, which reads their weights without calling them.
    inside_mha = {
        f"{name}.{child}" if name else child
        for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention)
        for child, _ in module.named_modules()
        if child
    }
    unused = [
        name
        for name, module in model.named_modules()
        if isinstance(module, _COMPUTE_TYPES) and name not in signed and name not in inside_mha
    ]
    if not order and not unused:
        raise ValueError("the model has no nn.Conv1d/2d/3d or nn.Linear layer to quantize")
    edges = {order[0], order[-1]} if order and config.first_last_bits is not None else set()
    for name in order + unused:
        module = model.get_submodule(name)
        if name in edges:
            w_bits = a_bits = config.first_last_bits  # type: ignore[assignment]
        else:
            w_bits, a_bits = config.weight_bits, config.act_bits
        quantized = quant_layer(module, w_bits, a_bits, signed.get(name, True))
        if name:
            _set_submodule(model, name, quantized)
        else:  # the model is a single conv / linear
            model = quantized
    model.eval()
    with torch.no_grad(), calibration_mode(model):
        for batch in batches:
            model(batch)
    init_weight_scales(model)
    mse_weight_thresholds(model)
    if correct_bn or getattr(config, "bn_correction", False):
        correct_batchnorm(model, batches)
    return model.eval()

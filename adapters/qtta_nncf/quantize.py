"""Quantizing float models with ``nncf.quantize``, then lowering the bit-widths NNCF set.

NNCF's PyTorch post-training quantization produces 8-bit quantizers only. The route here:

1. ``nncf.quantize`` on a copy of the model (8 bit: symmetric per-channel weights, per-tensor
   activations, min-max ranges). NNCF keeps every norm layer as it is: BatchNorm is not folded into
   the preceding conv in the PyTorch backend (the weight quantizer sees the raw conv weight), so
   BN-adapt and Tent find their statistics and affine parameters. Bias correction is switched off:
   it shifts conv / linear / BN biases to compensate the 8-bit error, which is stale once the
   bit-widths drop, and it would make the quantized model's norm parameters differ from the float
   model's. Linear-only models (no convolution, with LayerNorm: transformers) are quantized with
   ``model_type=TRANSFORMER``, as NNCF recommends: asymmetric activations and SmoothQuant (which
   rescales Linear weights and puts an ``SQMultiply`` in front of them; exact in float).
2. Each quantizer's ``num_bits`` is set: weights of conv / linear layers to ``weight_bits``,
   activation quantizers to ``act_bits``; the first and last layer's weight and input quantizers
   to ``first_last_bits`` (when set). NNCF's ranges are thresholds (symmetric ``scale``; asymmetric
   ``input_low`` / ``input_range``), so the quantizer then cuts the same calibrated range into
   ``2**bits`` levels.
3. Below 8 bit, a min-max range wastes most of the few levels on rare outliers. Weight thresholds
   are therefore re-fitted per output channel to the clipping ratio that minimises the weight's
   quantization MSE at the new width (``refit_weights``), and activation ranges below 8 bit to the
   ratio that minimises the MSE on the calibration batches (``refit_activations``).

Quantizers NNCF puts on a norm layer's affine parameters (``model_type=None`` on a model with
LayerNorm and convolutions, e.g. a timm ViT) are removed: calibrated on the source values, they
clamp whatever test-time adaptation does to those parameters (:func:`qtta_nncf.view.
release_norm_parameters`), and deployment keeps norm parameters in float anyway.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from qtta_plugins.config import QuantConfig
from qtta_plugins.ranges import least_error_ratio

from ._backend import nncf_module, nncf_quiet
from .view import (
    EXAMPLE_ATTR,
    NNCFQuantizerHandle,
    NNCFView,
    quantizers_off,
    release_norm_parameters,
)

_RATIOS = torch.linspace(1.0, 0.2, 17)


def _is_transformer(model: nn.Module) -> bool:
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    has_conv = any(isinstance(m, convs) for m in model.modules())
    return not has_conv and any(isinstance(m, nn.LayerNorm) for m in model.modules())


def _fake_quant(x: torch.Tensor, q: nn.Module) -> torch.Tensor:
    """``q(x)`` in float arithmetic (grad-free), used to score candidate ranges."""
    with torch.no_grad():
        return q.quantize(x)


def refit_weight_range(handle: NNCFQuantizerHandle, weight: torch.Tensor) -> None:
    """Per-channel symmetric threshold ``ratio * max|w|`` with the least quantization MSE."""
    q = handle.module
    if not handle.symmetric or weight.numel() == 0:
        return
    with torch.no_grad():
        storage = q._scale_param_storage
        if q.is_using_log_scale_storage:
            return  # log-domain scales: leave NNCF's own estimate
        shape = storage.shape
        w = weight.detach()
        axis = handle.ch_axis
        dims = [d for d in range(w.ndim) if d != axis] if axis is not None else list(range(w.ndim))
        base = w.abs().amax(dim=dims, keepdim=True).reshape(shape).clamp_min(1e-12)

        def error(ratio: float) -> torch.Tensor:  # with NNCF's own fake quantization
            storage.copy_(base * ratio)
            err = (_fake_quant(w, q) - w).pow(2)
            return err.sum(dim=dims, keepdim=True).reshape(shape) if dims else err.reshape(shape)

        storage.copy_(base * least_error_ratio(_RATIOS, error))


def refit_activation_range(handle: NNCFQuantizerHandle, samples: list[torch.Tensor]) -> None:
    """Shrink a per-tensor activation range by the ratio with the least MSE on ``samples``."""
    q = handle.module
    if not samples or q.per_channel or q.is_using_log_scale_storage:
        return
    with torch.no_grad():
        x = torch.cat([s.flatten() for s in samples])
        if handle.symmetric:
            params = [q._scale_param_storage]
        else:
            params = [q.input_low, q._input_range_param_storage]
        original = [p.detach().clone() for p in params]

        def error(ratio: float) -> torch.Tensor:
            for p, p0 in zip(params, original, strict=True):
                p.copy_(p0 * ratio)
            return (_fake_quant(x, q) - x).pow(2).mean()

        best_ratio = float(least_error_ratio(_RATIOS, error))
        for p, p0 in zip(params, original, strict=True):
            p.copy_(p0 * best_ratio)


def _collect_inputs(
    model: nn.Module, handles: list[NNCFQuantizerHandle], batches: Sequence[torch.Tensor]
) -> dict[str, list[torch.Tensor]]:
    """What reaches each of ``handles`` in the float model (all quantizers off), on ``batches``."""
    seen: dict[str, list[torch.Tensor]] = {h.name: [] for h in handles}
    hooks = []
    for h in handles:

        def record(module, args, _name=h.name):
            x = args[0]
            # keep a bounded random subset per batch: enough to score a range, cheap to hold
            flat = x.detach().flatten()
            if flat.numel() > 8192:
                idx = torch.randint(
                    flat.numel(), (8192,), generator=torch.Generator().manual_seed(0)
                )
                flat = flat[idx]
            seen[_name].append(flat)

        hooks.append(h.module.register_forward_pre_hook(record))
    try:
        with quantizers_off(model), torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def quantize(
    model: nn.Module,
    config: QuantConfig,
    calib: Sequence[torch.Tensor],
    *,
    refit_weights: bool = True,
    refit_activations: bool = True,
) -> nn.Module:
    """``nncf.quantize`` of a copy of ``model`` at ``config``'s bit-widths (see the module
    docstring). Under ``QTTA_QUIET`` (``qtta ... -q``) NNCF prints no progress bar or INFO line."""
    with nncf_quiet():
        return _quantize(
            model,
            config,
            calib,
            refit_weights=refit_weights,
            refit_activations=refit_activations,
        )


def _quantize(
    model: nn.Module,
    config: QuantConfig,
    calib: Sequence[torch.Tensor],
    *,
    refit_weights: bool,
    refit_activations: bool,
) -> nn.Module:
    if type(model) is nn.Sequential:
        # nncf.quantize adds its HookStorage as a child module, and Sequential.forward runs
        # every child: the quantized model would fail on its first call.
        raise ValueError(
            "NNCF cannot quantize a top-level nn.Sequential (its hook storage becomes one more "
            "layer of the sequence); wrap it in an nn.Module whose forward calls the Sequential"
        )
    nncf = nncf_module()
    batches = list(calib[: config.calib_batches])
    source = copy.deepcopy(
        model
    ).eval()  # nncf.quantize copies too; this keeps eval() off the user's model
    advanced = nncf.AdvancedQuantizationParameters(disable_bias_correction=True)
    qmodel = nncf.quantize(
        source,
        nncf.Dataset(batches),
        subset_size=len(batches),
        model_type=nncf.ModelType.TRANSFORMER if _is_transformer(source) else None,
        advanced_parameters=advanced,
    )
    qmodel.eval()
    release_norm_parameters(qmodel)
    view = NNCFView(qmodel, example_input=batches[0])
    layers = view.layers()
    edge = set()
    if config.first_last_bits is not None and layers:
        for layer in (layers[0], layers[-1]):
            edge.update(id(q) for q in (layer.weight_quantizer, layer.input_quantizer) if q)
    layer_weights = {id(layer.weight_quantizer): layer.weight for layer in layers}
    lowered_acts = []
    for q in view.quantizers():
        if id(q) in edge:
            bits = config.first_last_bits
        elif q.role == "weight":
            if id(q) not in layer_weights:
                continue  # a norm's affine parameter: not a conv / linear weight
            bits = config.weight_bits
        else:
            bits = config.act_bits
        assert bits is not None
        q.bits = bits
        if bits < 8 and q.role == "weight" and refit_weights:
            refit_weight_range(q, layer_weights[id(q)])  # type: ignore[arg-type]
        elif bits < 8 and q.role == "act" and refit_activations:
            lowered_acts.append(q)
    if lowered_acts:
        samples = _collect_inputs(qmodel, lowered_acts, batches)  # type: ignore[arg-type]
        for q in lowered_acts:
            refit_activation_range(q, samples[q.name])  # type: ignore[arg-type]
    qmodel.__dict__[EXAMPLE_ATTR] = batches[0][:1].detach().clone()
    return qmodel

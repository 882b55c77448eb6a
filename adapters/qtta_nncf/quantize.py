"""Quantizing float models with ``nncf.quantize``, then lowering the bit-widths NNCF set.

NNCF's PyTorch post-training quantization produces 8-bit quantizers only. The route here:

1. ``nncf.quantize`` on a copy of the model (8 bit: symmetric per-channel weights, per-tensor
   activations, min-max ranges). NNCF keeps every norm layer as it is: BatchNorm is not folded into
   the preceding conv in the PyTorch backend (the weight quantizer sees the raw conv weight), so
   BN-adapt and Tent find their statistics and affine parameters. Bias correction is switched off:
   it shifts conv / linear / BN biases to compensate the 8-bit error, which is stale once the
   bit-widths drop, and it would make the quantized model's norm parameters differ from the float
   model's. The overflow fix is switched off too: by default NNCF quantizes the first layer's
   weights on half the 8-bit range (a guard for int8 kernels without VNNI), a step twice torchao's
   and Brevitas'; on the digits CNN that stem alone cost 6 points at W4A4 (weights only: 92.0
   against 97.8 %), because its error is amplified by every low-bit layer after it. Linear-only
   models (no convolution, with LayerNorm: transformers) are quantized with
   ``model_type=TRANSFORMER``, as NNCF recommends: asymmetric activations and SmoothQuant (which
   rescales Linear weights and puts an ``SQMultiply`` in front of them; exact in float).
2. Each quantizer's ``num_bits`` is set: weights of conv / linear layers to ``weight_bits``,
   activation quantizers to ``act_bits``; the first and last layer's weight and input quantizers
   to ``first_last_bits`` (when set).
3. The ranges are then those every backend uses (:mod:`qtta_plugins.ranges`): each conv / linear
   weight gets the per-channel threshold with the least round-to-nearest error at its width (at 8
   bit too, as torchao's and Brevitas' do), and each activation quantizer below 8 bit the per-batch
   99.999th percentile averaged over the calibration batches (Brevitas' statistic). NNCF's ranges
   are thresholds (symmetric ``scale``; asymmetric ``input_low`` / ``input_range``); both are
   written through the view's ``set_grid``.
4. NNCF also quantizes tensors no conv / linear layer reads (batch-norm outputs before a residual
   sum, the pooled feature, attention matmul operands). torchao and Brevitas quantize only the
   inputs and weights of compute layers, so these keep 8 bit (and NNCF's own range): W4A4 means
   the same layers at the same widths on every backend.

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
from qtta_plugins.ranges import ActivationRange, mse_symmetric_thresholds

from ._backend import nncf_module, nncf_quiet
from .graph import EXAMPLE_ATTR
from .handles import NNCFQuantizerHandle, quantizers_off
from .hook_view import NNCFView
from .norm_params import release_norm_parameters


def _is_transformer(model: nn.Module) -> bool:
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    has_conv = any(isinstance(m, convs) for m in model.modules())
    return not has_conv and any(isinstance(m, nn.LayerNorm) for m in model.modules())


def refit_weight_range(handle: NNCFQuantizerHandle, weight: torch.Tensor) -> None:
    """Per output channel, the symmetric threshold with the least round-to-nearest error at the
    handle's width: the search torchao's and Brevitas' weight ranges use
    (:func:`qtta_plugins.ranges.mse_symmetric_thresholds`), so the three backends put a layer's
    weights on the same grid."""
    if not handle.symmetric or weight.numel() == 0 or handle.module.is_using_log_scale_storage:
        return  # asymmetric or log-domain weights: leave NNCF's own estimate
    if handle.ch_axis not in (0, None):
        return
    _, qmax = handle.qrange
    w = weight.detach()
    if handle.ch_axis is None:
        threshold = mse_symmetric_thresholds(w.reshape(1, -1), qmax)
    else:
        threshold = mse_symmetric_thresholds(w, qmax)
    handle.set_grid(threshold / qmax)


def set_activation_range(handle: NNCFQuantizerHandle, stats: ActivationRange) -> None:
    """A per-tensor activation range from ``stats`` (the shared percentile rule,
    :class:`qtta_plugins.ranges.ActivationRange`), cut into the handle's levels."""
    q = handle.module
    if stats.batches == 0 or q.per_channel:
        return
    qmin, qmax = handle.qrange
    shape = handle.grid().scale.shape  # per-tensor: () or (1,), as NNCF stores it
    if handle.symmetric:
        threshold = stats.threshold().clamp_min(1e-8)
        handle.set_grid((threshold / qmax).reshape(shape))
    else:
        low, high = stats.interval()
        n = qmax - qmin
        step = ((high - low) / n).clamp_min(1e-8)
        zero_point = torch.clamp(torch.round(-low / step), 0, n)
        handle.set_grid(step.reshape(shape), zero_point.reshape(shape))


def _collect_ranges(
    model: nn.Module, handles: list[NNCFQuantizerHandle], batches: Sequence[torch.Tensor]
) -> dict[str, ActivationRange]:
    """The percentile statistics of what reaches each of ``handles`` in the float model (all
    quantizers off), batch by batch."""
    seen = {h.name: ActivationRange() for h in handles}
    hooks = []
    for h in handles:

        def record(module, args, _name=h.name):
            seen[_name].update(args[0].detach())

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
    advanced = nncf.AdvancedQuantizationParameters(
        disable_bias_correction=True, overflow_fix=nncf.OverflowFix.DISABLE
    )
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
    layer_inputs = {id(layer.input_quantizer) for layer in layers if layer.input_quantizer}
    lowered_acts = []
    for q in view.quantizers():
        if id(q) in edge:
            bits = config.first_last_bits
        elif q.role == "weight":
            if id(q) not in layer_weights:
                continue  # a norm's affine parameter: not a conv / linear weight
            bits = config.weight_bits
        elif id(q) in layer_inputs:
            bits = config.act_bits
        else:
            # A tensor no conv / linear reads (a batch-norm output before a residual sum, the
            # pooled feature, an attention matmul's operand): torchao and Brevitas quantize the
            # inputs of compute layers only, so "A4" means those. At 4 bit these 6 extra
            # quantizers cost the digits CNN up to 5 points on one seed of three.
            bits = 8
        assert bits is not None
        q.bits = bits
        if q.role == "weight" and refit_weights:
            refit_weight_range(q, layer_weights[id(q)])  # type: ignore[arg-type]
        elif bits < 8 and q.role == "act" and refit_activations:
            lowered_acts.append(q)
    if lowered_acts:
        ranges = _collect_ranges(qmodel, lowered_acts, batches)  # type: ignore[arg-type]
        for q in lowered_acts:
            set_activation_range(q, ranges[q.name])  # type: ignore[arg-type]
    qmodel.__dict__[EXAMPLE_ATTR] = batches[0][:1].detach().clone()
    return qmodel

"""Quantizing float models with torchao, by the route that suits the model.

* Models with convolutions go through pt2e: ``torch.export`` (train mode, dynamic batch) ->
  ``prepare_qat_pt2e`` with :class:`QttaQuantizer` -> calibration with observers on -> observers off.
  The QAT route (not ``prepare_pt2e``) is deliberate: ``prepare_pt2e`` folds every batch norm into its
  conv, leaving nothing for BN-adapt or Tent, while the QAT graph keeps ``aten.batch_norm`` with its
  affine parameters and fake-quantizes the conv weight as it will be folded (``w * gamma / sigma``).
  ``convert_pt2e`` on the result gives torchao's integer (Q/DQ) model for deployment.
* Linear-only models (ViT-like) go through ``quantize_(model, QATConfig(...))``: per-channel static
  weight fake-quant with learnable scales, per-token dynamic activation fake-quant (torchao's QAT has
  no static per-tensor activation mode).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from qtta_plugins.config import QuantConfig

from ._backend import torchao_module
from .patterns import patterns_traced_once

_CONV_OPS = ("aten.conv1d", "aten.conv2d", "aten.conv3d")
_LINEAR_OPS = ("aten.linear",)


def is_compute_node(node: torch.fx.Node) -> str | None:
    """``"conv"`` / ``"linear"`` for a conv / linear call in an exported graph, else ``None``."""
    if node.op != "call_function":
        return None
    name = str(node.target).split(".default")[0]
    if name in _CONV_OPS:
        return "conv"
    if name in _LINEAR_OPS:
        return "linear"
    return None


def weight_spec(bits: int):
    """Per-output-channel symmetric weight fake-quant on the restricted range ``[-(2^(b-1)-1), 2^(b-1)-1]``,
    with MSE ranges (:class:`~qtta_torchao.observers.PerChannelMSEObserver`, torchao's per-channel
    observer with the least-error clipping threshold instead of min-max)."""
    pt2e = torchao_module("torchao.quantization.pt2e")
    from .observers import PerChannelMSEObserver

    qz = torchao_module("torchao.quantization.pt2e.quantizer")
    qmax = 2 ** (bits - 1) - 1
    return qz.QuantizationSpec(
        dtype=torch.int8,
        quant_min=-qmax,
        quant_max=qmax,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
        is_dynamic=False,
        observer_or_fake_quant_ctr=pt2e.FakeQuantize.with_args(
            observer=PerChannelMSEObserver,
            quant_min=-qmax,
            quant_max=qmax,
            dtype=torch.int8,
            qscheme=torch.per_channel_symmetric,
            ch_axis=0,
        ),
    )


def act_spec(bits: int):
    """Per-tensor affine activation fake-quant on ``[0, 2^b - 1]``: min-max calibrated at 8 bit
    (torchao's ``MinMaxObserver``), below 8 bit with the percentile rule every backend shares
    (:class:`~qtta_torchao.observers.PercentileObserver`)."""
    pt2e = torchao_module("torchao.quantization.pt2e")
    from .observers import PercentileObserver

    qz = torchao_module("torchao.quantization.pt2e.quantizer")
    qmax = 2**bits - 1
    return qz.QuantizationSpec(
        dtype=torch.uint8,
        quant_min=0,
        quant_max=qmax,
        qscheme=torch.per_tensor_affine,
        is_dynamic=False,
        observer_or_fake_quant_ctr=pt2e.FakeQuantize.with_args(
            observer=pt2e.MinMaxObserver if bits >= 8 else PercentileObserver,
            quant_min=0,
            quant_max=qmax,
            dtype=torch.uint8,
            qscheme=torch.per_tensor_affine,
        ),
    )


def make_quantizer(config: QuantConfig):
    """A small public pt2e ``Quantizer``: every conv / linear gets its input and weight quantized.

    The first layer's input and weights and the last layer keep ``config.first_last_bits`` (when set),
    as the low-bit PTQ literature does.
    """
    qz = torchao_module("torchao.quantization.pt2e.quantizer")

    class QttaQuantizer(qz.Quantizer):
        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            nodes = [n for n in model.graph.nodes if is_compute_node(n)]
            for i, node in enumerate(nodes):
                edge = i in (0, len(nodes) - 1) and config.first_last_bits is not None
                w_bits = config.first_last_bits if edge else config.weight_bits
                a_bits = config.first_last_bits if edge else config.act_bits
                node.meta["quantization_annotation"] = qz.QuantizationAnnotation(
                    input_qspec_map={
                        node.args[0]: act_spec(a_bits),
                        node.args[1]: weight_spec(w_bits),
                    },
                    _annotated=True,
                )
            return model

        def validate(self, model: torch.fx.GraphModule) -> None:
            return None

    return QttaQuantizer()


def set_batchnorm_mode(gm: torch.fx.GraphModule, use_batch_stats: bool) -> None:
    """Switch every ``aten.batch_norm`` of an exported graph between batch and running statistics.

    In batch mode the momentum is set to 0, so the running (source) statistics are not updated: test-time
    methods read them (the QAT graph scales the conv weight by them) and must not drift them. torchao's
    ``move_exported_model_to_train`` resets the momentum to 0.1, hence our own switch.
    """
    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.batch_norm.default:
            continue
        args = list(node.args)
        node.meta.setdefault("qtta_momentum", args[6])
        args[5] = use_batch_stats
        args[6] = 0.0 if use_batch_stats else node.meta["qtta_momentum"]
        node.args = tuple(args)
        changed = True
    if changed:
        gm.recompile()


def _running_var_target(node: torch.fx.Node) -> str | None:
    var = node.args[4] if len(node.args) > 4 else None
    if isinstance(var, torch.fx.Node) and var.op == "get_attr":
        return str(var.target)
    return None


def batchnorm_hyperparameters(exported: torch.fx.GraphModule) -> dict[str, tuple[float, float]]:
    """Each ``aten.batch_norm``'s ``(momentum, eps)`` in an exported graph, keyed by its running
    variance. Read it *before* ``prepare_qat_pt2e`` and give it to
    :func:`restore_batchnorm_hyperparameters` after."""
    return {
        key: (float(node.args[6]), float(node.args[7]))
        for node in exported.graph.nodes
        if node.op == "call_function"
        and node.target is torch.ops.aten.batch_norm.default
        and (key := _running_var_target(node)) is not None
    }


def restore_batchnorm_hyperparameters(
    prepared: torch.fx.GraphModule, saved: dict[str, tuple[float, float]]
) -> int:
    """Put back the batch norms' ``eps`` and ``momentum`` that ``prepare_qat_pt2e`` loses.

    torchao 0.18's QAT conv-bn rewrite rebuilds every conv + batch norm from a pattern traced with
    torch's defaults, so a model whose batch norms use another ``eps`` (torchvision's
    MobileNetV3: 1e-3, momentum 0.01; EfficientNets; most timm CNNs) gets ``eps=1e-5`` both in the
    batch norm and in the weight fold ``gamma / sqrt(var + eps)``. On channels of small variance
    that changes the float function many-fold. ``move_exported_model_to_eval`` / ``_to_train``
    rewrite them the same way: call this after those too. Returns the number of nodes corrected.
    Users of torchao's own QAT flow need it as much as ours: ``saved =
    batchnorm_hyperparameters(exported)`` before ``prepare_qat_pt2e``, then
    ``restore_batchnorm_hyperparameters(prepared, saved)`` after it and after each move.
    """
    changed = 0
    for node in prepared.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is torch.ops.aten.batch_norm.default:
            key = _running_var_target(node)
            if key in saved:
                args = list(node.args)
                args[6], args[7] = saved[key]
                if "qtta_momentum" in node.meta:  # the source momentum our batch mode keeps aside
                    node.meta["qtta_momentum"] = saved[key][0]
                if tuple(args) != tuple(node.args):
                    node.args, changed = tuple(args), changed + 1
        elif node.target is torch.ops.aten.add.Tensor and len(node.args) == 2:
            var, eps = node.args
            if (
                isinstance(var, torch.fx.Node)
                and var.op == "get_attr"
                and str(var.target) in saved
                and isinstance(eps, float)
                and eps != saved[str(var.target)][1]
            ):  # the fold's sqrt(running_var + eps)
                node.args, changed = (var, saved[str(var.target)][1]), changed + 1
    if changed:
        prepared.recompile()
    return changed


#: the eps of torchao 0.18's folded conv-bn replacement pattern (``qat_utils``: "TODO: allow
#: setting eps"): ``convert_pt2e`` folds every QAT batch norm with it, whatever the model's own eps
CONVERT_FOLD_EPS = 1e-5


def match_convert_fold_eps(prepared: torch.fx.GraphModule) -> int:
    """Make ``convert_pt2e`` fold each batch norm with its own ``eps`` (call it on a copy, just
    before converting). Returns the number of batch norms changed.

    ``convert_pt2e`` replaces each QAT conv + batch norm by a pattern traced with ``eps=1e-5`` and
    folds ``gamma / sqrt(running_var + 1e-5)`` into the conv (pytorch/ao#4107). For a norm with
    another ``eps`` (torchvision's MobileNetV3: 1e-3) this moves every channel of small variance:
    the trained MobileNetV3-Small's exported logits differed from the prepared model's by 72%.
    Writing ``running_var + eps - 1e-5`` into the running variance and ``1e-5`` into the graph
    leaves ``sqrt(running_var + eps)`` - so the prepared model's function - unchanged, and the
    fold exact. The running statistics no longer read as the source's: only for export.
    """
    changed: dict[str, float] = {}
    for node in prepared.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.batch_norm.default:
            continue
        key = _running_var_target(node)
        eps = float(node.args[7])
        if key is None or eps == CONVERT_FOLD_EPS:
            continue
        if key not in changed:
            var = get_tensor(prepared, key)
            with torch.no_grad():
                var.add_(eps - CONVERT_FOLD_EPS)
            changed[key] = eps
        args = list(node.args)
        args[7] = CONVERT_FOLD_EPS
        node.args = tuple(args)
    for node in prepared.graph.nodes:  # the QAT fold's sqrt(running_var + eps) on the weight
        if (
            node.op == "call_function"
            and node.target is torch.ops.aten.add.Tensor
            and len(node.args) == 2
            and isinstance(node.args[0], torch.fx.Node)
            and node.args[0].op == "get_attr"
            and str(node.args[0].target) in changed
            and isinstance(node.args[1], float)
        ):
            node.args = (node.args[0], CONVERT_FOLD_EPS)
    if changed:
        prepared.recompile()
    return len(changed)


def get_tensor(gm: nn.Module, target: str) -> torch.Tensor:
    """The tensor a graph's ``get_attr`` node with this ``target`` reads."""
    module_path, _, attr = target.rpartition(".")
    owner = gm.get_submodule(module_path) if module_path else gm
    return getattr(owner, attr)


def _has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d) for m in model.modules())


def quantize_pt2e(
    model: nn.Module, config: QuantConfig, calib: Sequence[torch.Tensor]
) -> torch.fx.GraphModule:
    quantize_pt2e_mod = torchao_module("torchao.quantization.pt2e.quantize_pt2e")
    pt2e = torchao_module("torchao.quantization.pt2e")
    from .observers import PerChannelMSEObserver

    model = copy.deepcopy(model).train()
    example = calib[0]
    dynamic = ({0: torch.export.Dim.DYNAMIC},)
    exported = torch.export.export(model, (example,), dynamic_shapes=dynamic).module()
    saved = batchnorm_hyperparameters(exported)
    with patterns_traced_once():  # torchao's conv-bn patterns, traced once per process
        prepared = quantize_pt2e_mod.prepare_qat_pt2e(exported, make_quantizer(config))
    # The export traced train mode: dropout (MobileNet's classifier, a ViT's) is baked in as
    # active. torchao's own switch turns it off; it rewrites the batch norms with default eps and
    # momentum too, as prepare_qat_pt2e did, so theirs are put back after both.
    pt2e.move_exported_model_to_eval(prepared)
    restore_batchnorm_hyperparameters(prepared, saved)
    set_batchnorm_mode(prepared, use_batch_stats=False)  # calibrate on the source statistics
    with torch.no_grad():
        for batch in calib[: config.calib_batches]:
            prepared(batch)
    prepared.apply(pt2e.disable_observer)
    for module in prepared.modules():
        if isinstance(module, PerChannelMSEObserver):
            module.release()
    prepared.meta["qtta"] = {"weight_bits": config.weight_bits, "act_bits": config.act_bits}
    return prepared


def quantize_linear_qat(
    model: nn.Module, config: QuantConfig, calib: Sequence[torch.Tensor]
) -> nn.Module:
    torchao_module()
    from torchao.quantization import quantize_
    from torchao.quantization.qat import (
        IntxFakeQuantizeConfig,
        QATConfig,
        initialize_fake_quantizers,
    )

    model = copy.deepcopy(model).eval()
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]

    def qat_config(w_bits: int, a_bits: int):
        return QATConfig(
            activation_config=IntxFakeQuantizeConfig(
                getattr(torch, f"int{a_bits}"), "per_token", is_symmetric=False
            ),
            weight_config=IntxFakeQuantizeConfig(
                getattr(torch, f"int{w_bits}"),
                "per_channel",
                is_symmetric=True,
                is_dynamic=False,
                range_learning=True,
            ),
            step="prepare",
        )

    for i, name in enumerate(linears):
        edge = i in (0, len(linears) - 1) and config.first_last_bits is not None
        bits = (config.first_last_bits,) * 2 if edge else (config.weight_bits, config.act_bits)
        quantize_(model, qat_config(*bits), filter_fn=lambda m, fqn, _name=name: fqn == _name)
    with torch.no_grad():
        initialize_fake_quantizers(model, (calib[0],))
    return model


def quantize(model: nn.Module, config: QuantConfig, calib: Sequence[torch.Tensor]) -> nn.Module:
    if _has_conv(model):
        return quantize_pt2e(model, config, calib)
    return quantize_linear_qat(model, config, calib)

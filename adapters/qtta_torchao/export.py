"""Export of an (adapted) torchao pt2e model through torchao's own deployment path.

``convert_pt2e`` turns the fake-quant graph into torchao's integer Q/DQ graph (batch norms folded into
the convs, weights stored as integers); ``torch.compile`` on that graph is the integer-kernel path
(with X86InductorQuantizer-style patterns it lowers to int8 kernels; other patterns still compile).

An exported graph has fixed normalisation statistics: the model is converted as it behaves on its
running statistics (norm mode ``"source"``), with whatever affine parameters adaptation left it.
"""

from __future__ import annotations

import torch

from qtta_plugins.view import copy_model, remember_source_sample, source_sample

from ._backend import torchao_module
from .quantize import match_convert_fold_eps
from .view import (
    FakeQuantizeHandle,
    Pt2eView,
    foldable_norms,
    insert_folded_norms,
    recognise,
    remove_input_taps,
)


def convert(model: torch.fx.GraphModule, *, folded_norms: bool = True) -> torch.fx.GraphModule:
    """torchao's integer Q/DQ model of a prepared pt2e model (the caller's model is not modified).

    ``folded_norms``: put a stand-in for each batch norm ``convert_pt2e`` folds into its conv (see
    :func:`qtta_torchao.view.insert_folded_norms`): the identity as converted, it lets forward-only
    methods (``norm``, ``zoa``) renormalise and adapt the integer model. ``False`` gives
    ``convert_pt2e``'s graph untouched.
    """
    if not isinstance(model, torch.nn.Module) or not isinstance(recognise(model), Pt2eView):
        raise TypeError(
            "convert expects a torchao pt2e model with fake-quant modules (prepare_pt2e / "
            f"prepare_qat_pt2e output, or qtta_plugins.quantize(..., 'torchao')), got {type(model).__name__}"
        )
    quantize_pt2e = torchao_module("torchao.quantization.pt2e.quantize_pt2e")
    model = copy_model(model)
    view = Pt2eView(model)
    view.set_norm_mode("source")
    convert_on_buffers(view)
    remove_input_taps(model)  # feature taps a forward-only method put in; hooks die with them
    folded = foldable_norms(model) if folded_norms else []
    sample = source_sample(model)
    match_convert_fold_eps(model)  # after foldable_norms: the stand-ins keep each norm's own eps
    converted = quantize_pt2e.convert_pt2e(model)
    if folded:
        insert_folded_norms(converted, folded)
    if sample is not None:
        remember_source_sample(converted, [sample])
    return converted


def convert_on_buffers(view: Pt2eView) -> int:
    """Make ``convert_pt2e`` quantize on each fake-quantizer's ``scale`` / ``zero_point`` buffers -
    the grid the prepared (and adapted) model computes with. Returns how many disagreed.

    ``convert_pt2e`` takes quantization parameters from ``calculate_qparams()`` (the observer's
    recorded range), the prepared model from the buffers, and they can disagree.
    ``FusedMovingAvgObsFakeQuantize`` (X86InductorQuantizer's QAT config) fills the buffers in
    ATen's fused kernel, whose per-channel "symmetric" weight grid is ``max|w| / 127`` where the
    Python observer's is ``max|w| / 127.5``, and becomes affine (``max / 255``, zero point -128)
    on a channel with no negative weight. On the trained MobileNetV2 one depthwise channel
    exported with its weights clipped at half their range, and every weight's rounding moved: the
    exported logits differed from the prepared model's by more than quantization moves them from
    float. Only the copy being converted is touched.
    """
    disagreed = 0
    for q in view.quantizers():
        if not isinstance(q, FakeQuantizeHandle):
            continue
        fq = q.module
        scale, zero_point = fq.calculate_qparams()
        buffers = (
            fq.scale.detach().clone().reshape(scale.shape).to(scale.dtype),
            fq.zero_point.detach().clone().reshape(zero_point.shape).to(zero_point.dtype),
        )
        if torch.equal(buffers[0], scale) and torch.equal(buffers[1], zero_point):
            continue
        fq.calculate_qparams = lambda _qparams=buffers: _qparams  # this instance only
        disagreed += 1
    return disagreed


def compile_converted(model: torch.fx.GraphModule, *, freeze: bool = True) -> torch.nn.Module:
    """``torch.compile`` (inductor) of a converted model: the integer-kernel path.

    ``freeze=True`` lets inductor fold the weights as constants (fastest, for a model that no longer
    changes). A model that will still adapt (``qtta_plugins.adapt(compiled, method="zoa")``) needs
    ``freeze=False``: frozen parameters would ignore the adapted norm affines.
    """
    import torch._inductor.config as inductor_config

    inductor_config.freezing = freeze
    return torch.compile(model)

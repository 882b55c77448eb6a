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
from .view import Pt2eView, foldable_norms, insert_folded_norms, recognise, remove_input_taps


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
    Pt2eView(model).set_norm_mode("source")
    remove_input_taps(model)  # feature taps a forward-only method put in; hooks die with them
    folded = foldable_norms(model) if folded_norms else []
    sample = source_sample(model)
    converted = quantize_pt2e.convert_pt2e(model)
    if folded:
        insert_folded_norms(converted, folded)
    if sample is not None:
        remember_source_sample(converted, [sample])
    return converted


def compile_converted(model: torch.fx.GraphModule, *, freeze: bool = True) -> torch.nn.Module:
    """``torch.compile`` (inductor) of a converted model: the integer-kernel path.

    ``freeze=True`` lets inductor fold the weights as constants (fastest, for a model that no longer
    changes). A model that will still adapt (``qtta_plugins.adapt(compiled, method="zoa")``) needs
    ``freeze=False``: frozen parameters would ignore the adapted norm affines.
    """
    import torch._inductor.config as inductor_config

    inductor_config.freezing = freeze
    return torch.compile(model)

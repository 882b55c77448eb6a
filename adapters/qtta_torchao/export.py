"""Export of an (adapted) torchao pt2e model through torchao's own deployment path.

``convert_pt2e`` turns the fake-quant graph into torchao's integer Q/DQ graph (batch norms folded into
the convs, weights stored as integers); ``torch.compile`` on that graph is the integer-kernel path
(with X86InductorQuantizer-style patterns it lowers to int8 kernels; other patterns still compile).

An exported graph has fixed normalisation statistics: the model is converted as it behaves on its
running statistics (norm mode ``"source"``), with whatever affine parameters adaptation left it.
"""

from __future__ import annotations

import torch

from qtta_plugins.view import copy_model

from ._backend import torchao_module
from .view import Pt2eView, recognise


def convert(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """torchao's integer Q/DQ model of a prepared pt2e model (the caller's model is not modified)."""
    if not isinstance(model, torch.nn.Module) or not isinstance(recognise(model), Pt2eView):
        raise TypeError(
            "convert expects a torchao pt2e model with fake-quant modules (prepare_pt2e / "
            f"prepare_qat_pt2e output, or qtta_plugins.quantize(..., 'torchao')), got {type(model).__name__}"
        )
    quantize_pt2e = torchao_module("torchao.quantization.pt2e.quantize_pt2e")
    model = copy_model(model)
    Pt2eView(model).set_norm_mode("source")
    return quantize_pt2e.convert_pt2e(model)


def compile_converted(model: torch.fx.GraphModule) -> torch.nn.Module:
    """``torch.compile`` (inductor, with freezing) of a converted model: the integer-kernel path."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    return torch.compile(model)

"""torchao models seen through the uniform :class:`~qtta_plugins.view.QuantView`.

Three kinds of torchao model are recognised, whoever quantized them:

* :class:`Pt2eView` - a pt2e graph prepared with fake-quant (``prepare_pt2e`` / ``prepare_qat_pt2e``):
  quantizers are ``FakeQuantize`` modules in the graph, norms are ``aten.batch_norm`` / ``layer_norm``
  nodes; gradients flow.
* :class:`ConvertedView` - the integer Q/DQ graph of ``convert_pt2e``: weights are frozen integer
  constants, batch norms are folded; forward-only.
* :class:`ModuleView` - an eager model whose Linear layers went through ``quantize_``: QAT
  (``FakeQuantizedLinear``, gradients flow) or a weight tensor subclass such as
  ``Int8DynamicActivationInt8WeightConfig``'s (forward-only: those cut autograd).

The code lives in one module per part (:mod:`.handles`, :mod:`.graph`, :mod:`.pt2e_view`,
:mod:`.converted_view`, :mod:`.eager_view`); this module recognises a model and re-exports them.
"""

from __future__ import annotations

import torch
from torch import nn

from qtta_plugins.view import (
    QuantView,
)

from .converted_view import ConvertedView
from .eager_view import ModuleView
from .graph import (
    FOLDED_NORMS_KEY,
    InputTap,
    foldable_norms,
    insert_folded_norms,
    remove_input_taps,
)
from .handles import (
    ConstantQuantizerHandle,
    FakeQuantizeHandle,
    IntxFakeQuantizerHandle,
    _from_torchao,
)
from .pt2e_view import Pt2eView

__all__ = [
    "FOLDED_NORMS_KEY",
    "ConstantQuantizerHandle",
    "ConvertedView",
    "FakeQuantizeHandle",
    "InputTap",
    "IntxFakeQuantizerHandle",
    "ModuleView",
    "Pt2eView",
    "foldable_norms",
    "insert_folded_norms",
    "recognise",
    "remove_input_taps",
]


def recognise(model: nn.Module) -> QuantView | None:
    """The right view for a torchao model, or ``None`` if this is not one."""
    inner = model._modules.get("_orig_mod") if hasattr(model, "_orig_mod") else None
    if isinstance(inner, torch.fx.GraphModule):
        view = recognise(inner)
        if isinstance(view, ConvertedView):
            return ConvertedView(model)  # the compiled integer path: run the compiled module
        return None
    if isinstance(model, torch.fx.GraphModule):
        has_fq = any(_from_torchao(m) and hasattr(m, "fake_quant_enabled") for m in model.modules())
        if has_fq:
            return Pt2eView(model)
        has_qdq = any(
            n.op == "call_function" and str(n.target).startswith("quantized_decomposed.")
            for n in model.graph.nodes
        )
        if has_qdq:
            return ConvertedView(model)
        return None
    for module in model.modules():
        if _from_torchao(module) and "qat" in type(module).__module__:
            return ModuleView(model)
        weight = getattr(module, "weight", None)
        if weight is not None and _from_torchao(weight):
            return ModuleView(model)
    return None

"""NNCF models seen through the uniform :class:`~qtta_plugins.view.QuantView`.

``nncf.quantize`` on a PyTorch model returns the same class, its ``forward`` wrapped by NNCF and a
``HookStorage`` module at ``model.__nncf_hooks`` holding the fake quantizers (pre-hooks on an
operation's input ports, post-hooks on its output). :func:`recognise` finds such a model, whoever
quantized it, and returns its :class:`NNCFView`.

The code lives in one module per part, as torchao's view does:

* :mod:`.handles` - where NNCF keeps its quantizers, and :class:`NNCFQuantizerHandle`;
* :mod:`.graph` - the model's layers and quantizers in forward order, from a trace with NNCF's
  graph builder (or from the hook names alone, without an example input);
* :mod:`.norm_params` - quantizers on norm affine parameters, found and released;
* :mod:`.recalibration` - the batch-overflow policy: activation ranges that batch statistics
  overflow, found and recalibrated;
* :mod:`.hook_view` - :class:`NNCFView` itself.

This module recognises a model and re-exports the names adapter code and users import from
``qtta_nncf.view``.
"""

from __future__ import annotations

from torch import nn

from .graph import EXAMPLE_ATTR, _CaptureExample, static_structure, trace_structure
from .handles import (
    HOOKS_ATTR,
    NNCFQuantizerHandle,
    hook_storage,
    is_quantizer,
    nncf_tune_range,
    quantizer_modules,
    quantizers_off,
)
from .hook_view import NNCFView
from .norm_params import norm_parameter_quantizers, release_norm_parameters
from .recalibration import batch_mode_overflow, recalibrate_activations

__all__ = [
    "EXAMPLE_ATTR",
    "HOOKS_ATTR",
    "NNCFQuantizerHandle",
    "NNCFView",
    "_CaptureExample",
    "batch_mode_overflow",
    "hook_storage",
    "is_quantizer",
    "nncf_tune_range",
    "norm_parameter_quantizers",
    "quantizer_modules",
    "quantizers_off",
    "recalibrate_activations",
    "recognise",
    "release_norm_parameters",
    "static_structure",
    "trace_structure",
]


def recognise(model: nn.Module) -> NNCFView | None:
    """The view of a model quantized by ``nncf.quantize``, or ``None`` if this is not one."""
    if not quantizer_modules(model):
        return None
    return NNCFView(model)

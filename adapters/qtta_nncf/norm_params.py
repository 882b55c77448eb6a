"""Quantizers on norm layers' affine parameters: found and released.

NNCF quantizes the ``gamma`` / ``beta`` of LayerNorm / GroupNorm in some presets
(``model_type=None`` on a model with LayerNorm and convolutions, e.g. a timm ViT), on a range
calibrated on their source values, which clamps whatever test-time adaptation does to them.
``qtta_plugins.quantize`` releases them; a user's own ``nncf.quantize`` model is told to
(:meth:`qtta_nncf.view.NNCFView.prepare_adaptation`).
"""

from __future__ import annotations

from torch import nn

from .handles import HOOKS_ATTR, hook_storage, op_function, quantizer_modules, split_hook_name


def norm_parameter_quantizers(model: nn.Module) -> list[str]:
    """The enabled quantizers NNCF put on norm layers' affine parameters (``model_type=None`` on a
    model with LayerNorm / GroupNorm, e.g. a timm ViT), by module path.

    Their 8-bit range is calibrated on the source values of ``gamma`` / ``beta`` (a LayerNorm's
    weight of ones gets the range [-1, 1]), so whatever adaptation does to those parameters is
    clamped or rounded away: measured on a timm ViT, scaling every LayerNorm weight by 3 left the
    output bit-identical. :func:`release_norm_parameters` removes them."""
    found = []
    for name, module in quantizer_modules(model).items():
        kind, op, port = split_hook_name(name)
        func = op_function(op)
        if kind == "pre_hooks" and port > 0 and func.endswith("_norm") and module.enabled:
            found.append(name)
    return found


def release_norm_parameters(model: nn.Module) -> list[str]:
    """Remove NNCF's quantizers of norm affine parameters from ``model`` (in place), so that test-
    time adaptation of those parameters takes effect; returns their names. Deployment runtimes keep
    norm parameters in float anyway (OpenVINO folds BatchNorm and runs LayerNorm in float)."""
    names = norm_parameter_quantizers(model)
    storage = hook_storage(model)
    for name in names:
        storage.delete_hook(name[len(HOOKS_ATTR) + 1 :])
    return names

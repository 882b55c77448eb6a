"""Export of an (adapted) NNCF model through NNCF's own deployment path: ``nncf.strip``.

NNCF 3.4 offers three strip formats for PyTorch models (``nncf.StripFormat``):

* ``NATIVE`` (used here): every NNCF ``SymmetricQuantizer`` / ``AsymmetricQuantizer`` hook is
  replaced by PyTorch's own ``torch.ao.quantization.FakeQuantize`` (observer off, NNCF's scale and
  zero point copied in), so the model runs ``aten.fake_quantize_per_tensor_affine`` /
  ``fake_quantize_per_channel_affine``. Weights whose quantizer uses a narrow range (NNCF's
  symmetric weights) or half range (NNCF's overflow fix) are clamped and snapped to the grid in
  place. This is what ``openvino.convert_model`` consumes: each ``aten.fake_quantize_*`` becomes an
  OpenVINO ``FakeQuantize``, which OpenVINO's low-precision transformations run as int8. It is the
  only format that handles a model from ``nncf.quantize`` (weight *and* activation quantizers).
* ``DQ`` and ``IN_PLACE`` apply to weight-only compression (``nncf.compress_weights``: quantizers
  hooked on the output of a weight constant). On an ``nncf.quantize`` model they fail: the
  activation quantizers sit on operations, not on weights, and the weight quantizers are
  pre-hooks on the conv / linear input port.

NNCF builds those ``FakeQuantize`` modules with torchao's observers (``nncf.torch.quantization.strip``
imports ``torchao.quantization.pt2e.observer``), a dependency NNCF does not declare: stripping needs
torchao installed (:class:`~qtta_plugins.errors.BackendNotInstalledError` otherwise).

``nncf.strip`` converts 8-bit quantizers only (``torch.qint8`` / ``torch.quint8``):
:func:`strip` checks every enabled quantizer first and names the ones that are not 8-bit.

What :func:`strip` adds to ``nncf.strip``:

* the caller's model is never touched unless ``do_copy=False`` (one deep copy, then NNCF strips
  that copy in place);
* quantizers that are switched off (``enabled`` buffer 0, e.g. by ``QuantizerHandle.enabled``)
  are removed: ``nncf.strip`` itself ignores the switch and would turn them into active
  ``FakeQuantize`` modules;
* the result has **fixed statistics**: it is put in eval mode, so BatchNorm normalises with its
  running statistics (whatever adaptation left in them: Tent and BN-adapt here use test-batch
  statistics with momentum 0, so these are the source statistics, and the adapted affine
  parameters). The BatchNorm momentum the view set aside for batch mode is put back. Calling
  ``.train()`` on the result would switch BatchNorm back to batch statistics: don't, for inference.
* the example input NNCF's NATIVE strip needs (to trace the model) is the one our quantizer or
  view stored on the model, unless one is passed;
* leftover gradients (``.grad``) of the adaptation are dropped, and so is the view's one-shot
  input-capturing hook.

The stripped model keeps its class and NNCF's forward wrapper and ``HookStorage``
(``model.__nncf_hooks``); the hooks now hold ``torch.ao.quantization.FakeQuantize`` modules (and,
for models NNCF quantized as transformers, the exact ``SQMultiply`` SmoothQuant scalings). It is no
longer a model the NNCF adapter (or its quant view) recognises: it is for inference and export.
"""

from __future__ import annotations

import copy
import importlib

import torch
from torch import nn

from qtta_plugins.errors import BackendNotInstalledError
from qtta_plugins.view import set_module_norm_mode

from ._backend import nncf_module
from .view import EXAMPLE_ATTR, HOOKS_ATTR, _CaptureExample, is_quantizer, quantizer_modules

STRIP_BITS = 8
"""The only bit-width ``nncf.strip`` converts."""


def _check_bits(modules: dict[str, nn.Module]) -> None:
    bad = {
        name: int(m.num_bits)
        for name, m in modules.items()
        if m.is_enabled_quantization() and int(m.num_bits) != STRIP_BITS
    }
    if bad:
        listing = ", ".join(f"{name} ({bits} bit)" for name, bits in bad.items())
        raise ValueError(
            f"nncf.strip supports {STRIP_BITS}-bit quantizers only; {len(bad)} enabled "
            f"quantizer(s) are not {STRIP_BITS}-bit: {listing}. Set them to {STRIP_BITS} bit "
            "(QuantizerHandle.bits) or switch them off (QuantizerHandle.enabled = False) before "
            "stripping, or deploy the fake-quantized NNCF model as it is."
        )


def _fix_statistics(model: nn.Module) -> None:
    """Eval mode (BatchNorm on running statistics) and the source momentum put back."""
    set_module_norm_mode(model, "source")


def _drop_disabled_quantizers(model: nn.Module) -> None:
    storage = model._modules[HOOKS_ATTR]
    disabled = [
        name
        for name, module in storage.named_hooks()
        if is_quantizer(module) and not module.is_enabled_quantization()
    ]
    for name in disabled:
        storage.delete_hook(name)


def _drop_qtta_state(model: nn.Module) -> None:
    for key, hook in list(model._forward_pre_hooks.items()):
        if isinstance(hook, _CaptureExample):
            del model._forward_pre_hooks[key]
    model.__dict__.pop(EXAMPLE_ATTR, None)
    for p in model.parameters():
        p.grad = None


def _require_strip_dependencies() -> None:
    """``nncf.strip`` for PyTorch imports torchao's observers, which NNCF does not declare."""
    try:
        importlib.import_module("nncf.torch.quantization.strip")
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "torchao":
            raise
        raise BackendNotInstalledError(
            "nncf.strip needs torchao (NNCF builds its torch FakeQuantize modules with torchao's "
            "observers): pip install 'qtta-plugins[nncf,torchao]'"
        ) from exc


def strip(
    model: nn.Module, *, do_copy: bool = True, example_input: torch.Tensor | None = None
) -> nn.Module:
    """``nncf.strip`` (NATIVE format) of an NNCF-quantized, possibly adapted, model.

    ``model``: a model from ``qtta_plugins.quantize(..., "nncf", ...)`` or the user's own
    ``nncf.quantize`` output, adapted or not (e.g. ``run.model`` of ``qtta_plugins.adapt``).
    ``do_copy``: strip a deep copy (default) and leave ``model`` as it is; ``False`` strips
    ``model`` itself. ``example_input``: an input batch to trace the model with; by default the
    example our quantizer or view stored on the model (a model never run through a view needs one).

    Returns the model with every enabled NNCF quantizer replaced by a
    ``torch.ao.quantization.FakeQuantize`` and disabled ones removed, in eval mode (BatchNorm on its
    running statistics: a stripped model has fixed statistics). Its predictions match the NNCF
    model's in source norm mode up to rounding of values on a grid midpoint (PyTorch's
    fake-quantize computes ``x / scale``, NNCF's kernel ``(x - low) * (levels - 1) / range``).

    Raises:
        BackendNotInstalledError: NNCF, or torchao (which ``nncf.strip`` imports), is missing.
        ValueError: not an NNCF-quantized model; an enabled quantizer that is not 8-bit (names
            each one with its bit-width; ``model`` is left untouched); no example input known.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    modules = quantizer_modules(model)
    if not modules:
        raise ValueError(
            f"{type(model).__qualname__} is not an NNCF-quantized model (no NNCF quantizer "
            f"under {HOOKS_ATTR}; already stripped?); quantize it first with qtta_plugins.quantize(model, 'nncf', ...) "
            "or nncf.quantize"
        )
    _check_bits(modules)
    example = example_input if example_input is not None else model.__dict__.get(EXAMPLE_ATTR)
    if not isinstance(example, torch.Tensor) or example.ndim == 0 or len(example) == 0:
        raise ValueError(
            "nncf.strip traces the model and needs an example input: pass example_input=x (a "
            "batch), or run the model once through qtta_plugins.quant_view / adapt"
        )
    nncf = nncf_module()
    _require_strip_dependencies()
    result = copy.deepcopy(model) if do_copy else model
    _fix_statistics(result)
    _drop_disabled_quantizers(result)
    device = next((p.device for p in result.parameters()), example.device)
    with torch.no_grad():
        result = nncf.strip(
            result,
            do_copy=False,
            strip_format=nncf.StripFormat.NATIVE,
            example_input=example[:1].to(device),
        )
    _drop_qtta_state(result)
    return result.eval()

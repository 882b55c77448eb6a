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

:func:`export` is this adapter's ``qtta_plugins.export``: the stripped model, or, with a path, its
ONNX file. NNCF 3.4 has no ONNX exporter of its own for PyTorch models; its documented route is
``torch.onnx.export`` of the model (each ``torch.ao.quantization.FakeQuantize`` becomes a
``QuantizeLinear`` -> ``DequantizeLinear`` pair), which :func:`export_onnx` takes on the
stripped model, through torch's TorchScript exporter (its dynamo exporter fails on these models).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import os
import pathlib
import warnings
from typing import Any

import torch
from torch import nn

from qtta_plugins.errors import BackendNotInstalledError
from qtta_plugins.exporting import UnsupportedExportError, example_input, export_options
from qtta_plugins.view import set_module_norm_mode

from . import BACKEND
from ._backend import nncf_module
from .graph import EXAMPLE_ATTR, _CaptureExample
from .handles import HOOKS_ATTR, is_quantizer, quantizer_modules

STRIP_BITS = 8
"""The only bit-width ``nncf.strip`` converts (NNCF's ``SUPPORTED_NUM_BITS_FOR_STRIP_MODEL``)."""

#: ``qtta_plugins.export`` options of this backend, with their defaults (see :func:`export`).
EXPORT_OPTIONS: dict[str, Any] = {"example": None, "opset_version": 18}


def _check_bits(modules: dict[str, nn.Module]) -> None:
    bad = {
        name: int(m.num_bits)
        for name, m in modules.items()
        if m.is_enabled_quantization() and int(m.num_bits) != STRIP_BITS
    }
    if bad:
        listing = ", ".join(f"{name} ({bits} bit)" for name, bits in bad.items())
        raise UnsupportedExportError(
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


def export_onnx(
    stripped: nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike[str],
    *,
    opset_version: int = 18,
) -> pathlib.Path:
    """Write a stripped model (:func:`strip`) to ``path`` with ``torch.onnx.export`` (input
    ``"input"``, output ``"output"``, batch axis dynamic) and return the path."""
    if not isinstance(example, torch.Tensor) or example.ndim == 0 or len(example) == 0:
        raise ValueError("example must be a tensor holding a non-empty batch (batch on axis 0)")
    missing = [m for m in ("onnx",) if importlib.util.find_spec(m) is None]
    if missing:
        raise BackendNotInstalledError(
            f"ONNX export needs {', '.join(missing)} (not installed): "
            "pip install onnx onnxruntime (onnxruntime runs the exported file)"
        )
    device = next((p.device for p in stripped.parameters()), example.device)
    x = example[:2] if len(example) >= 2 else torch.cat([example, example])
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # torch's dynamo exporter fails on this model (torch.ao FakeQuantize's forward branches on its
    # fake_quant_enabled buffer: a data-dependent guard), so the TorchScript route it is. Its trace
    # bakes that branch (and NNCF's hook dispatch) in as it is, which is what the warnings say.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*The feature will be removed.*")
        torch.onnx.export(
            stripped,
            (x.to(device),),
            str(path),
            input_names=["input"],
            output_names=["output"],
            opset_version=opset_version,
            dynamo=False,
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    return path


def export(
    model: nn.Module, path: str | os.PathLike[str] | None = None, **options: Any
) -> nn.Module | pathlib.Path:
    """``qtta_plugins.export`` for NNCF: :func:`strip` of a copy of ``model`` (not modified), or,
    with a ``path``, that stripped model written as ONNX by :func:`export_onnx` (the path is
    returned). Options: ``example`` (the input batch NNCF traces the model with; default the one
    our view stored on the model, else :func:`qtta_plugins.exporting.example_input`) and, with a
    path, ``opset_version``.

    Raises :class:`~qtta_plugins.exporting.UnsupportedExportError` naming every enabled quantizer
    that is not 8-bit (``nncf.strip`` converts 8-bit quantizers only).
    """
    opts = export_options(BACKEND, options, EXPORT_OPTIONS)
    if path is None and "opset_version" in options:
        raise TypeError("export option 'opset_version' applies with a path only (ONNX)")
    example = opts["example"]
    if example is None:
        example = model.__dict__.get(EXAMPLE_ATTR)
    if example is None:
        example = example_input(model)
    stripped = strip(model, example_input=example)
    if path is None:
        return stripped
    return export_onnx(stripped, example, path, opset_version=opts["opset_version"])

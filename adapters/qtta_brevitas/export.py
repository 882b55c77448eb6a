"""Exporting a (possibly adapted) Brevitas model to ONNX in QCDQ form with Brevitas' own exporter.

:func:`export_onnx_qcdq` writes the model through ``brevitas.export.export_onnx_qcdq``: every
enabled quantizer becomes ``QuantizeLinear`` -> ``Clip`` -> ``DequantizeLinear`` (the ``Clip`` where
the integer grid is narrower than int8 / uint8: narrow-range weights, grids below 8 bits), the
per-channel weight scales (our learnable ``PARAMETER_FROM_STATS`` thresholds over ``2^(b-1)-1``)
and the activation scales become constants, float biases and batch / layer norms stay float
operators; disabled quantizers and bit-widths changed through the view are exported as they are.
onnxruntime runs the file as is.

What is exported is the model **as it behaves in eval mode**: an ONNX graph has fixed statistics,
so batch norms normalise with their running statistics (for our adaptation methods, the source
statistics, which they never drift) and their current, possibly adapted, affine parameters. A model
whose batch norms adapt with the test batch's statistics (norm mode ``"batch"``, as ``norm`` / Tent
run them) therefore predicts differently in ONNX than during adaptation; to bake test-time
statistics into the file, write them into ``running_mean`` / ``running_var`` before exporting.

Two routes through Brevitas, chosen by ``dynamo``:

* ``dynamo=True`` (Brevitas' and torch's default since torch 2.9): ``torch.export`` based, needs
  ``onnxscript``; weights are stored in float with a ``QuantizeLinear`` in the graph. Brevitas
  refuses this route for quantized biases (``Int32Bias``) and input-aware decoupled weight
  quantizers (A2Q); our quantizers use neither (float bias), so our models take it.
* ``dynamo=False``: the TorchScript exporter (deprecated in torch); weights are stored as int8
  initializers (a file about 4x smaller), ``DequantizeLinear`` only on the weights.
* ``dynamo=None`` (default): the dynamo route unless the model holds something it refuses, then
  the TorchScript one.

Both give the same numbers, a dynamic batch axis, and handle ``F.scaled_dot_product_attention``
(TinyViT) at the default opset 18. Brevitas' own default opset, 13, fails on it in the TorchScript
route (it needs at least 14), and the dynamo route exports at 18 anyway (its conversion down to 13
fails on these graphs and leaves them at 18, after a long logged traceback).

:func:`export` is this adapter's ``qtta_plugins.export``: the QCDQ file written to a path, or,
without one, the ``onnx.ModelProto`` in memory.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import os
import pathlib
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from qtta_plugins.errors import BackendNotInstalledError
from qtta_plugins.exporting import example_input, export_options

from . import BACKEND
from ._backend import brevitas_module

INPUT_NAME = "input"
OUTPUT_NAME = "output"
DEFAULT_OPSET = 18

_INSTALL = "pip install onnx onnxoptimizer onnxscript onnxruntime"

#: ``qtta_plugins.export`` options of this backend, with their defaults (see :func:`export`).
EXPORT_OPTIONS: dict[str, Any] = {"example": None, "dynamo": None, "opset_version": DEFAULT_OPSET}


def _require(names: tuple[str, ...]) -> None:
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise BackendNotInstalledError(
            f"ONNX export of a Brevitas model needs {', '.join(missing)} (not installed): "
            f"{_INSTALL} (onnxruntime runs the exported file)"
        )


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's chatter (opset notes, 'torchvision is not installed'), not errors."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "brevitas")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*opset.*")
            warnings.filterwarnings("ignore", message=".*fast_hadamard_transform.*")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _dynamo_refuses(model: nn.Module) -> bool:
    """Whether Brevitas' dynamo QCDQ route rejects ``model`` (see the module docstring)."""
    proxy = brevitas_module("brevitas.proxy")
    refused = (
        proxy.BiasQuantProxyFromInjector,
        proxy.DecoupledWeightQuantWithInputProxyFromInjector,
    )
    return any(isinstance(m, refused) and m.is_quant_enabled for m in model.modules())


def export_onnx_qcdq(
    model: nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike,
    *,
    dynamo: bool | None = None,
    opset_version: int = DEFAULT_OPSET,
) -> pathlib.Path:
    """Write ``model`` (a Brevitas model, ours from ``qtta_plugins.quantize(..., "brevitas", ...)``
    or hand-built) to ``path`` as a QCDQ ONNX graph and return the path.

    ``example``: one input batch; it fixes every dimension but the batch one (axis 0 is dynamic, so
    the file runs on any batch size). The model is exported from a deep copy in eval mode (batch
    norms on their running statistics, see the module docstring); ``model`` itself, its training
    flags and its quantizers are left as they were. The graph's input is named ``"input"``, its
    output ``"output"``. ``dynamo`` picks Brevitas' exporter route and ``opset_version`` the ONNX
    opset (module docstring).

    Raises :class:`~qtta_plugins.errors.BackendNotInstalledError` naming the pip command when onnx,
    onnxoptimizer (Brevitas runs it on every export) or, for ``dynamo=True``, onnxscript is missing.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example, torch.Tensor) or example.dim() == 0 or example.shape[0] == 0:
        raise ValueError("example must be a tensor holding a non-empty batch (batch on axis 0)")
    if dynamo is None:
        dynamo = not _dynamo_refuses(model)
    _require(("onnx", "onnxoptimizer", "onnxscript") if dynamo else ("onnx", "onnxoptimizer"))
    export = brevitas_module("brevitas.export").export_onnx_qcdq

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    device = next(iter(model.parameters()), torch.empty(0)).device
    example = example.detach().to(device)
    if example.shape[0] < 2:  # torch.export specialises a dimension of size 1 to a constant
        example = torch.cat([example, example])
    exported = copy.deepcopy(model).eval()
    for p in exported.parameters():
        p.requires_grad_(False)

    kwargs: dict = {
        "input_names": [INPUT_NAME],
        "output_names": [OUTPUT_NAME],
        "opset_version": opset_version,
        # Brevitas' default (True) lists every weight and constant as a graph input too, which
        # onnxruntime then may not constant-fold (and warns about, once per initializer)
        "keep_initializers_as_inputs": False,
    }
    if dynamo:
        kwargs.update(
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            external_data=False,  # one self-contained file, no stale ``<path>.data`` left behind
            optimize=True,
            verbose=False,
        )
    else:
        kwargs.update(
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    with _quiet_exporter(), torch.no_grad():
        export(exported, args=example, export_path=str(path), dynamo=dynamo, **kwargs)
    return path


def export(model: nn.Module, path: str | os.PathLike | None = None, **options: Any) -> Any:
    """``qtta_plugins.export`` for Brevitas: :func:`export_onnx_qcdq` of ``model`` (not modified).

    With a ``path``, the QCDQ file is written there and its :class:`pathlib.Path` returned;
    without one, the graph is written to a temporary file and returned as an ``onnx.ModelProto``
    (``onnx.save(proto, path)`` writes it; ``onnxruntime.InferenceSession(proto.SerializeToString())``
    runs it). Options: ``example`` (an input batch; default
    :func:`qtta_plugins.exporting.example_input`, which a hand-built model lacks), ``dynamo`` and
    ``opset_version`` (as for :func:`export_onnx_qcdq`).
    """
    opts = export_options(BACKEND, options, EXPORT_OPTIONS)
    example = opts["example"] if opts["example"] is not None else example_input(model)
    if example is None:
        raise ValueError(
            "ONNX export traces the model and needs an example input: pass example=x (a batch); "
            "only models from qtta_plugins.quantize know their input shape"
        )
    route = {"dynamo": opts["dynamo"], "opset_version": opts["opset_version"]}
    if path is not None:
        return export_onnx_qcdq(model, example, path, **route)
    with tempfile.TemporaryDirectory(prefix="qtta-onnx-") as tmp:
        written = export_onnx_qcdq(model, example, pathlib.Path(tmp) / "model.onnx", **route)
        return importlib.import_module("onnx").load(str(written))

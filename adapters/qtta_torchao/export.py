"""Export of an (adapted) torchao pt2e model through torchao's own deployment path.

``convert_pt2e`` turns the fake-quant graph into torchao's integer Q/DQ graph (batch norms folded into
the convs, weights stored as integers); ``torch.compile`` on that graph is the integer-kernel path
(with X86InductorQuantizer-style patterns it lowers to int8 kernels; other patterns still compile).

An exported graph has fixed normalisation statistics: the model is converted as it behaves on its
running statistics (norm mode ``"source"``), with whatever affine parameters adaptation left it.

:func:`export` is this adapter's ``qtta_plugins.export``: ``convert`` (or a copy of a model
already converted), then optionally ``torch.compile`` or ``torch.export.save`` to a file.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable
from typing import Any

import torch

from qtta_plugins.exporting import (
    ROOT_HOOKS,
    UnsupportedExportError,
    example_input,
    export_options,
)
from qtta_plugins.view import copy_model, remember_source_sample, source_sample

from . import BACKEND
from ._backend import torchao_module
from .converted_view import ConvertedView
from .eager_view import ModuleView
from .graph import (
    _inner_graph,
    _sample_shape,
    foldable_norms,
    insert_folded_norms,
    remove_input_taps,
)
from .handles import FakeQuantizeHandle
from .patterns import patterns_traced_once
from .pt2e_view import Pt2eView
from .quantize import match_convert_fold_eps
from .view import recognise

#: ``qtta_plugins.export`` options of this backend, with their defaults (``freeze`` defaults to
#: ``True`` with ``compile=True`` and applies only there).
EXPORT_OPTIONS: dict[str, Any] = {
    "compile": False,
    "freeze": None,
    "folded_norms": True,
    "example": None,
}


def _carry_root_hooks(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Forward hooks on a model's root module (FOA's input prompt) are part of the function it
    computes; a GraphModule's deep copy drops them, and ``convert_pt2e`` builds a new
    GraphModule: ``target`` gets ``source``'s (shared, not copied: see
    :func:`qtta_plugins.exporting.hooks_shared_by_copies`)."""
    if target is source:
        return
    for attr in ROOT_HOOKS:
        getattr(target, attr).update(getattr(source, attr))


def convert(model: torch.fx.GraphModule, *, folded_norms: bool = True) -> torch.fx.GraphModule:
    """torchao's integer Q/DQ model of a prepared pt2e model (the caller's model is not modified).

    ``folded_norms``: put a stand-in for each batch norm ``convert_pt2e`` folds into its conv (see
    :func:`qtta_torchao.graph.insert_folded_norms`): the identity as converted, it lets forward-only
    methods (``norm``, ``zoa``) renormalise and adapt the integer model. ``False`` gives
    ``convert_pt2e``'s graph untouched.
    """
    if not isinstance(model, torch.nn.Module) or not isinstance(recognise(model), Pt2eView):
        raise TypeError(
            "convert expects a torchao pt2e model with fake-quant modules (prepare_pt2e / "
            f"prepare_qat_pt2e output, or qtta_plugins.quantize(..., 'torchao')), got {type(model).__name__}"
        )
    quantize_pt2e = torchao_module("torchao.quantization.pt2e.quantize_pt2e")
    original, model = model, copy_model(model)
    view = Pt2eView(model)
    view.set_norm_mode("source")
    convert_on_buffers(view)
    remove_input_taps(model)  # feature taps a forward-only method put in; hooks die with them
    folded = foldable_norms(model) if folded_norms else []
    sample = source_sample(model)
    match_convert_fold_eps(model)  # after foldable_norms: the stand-ins keep each norm's own eps
    with patterns_traced_once():  # ~10 s of torchao's own tracing, once per process
        converted = quantize_pt2e.convert_pt2e(model)
    _carry_root_hooks(original, converted)  # an input prompt stays with the model
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


class _ScopedFreezing:
    """A compiled module's ``forward`` run under ``torch._inductor.config.patch(freezing=...)``.

    ``torch.compile`` traces and compiles lazily, on the first call and on every recompile, and
    both dynamo (whether parameters become constants) and inductor read ``freezing`` then: the
    setting has to hold during the calls, not when ``torch.compile`` is called (``options=``
    reaches inductor only, and inductor then fails on the parameters dynamo did not freeze)."""

    def __init__(self, forward: Callable[..., Any], freeze: bool) -> None:
        self.forward = forward
        self.freeze = freeze

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=self.freeze):
            return self.forward(*args, **kwargs)


def compile_converted(model: torch.fx.GraphModule, *, freeze: bool = True) -> torch.nn.Module:
    """``torch.compile`` (inductor) of a converted model: the integer-kernel path.

    ``freeze=True`` lets inductor fold the weights as constants (fastest, for a model that no longer
    changes). A model that will still adapt (``qtta_plugins.adapt(compiled, method="zoa")``) needs
    ``freeze=False``: frozen parameters would ignore the adapted norm affines.

    The setting is scoped to this model: each call of the returned module runs under
    ``torch._inductor.config.patch(freezing=freeze)`` (compilation happens lazily, inside calls),
    and the process's ``torch._inductor.config.freezing`` is as it was between calls.
    """
    compiled = torch.compile(model)
    compiled.forward = _ScopedFreezing(compiled.forward, freeze)
    return compiled


def _converted_copy(model: torch.nn.Module) -> torch.fx.GraphModule:
    """A copy of a model ``convert_pt2e`` already produced (or of the graph inside its
    ``torch.compile`` wrapper), on running statistics, without our feature taps."""
    inner = _inner_graph(model)
    graph = copy_model(inner)
    _carry_root_hooks(inner, graph)
    if model is not inner:  # the torch.compile wrapper's own
        _carry_root_hooks(model, graph)
    remove_input_taps(graph)
    ConvertedView(graph).set_norm_mode("source")
    return graph


def save(
    converted: torch.fx.GraphModule, path: str | os.PathLike[str], example: torch.Tensor | None
) -> pathlib.Path:
    """Write a converted model to ``path`` with ``torch.export.save`` (batch axis dynamic); load it
    with ``torch.export.load(path).module()`` (after ``import torchao``, which registers the
    quantize / dequantize ops). ``example``: an input batch; default
    :func:`qtta_plugins.exporting.example_input`, else zeros of the input shape the graph records."""
    if example is None:
        example = example_input(converted)
    if example is None and _sample_shape(converted) is not None:
        example = torch.zeros(2, *_sample_shape(converted))  # the graph records its input shape
    if not isinstance(example, torch.Tensor) or example.ndim == 0 or len(example) == 0:
        raise ValueError(
            "torch.export.save traces the model and needs an example input: pass example=x (a "
            "batch)"
        )
    x = example[:2] if len(example) >= 2 else torch.cat([example, example])
    device = next((p.device for p in converted.parameters()), x.device)
    program = torch.export.export(
        converted, (x.to(device),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path)
    return path


def export(
    model: torch.nn.Module, path: str | os.PathLike[str] | None = None, **options: Any
) -> torch.nn.Module | pathlib.Path:
    """``qtta_plugins.export`` for torchao (``model`` is not modified).

    A prepared pt2e model (``qtta_plugins.quantize``, ``prepare_pt2e`` / ``prepare_qat_pt2e``,
    adapted or not) goes through :func:`convert` (``folded_norms``); a model ``convert_pt2e``
    already produced (``run.model`` after a forward-only method on it, or its ``torch.compile``
    wrapper) is copied. The result is on running statistics. ``compile=True``: its
    :func:`compile_converted` wrapper (``freeze``, default ``True``). ``path``: written with
    :func:`save` (``example``), and the path returned.

    Raises :class:`~qtta_plugins.exporting.UnsupportedExportError` for a model quantized through
    ``quantize_`` (QAT Linear layers: ``convert_pt2e`` applies to pt2e graphs only) and for
    ``compile=True`` with a ``path``; ``TypeError`` for an unknown option, or one that does not
    apply (``freeze`` without ``compile``, ``folded_norms`` on a converted model).
    """
    opts = export_options(BACKEND, options, EXPORT_OPTIONS)
    if opts["freeze"] is not None and not opts["compile"]:
        raise TypeError("export option 'freeze' applies to compile=True only")
    if opts["example"] is not None and path is None:
        raise TypeError("export option 'example' applies with a path only (torch.export.save)")
    if path is not None and opts["compile"]:
        raise UnsupportedExportError(
            "torchao export: compile=True returns a torch.compile wrapper, which cannot be "
            "written to a file; pass either a path (torch.export.save of the converted graph) "
            "or compile=True"
        )
    view = recognise(model) if isinstance(model, torch.nn.Module) else None
    if isinstance(view, Pt2eView):
        converted = convert(model, folded_norms=opts["folded_norms"])  # type: ignore[arg-type]
    elif isinstance(view, ConvertedView):
        if "folded_norms" in options:
            raise TypeError(
                "export option 'folded_norms' applies to a prepared pt2e model; this model is "
                "already converted"
            )
        converted = _converted_copy(model)
    elif isinstance(view, ModuleView):
        raise UnsupportedExportError(
            "torchao export supports pt2e models (convert_pt2e); this model was quantized "
            "through torchao's quantize_ (QAT / tensor-subclass Linear layers, the route "
            "qtta_plugins.quantize takes for Linear-only models such as transformers), which "
            "convert_pt2e does not apply to: deploy it with torchao's own "
            "quantize_(model, QATConfig(base_config, step='convert'))"
        )
    else:
        raise UnsupportedExportError(
            f"not a torchao pt2e model: {type(model).__name__}; quantize it first with "
            "qtta_plugins.quantize(model, 'torchao', ...)"
        )
    if path is not None:
        return save(converted, path, opts["example"])
    if opts["compile"]:
        return compile_converted(converted, freeze=opts["freeze"] is not False)
    return converted

"""One export call for every backend: :func:`export`, served by the ``qtta_export`` hook.

Each adapter exports through its backend's own deployment path (torchao ``convert_pt2e``, optionally
``torch.compile``; Brevitas' QCDQ ONNX exporter; ``nncf.strip``); this module finds the adapter
for the model, and holds what adapters share: :func:`export_options` and
:class:`UnsupportedExportError`.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from .errors import QttaError


class UnsupportedExportError(QttaError, ValueError):
    """The backend's export path does not support this model, bit-width or request; the message
    names what is unsupported (nothing was changed)."""


def export_options(
    backend: str, options: Mapping[str, Any], accepted: Mapping[str, Any]
) -> dict[str, Any]:
    """``accepted`` (option name -> default) updated with ``options``; a ``TypeError`` names each
    unknown option and lists the accepted ones."""
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"unknown export option(s) {', '.join(map(repr, unknown))} for the {backend} backend; "
            f"accepted: {', '.join(sorted(accepted)) or 'none'}"
        )
    return {**accepted, **options}


def example_input(model: torch.nn.Module, batch: int = 2) -> torch.Tensor | None:
    """An input batch of ``batch`` to trace ``model`` with: the first calibration images
    :func:`~qtta_plugins.quantize` kept on it (``keep_calibration_sample=True``), else zeros of
    the input shape its source statistics record; ``None`` when neither is known (a model
    quantized with the backend's own API: pass ``example=``)."""
    from .source import kept_source_statistics, source_sample

    sample = source_sample(model)
    if isinstance(sample, torch.Tensor) and len(sample):
        return sample[:batch]
    stats = kept_source_statistics(model)
    if stats is None:
        return None
    return torch.zeros(batch, *stats.input_shape)


#: the forward hook dicts of a module (torch.nn.Module keeps them in its ``__dict__``)
ROOT_HOOKS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


class _SharedOnCopy(OrderedDict):
    """A module's hook dict whose deep copy holds the same hooks, not copies of them."""

    def __deepcopy__(self, memo: dict[int, Any]) -> OrderedDict:
        return OrderedDict(self)


@contextlib.contextmanager
def hooks_shared_by_copies(model: torch.nn.Module) -> Iterator[None]:
    """While inside, deep copies of ``model`` share its forward hooks instead of copying them.

    Hooks on a model's root module belong to the adaptation method, not to the model: FOA keeps
    its input prompt in one, bound to the method, which holds what cannot be deep-copied (the
    CMA-ES package). An exporter copies the model; its copy then applies the prompt the adapted
    model applies. On leaving, ``model`` holds its own hook dicts again, as they were.
    """
    saved = {}
    for attr in ROOT_HOOKS:
        hooks = model.__dict__.get(attr)
        if hooks:
            saved[attr] = hooks
            model.__dict__[attr] = _SharedOnCopy(hooks)
    try:
        yield
    finally:
        model.__dict__.update(saved)


def export(
    model: torch.nn.Module, path: str | os.PathLike[str] | None = None, **options: Any
) -> Any:
    """Export a quantized model (straight from :func:`~qtta_plugins.quantize`, or ``run.model``
    after any adaptation method) through its backend's own deployment path.

    ``model`` itself is never modified. What is exported is the model with fixed statistics: norms
    on their running statistics with their current (adapted) affine parameters, i.e. what it
    computes in norm mode ``"source"`` (a model left in batch mode is exported as it behaves in
    source mode). Forward hooks on the model's root (FOA's input prompt) are shared by the copy the
    backend exports (:func:`hooks_shared_by_copies`): an exported module applies them (as they are
    when it runs), a traced graph (ONNX) holds them as they were when traced. What comes back,
    per backend (``options`` in brackets):

    * torchao: ``convert_pt2e``'s integer Q/DQ graph, with a stand-in for every batch norm it
      folds (``folded_norms=True``); ``compile=True`` returns its ``torch.compile`` wrapper
      (``freeze=True``: inductor folds the weights as constants, scoped to this compilation). A
      ``path`` writes the converted graph with ``torch.export.save`` (``example``: the input that
      fixes the shape; default :func:`example_input`).
    * brevitas: the QCDQ ONNX graph of Brevitas' exporter (``example``, ``dynamo``,
      ``opset_version``): written to ``path`` (the path is returned), or, with ``path=None``, the
      ``onnx.ModelProto`` in memory.
    * nncf: the ``nncf.strip`` model (8-bit quantizers only; ``example``), or, with a ``path``,
      that model's ONNX file written by ``torch.onnx.export`` (the path is returned).

    Raises :class:`~qtta_plugins.errors.UnknownBackendError` for a model no installed adapter
    recognises, ``TypeError`` for an option the backend does not take, and
    :class:`UnsupportedExportError` naming what the backend's path cannot export (e.g.
    ``nncf.strip`` below 8 bits), or an adapter that implements no export.
    """
    from . import quant_view
    from .plugins import plugin_manager

    view = quant_view(model)  # UnknownBackendError for a model of no known backend
    with hooks_shared_by_copies(view.model):
        result = plugin_manager().hook.qtta_export(
            model=view.model, backend=view.backend, path=path, options=dict(options)
        )
    if result is None:
        raise UnsupportedExportError(
            f"the {view.backend!r} adapter implements no export (hook qtta_export): export the "
            f"model with {view.backend}'s own tools"
        )
    return result

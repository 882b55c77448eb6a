"""The contract between qtta-plugins and its plugins.

Two kinds of plugins implement these hooks:

* **backend adapters** (torchao, Brevitas, NNCF, ...) translate a backend's quantized model into the
  uniform :class:`~qtta_plugins.view.QuantView` and back, quantize float models, and export
  quantized ones through the backend's own deployment path;
* **methods** (``source``, ``norm``, ``tent``, later ZOA, TTAQ, RTF-Q, ...) work only on that view and
  so run on every backend.

Two hooks declare what a plugin provides and are called on every plugin, their lists concatenated:
``qtta_methods`` and ``qtta_backends``. Every other hook is ``firstresult``: each implementation
looks at the request (the backend or method name in ``config`` or ``backend``, or the model's type)
and returns ``None`` when it is not the one addressed, so the first plugin that recognises the
request answers. A plugin is registered either by the core (the built-in methods) or through the
``qtta_plugins`` entry-point group, the same way for both. How the core calls each hook:
``docs/design.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import os
    from collections.abc import Iterable

    import torch

    from .config import AdaptConfig, QuantConfig, ReconstructConfig
    from .methods.base import MethodInfo, TestTimeMethod
    from .view import QuantView

PROJECT = "qtta_plugins"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def qtta_methods() -> list[MethodInfo]:
    """Declare the methods this plugin provides.

    Return a list of :class:`~qtta_plugins.methods.base.MethodInfo` (name, the hook it serves:
    ``"adapt"``, ``"reconstruct"`` or ``"select_subnet"``, whether it needs autograd, a one-line
    summary). Not firstresult: every plugin's lists are concatenated. The core uses them to list
    what is installed, to name the alternatives in an "unknown method" error, and to pick a default.
    """


@hookspec
def qtta_backends() -> list[str]:
    """Declare the backend names this plugin adapts (e.g. ``["torchao"]``).

    Not firstresult. Must not import the backend itself: it is called to list installed plugins and to
    name the alternatives in an "unknown backend" error, even when the backend is not installed.
    """


@hookspec(firstresult=True)
def qtta_quant_view(model: torch.nn.Module) -> QuantView | None:
    """Recognise a quantized model of this plugin's backend and return its uniform view.

    Return ``None`` when the model is not of this backend. Recognition must be cheap and must not import
    the backend unless the model could be one of its models (check ``type(model).__module__`` or a
    marker first). The view wraps the given model object itself (no copy): the caller decides whether
    to copy first. It must cover models quantized with the backend's own API, not only ours.
    """


@hookspec(firstresult=True)
def qtta_quantize(
    model: torch.nn.Module, config: QuantConfig, calib: Iterable[torch.Tensor]
) -> torch.nn.Module | None:
    """Quantize a float model with the backend named in ``config.backend``.

    Return ``None`` when ``config.backend`` is not this plugin's. Otherwise return a new model of the
    backend's native kind (the input model is not modified), calibrated on the batches of ``calib``,
    with weights and activations at ``config.weight_bits`` / ``config.act_bits``. Raise a clear
    ``ImportError`` naming the pip extra when the backend is not installed.
    """


@hookspec(firstresult=True)
def qtta_reconstruct(
    qmodel: torch.nn.Module,
    fp_model: torch.nn.Module,
    calib: Iterable[torch.Tensor],
    config: ReconstructConfig,
) -> torch.nn.Module | None:
    """PTQ reconstruction of an already-quantized model against its float original.

    Return ``None`` when ``config.method`` is not this plugin's. Otherwise return the reconstructed model,
    still of its backend's native kind, with the learned rounding and scales written back into the
    backend's own state so that the backend's forward reproduces the reconstructed function.
    """


@hookspec(firstresult=True)
def qtta_adapt(view: QuantView, config: AdaptConfig) -> TestTimeMethod | None:
    """Build the online test-time adaptation method named ``config.method`` on a model's view.

    Return ``None`` when the name is not this plugin's. Otherwise return a
    :class:`~qtta_plugins.methods.base.TestTimeMethod`, already configured on ``view`` (which parameters
    adapt, which norms use batch statistics). The core drives it over the stream one batch at a time
    (predict, then update), validates each batch, rolls back on error, and handles reset / save / load,
    so a method only writes ``forward_and_adapt``.
    """


@hookspec(firstresult=True)
def qtta_select_subnet(
    bank: Any, budget: dict[str, float], backend: str | None
) -> torch.nn.Module | None:
    """Choose the most accurate subnet of an RTF-Q bank within ``budget`` and materialise it.

    ``budget`` maps resource names (``"macs"``, ``"bitops"``, ``"bytes"``) to upper bounds. Return
    ``None`` when ``bank`` is not of a kind this plugin knows. Otherwise return a standalone model of
    ``backend`` (``None``: the plugin's default), or raise ``ValueError`` naming the smallest feasible
    budget.
    """


@hookspec(firstresult=True)
def qtta_export(
    model: torch.nn.Module,
    backend: str,
    path: str | os.PathLike[str] | None,
    options: dict[str, Any],
) -> Any | None:
    """Export a quantized, possibly adapted, model of ``backend`` through the backend's own
    deployment path (what :func:`qtta_plugins.export` calls).

    The core has already recognised ``model`` (through ``qtta_quant_view``) as a model of
    ``backend``. Return ``None`` when ``backend`` is not this plugin's. Otherwise:

    * never modify ``model``: export a copy where the backend's path changes the model it is given;
    * export the model with fixed statistics: norms on their running statistics, with their
      current (adapted) affine parameters, i.e. what the model computes in norm mode ``"source"``;
    * ``path=None``: return the exported object (a module, or an in-memory artefact such as an ONNX
      ``ModelProto``); a path: write the file there and return its :class:`pathlib.Path`;
    * ``options``: the backend's keyword options; raise ``TypeError`` naming each unknown option
      and listing the accepted ones (:func:`qtta_plugins.exporting.export_options`);
    * raise :class:`~qtta_plugins.exporting.UnsupportedExportError` naming what the backend's path
      does not support (a bit-width, a kind of model, a file for an in-memory path) before
      touching anything, and :class:`~qtta_plugins.errors.BackendNotInstalledError` naming the pip
      command when the exporter needs a package that is missing.

    A backend with no export path at all still implements this hook, raising
    ``UnsupportedExportError`` that says so for each of its models: that is its declaration. The
    conformance kit fails an adapter that leaves the hook out (an export forgotten, not one that
    cannot exist); :mod:`qtta_plugins.conformance`.
    """

"""qtta-plugins: test-time adaptation for quantized models, as pluggy plugins.

Public API::

    qmodel = qtta_plugins.quantize(model, backend="torchao", bits="w4a4", calib=batches)
    run = qtta_plugins.adapt(qmodel, stream)          # backend detected, method chosen
    run.predictions, run.model, run.errors()          # in stream order; still a torchao model
    run.reset(); run.save("state.pt"); run.load("state.pt")
    deployable = qtta_plugins.export(run.model)       # through the backend's own export path

Importing this package imports no quantization backend: adapters load their backend lazily.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .adaptation import (
    Adaptation,
    DomainResult,
    calibration_batches,
    calibration_images,
    check_reset_policy,
)
from .config import ABLConfig, AdaptConfig, QuantConfig, ReconstructConfig, parse_bits
from .data import make_stream
from .errors import (
    BackendNotInstalledError,
    BadBatchError,
    QttaError,
    SmallBatchError,
    UnknownBackendError,
    UnknownMethodError,
    UnsafeStateError,
)
from .exporting import UnsupportedExportError, export
from .features import measure_source_statistics
from .guard import GuardConfig, as_guard
from .hookspecs import hookimpl
from .methods.cotta import CoTTAConfig
from .methods.eata import EATAConfig
from .methods.foa import FOAConfig
from .methods.norm import NormConfig
from .methods.rotta import RoTTAConfig
from .methods.rtfq import RTFQConfig, SubnetBank, train_bank
from .methods.sar import SARConfig
from .methods.source import SourceConfig
from .methods.tent import TentConfig
from .methods.ttaq import TTAQConfig
from .methods.zoa import ZOAConfig
from .plugins import available_backends, available_methods, list_plugins
from .plugins import plugin_manager as _plugin_manager
from .ranges import search_activation_ranges, search_batches
from .source import SOURCE_SAMPLE_SIZE, keep_source_statistics, kept_source_statistics
from .view import QuantView
from .view import copy_model as _copy_model
from .window import WindowConfig, Windowed, as_window, check_window_fits

__version__ = "0.1.0"

#: The public face: the verbs, the configs, the errors and the types users hold. Adapter and
#: method writers import the internals from their modules (docs/design.md, "Adding a backend").
__all__ = [  # noqa: RUF022 (grouped by kind for the reader, not sorted)
    # the verbs
    "adapt",
    "export",
    "list_plugins",
    "quant_view",
    "quantize",
    "reconstruct",
    "select_subnet",
    "train_bank",
    "make_stream",
    # one config per choice
    "ABLConfig",
    "AdaptConfig",
    "CoTTAConfig",
    "EATAConfig",
    "FOAConfig",
    "NormConfig",
    "QuantConfig",
    "RTFQConfig",
    "ReconstructConfig",
    "RoTTAConfig",
    "SARConfig",
    "SourceConfig",
    "TTAQConfig",
    "TentConfig",
    "WindowConfig",
    "GuardConfig",
    "ZOAConfig",
    # what a call gives back
    "Adaptation",
    "DomainResult",
    "QuantView",
    "SubnetBank",
    # the errors (all are QttaError)
    "BackendNotInstalledError",
    "BadBatchError",
    "QttaError",
    "SmallBatchError",
    "UnknownBackendError",
    "UnknownMethodError",
    "UnsafeStateError",
    "UnsupportedExportError",
    # for plugins that extend us through an entry point
    "hookimpl",
]

#: Internals once exported here, and the module each now comes from. They still resolve (with a
#: DeprecationWarning saying where to import them from) so that code written against the old
#: face keeps running.
_MOVED = {
    "Block": "qtta_plugins.view",
    "Grid": "qtta_plugins.view",
    "NormLayer": "qtta_plugins.view",
    "QuantLayer": "qtta_plugins.view",
    "QuantizerHandle": "qtta_plugins.view",
    "SourceStatistics": "qtta_plugins.view",
    "copy_model": "qtta_plugins.view",
    "fake_quantize": "qtta_plugins.view",
    "remember_source_sample": "qtta_plugins.view",
    "source_sample": "qtta_plugins.view",
    "plugin_manager": "qtta_plugins.plugins",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        module = _MOVED[name]
        warnings.warn(
            f"qtta_plugins.{name} is internal and no longer part of the package's public face: "
            f"import it from {module} (from {module} import {name})",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'qtta_plugins' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


def quant_view(model: torch.nn.Module) -> QuantView:
    """The uniform view of a quantized model, from whichever installed adapter recognises it."""
    if isinstance(model, QuantView):
        return model
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    view = _plugin_manager().hook.qtta_quant_view(model=model)
    if view is None:
        backends = ", ".join(available_backends()) or "none"
        raise UnknownBackendError(
            f"no installed backend adapter recognises a model of type {type(model).__qualname__} "
            f"(installed adapters: {backends}). If it is a float model, quantize it first with "
            "qtta_plugins.quantize(model, backend=..., bits=..., calib=...)."
        )
    return view


def quantize(
    model: torch.nn.Module,
    backend: str | QuantConfig = "torchao",
    bits: str | int | tuple[int, int] = "w8a8",
    calib: Iterable[torch.Tensor] | torch.Tensor | None = None,
    **options: Any,
) -> torch.nn.Module:
    """Quantize a float model with ``backend`` at ``bits`` (``"w4a4"``, ``4``, ``(4, 8)``).

    ``calib``: calibration batches (an iterable of input tensors or ``(x, y)`` pairs, e.g. a
    ``DataLoader``, or one tensor). Only what is used is read from it: the first
    ``calib_batches`` batches (8 by default) the backend calibrates on, and as many more as make
    up 512 images for the source statistics below; a loader over a whole training set is never
    read in full. The returned model is the backend's own kind; ``model`` itself is not
    modified. ``options`` go to :class:`QuantConfig` (e.g. ``first_last_bits=None``).

    The returned model carries, outside its state dict, the statistics of itself on the first 512
    calibration images that forward-only methods (``zoa``, ``foa``) and the adapter's preparation
    need (:class:`~qtta_plugins.view.SourceStatistics`), not the images:
    ``keep_calibration_sample=True`` keeps the images instead (they then travel with every copy of
    the model), for a model you will convert or change before adapting it.
    """
    if isinstance(backend, QuantConfig):
        config = backend
    else:
        w, a = parse_bits(bits)
        config = QuantConfig(backend=backend, weight_bits=w, act_bits=a, **options)
    if config.backend not in available_backends():
        raise UnknownBackendError(
            f"unknown backend {config.backend!r}; installed adapters: "
            f"{', '.join(available_backends()) or 'none'}"
        )
    if calib is None:
        raise ValueError("quantize needs calibration data: calib=<batches of inputs>")
    # Only what is used is read: the adapter calibrates on the first config.calib_batches
    # batches, and the source statistics are measured on the first SOURCE_SAMPLE_SIZE images.
    batches = calibration_batches(
        calib, "quantize", batches=config.calib_batches, images=SOURCE_SAMPLE_SIZE
    )
    result = _plugin_manager().hook.qtta_quantize(model=model, config=config, calib=batches)
    if result is None:  # pragma: no cover - a backend declared but not implementing quantize
        raise UnknownBackendError(f"the {config.backend!r} adapter does not implement quantize")
    if config.applies_act_ranges:
        # the backends set the shared percentile rule; the search (or another rule) starts there
        search_activation_ranges(
            quant_view(result),
            model,
            search_batches(batches[: config.calib_batches]),
            rule=config.act_ranges,
        )
    measure_source_statistics(result, batches, keep_sample=config.keep_calibration_sample)
    return result


def _default_method(view: QuantView) -> str:
    """Tent where gradients flow; the forward-only ZOA where they cannot (it needs norm affines);
    BN-adapt where only statistics can change; else no adaptation, with a warning."""
    methods = available_methods("adapt")
    norms = view.norms()
    if view.can_backprop and norms:
        return "tent"
    if "zoa" in methods and any(n.affine() for n in norms):
        return "zoa"
    if any(n.has_statistics for n in norms):
        return "norm"
    warnings.warn(
        f"this {view.backend} model can neither backpropagate nor adapt a norm layer (a "
        "convert_pt2e graph whose batch norms were folded away? qtta_torchao.export.convert keeps "
        "a stand-in for each): running 'source' (no adaptation)",
        stacklevel=3,
    )
    return "source"


def _resolve_config(
    method: str | AdaptConfig | None, view: QuantView, options: dict
) -> AdaptConfig:
    if isinstance(method, AdaptConfig):
        if options:
            raise TypeError("pass options inside the config object, or a method name plus options")
        config = method
    else:
        name = method or _default_method(view)
        methods = available_methods("adapt")
        if name not in methods:
            raise UnknownMethodError(
                f"no installed plugin provides adaptation method {name!r}; "
                f"available: {', '.join(sorted(methods))}"
            )
        config = methods[name].config_cls(method=name, **options)
    if config.method not in available_methods("adapt"):
        raise UnknownMethodError(
            f"no installed plugin provides adaptation method {config.method!r}; "
            f"available: {', '.join(sorted(available_methods('adapt')))}"
        )
    return config


def adapt(
    model: torch.nn.Module,
    stream: Iterable[Any] | None = None,
    method: str | AdaptConfig | None = None,
    *,
    inplace: bool = False,
    progress: bool | None = None,
    reset_every: int | None = None,
    reset_on_shift: bool | None = None,
    window: int | WindowConfig | None = None,
    guard: bool | dict[str, Any] | GuardConfig | None = None,
    **options: Any,
) -> Adaptation:
    """Adapt a quantized model online to ``stream``: for each batch, predict, then update.

    ``model``: a torchao / Brevitas / NNCF quantized model (its backend is detected). ``stream``: an
    iterable of batches (tensors, ``(x, y)`` pairs, or objects with ``.x``/``.y``/``.domain``);
    ``None`` prepares the adaptation without running it (call ``.step(x)`` / ``.run(stream)``).
    ``method``: a name (``"tent"``, ``"norm"``, ``"source"``, or any installed plugin's) or a config
    object; by default Tent where gradients flow, the forward-only ZOA where they cannot.
    ``inplace=False`` (the default) adapts a copy: the caller's model is left untouched.

    A reset policy, for every method: the run puts the model and the method back at their start
    (as :meth:`Adaptation.reset` does, but keeping the predictions and ``errors()`` so far)

    * ``reset_on_shift=True``: before each batch whose ``domain`` differs from the previous
      batch's (reset-each-shift: every domain adapted from the source model). ``None`` (the
      default): as the stream says, through its ``reset_on_shift`` attribute: a stream of
      :func:`qtta_plugins.data.make_stream` ``("reset", ...)`` says ``True``, others ``False``;
    * ``reset_every=N``: before every ``N``-th batch since the last start (the periodic reset of
      RDumb, Press et al., NeurIPS 2023: on long streams it matches many continual methods;
      ``adapt(qmodel, stream, "tent", reset_every=100)`` is RDumb's baseline with Tent).

    Both may be given. ``run.restarts`` lists the batches before which the run restarted. A bad
    value raises ``ValueError`` before anything is copied or changed.

    ``guard=True`` (or a :class:`~qtta_plugins.guard.GuardConfig`, or a dict of its fields) adds a
    collapse guard, for any method: when the diversity of the last ``window`` predicted classes
    falls below ``drop`` times the best the run reached, the run restarts before the next batch,
    as the reset policy does, and ``run.guard_restarts`` lists it (:mod:`qtta_plugins.guard`,
    docs/guard.md). Off by default.

    Small batches: a method that normalises with, or compares, the statistics of the test batch
    (``norm``, ``tent``, ``eata``, ``sar``, ``cotta`` on batch-norm models; ``zoa``, ``foa`` on
    any) refuses a batch smaller than it needs (one image) with
    :class:`~qtta_plugins.errors.SmallBatchError`, changing nothing. ``window=N`` (or a
    :class:`~qtta_plugins.window.WindowConfig` with ``update_every=k``) wraps any method in a
    sliding window of the last ``N`` inputs: each sample is predicted at once (batch norms see the
    window), and the method adapts on the window each time it has turned over (or every ``k``
    samples). Predictions and ``errors()`` stay per sample, in stream order; ``reset``, ``save`` /
    ``load`` carry the window. A window that is not an int >= 1, shorter than the method needs,
    or longer than a stream that declares its length (a list of batches, a
    :class:`~qtta_plugins.data.ContinualStream`) raises ``ValueError`` before anything is copied
    or changed. ``run.method.inner`` is the wrapped method.

    If the stream (or a step) raises partway, the error carries the run so far as
    ``err.adaptation``: its predictions, ``errors()`` and state up to the last good batch (the
    failing step changed nothing). ``err.adaptation.run(rest)`` continues; after an in-place run,
    ``err.adaptation.restore_model()`` puts the model back as it was before ``adapt``.

    The process's global random number generators are left alone: methods draw from their own,
    seeded with ``config.seed``.

    Returns the :class:`Adaptation`: ``.predictions`` in stream order, ``.model`` the adapted model
    (same backend kind), ``.errors()`` per domain when labels were given, ``.reset()``,
    ``.save(path)`` / ``.load(path)``.
    """
    check_reset_policy(reset_every, reset_on_shift)
    guard_config = as_guard(guard)
    window_config = as_window(window)
    check_window_fits(window_config, stream)
    if not inplace:
        quant_view(model)  # fail on an unknown model before paying for a copy
        model = _copy_model(model)
    view = quant_view(model)
    config = _resolve_config(method, view, options)
    before = view.snapshot()
    try:
        # the adapter's corrections for adaptation (e.g. NNCF activation ranges for batch
        # statistics) belong to the run's starting point: its reset goes back to them
        messages = view.prepare_adaptation() if config.method != "source" else []
        # no global reseeding: methods draw from their own generators, seeded with config.seed
        tta = _plugin_manager().hook.qtta_adapt(view=view, config=config)
        if tta is not None and window_config is not None:
            tta = Windowed(tta, window_config)  # refuses a window shorter than the method needs
    except BaseException:
        view.restore(before)
        raise
    for message in messages:
        warnings.warn(message, stacklevel=2)
    if tta is None:  # pragma: no cover - declared in qtta_methods but qtta_adapt returned None
        raise UnknownMethodError(f"the plugin declaring {config.method!r} did not build it")
    run = Adaptation(
        view,
        tta,
        config,
        before=before if inplace else None,
        reset_every=reset_every,
        reset_on_shift=reset_on_shift,
        guard=guard_config,
    )
    if stream is not None:
        try:
            run.run(stream, progress=progress)
        except BaseException as exc:
            _attach_partial_run(exc, run, inplace)
            raise
    return run


def _attach_partial_run(exc: BaseException, run: Adaptation, inplace: bool) -> None:
    """Put the run so far on ``exc`` (``exc.adaptation``), with a note that says so: a stream that
    fails partway must not lose the predictions made and the state reached."""
    try:
        exc.adaptation = run  # type: ignore[attr-defined]
    except (AttributeError, TypeError):  # pragma: no cover - an exception type without __dict__
        return
    restore = (
        "; err.adaptation.restore_model() puts your in-place model back as it was before adapt"
        if inplace
        else "; your model was not changed (adapt worked on a copy)"
    )
    note = (
        f"qtta_plugins.adapt stopped after {run.batches} batch(es) of the stream: the run so far "
        "(predictions, errors(), state; .run(rest) continues it) is err.adaptation" + restore
    )
    if hasattr(exc, "add_note"):  # Python >= 3.11; the attribute is there either way
        exc.add_note(note)


def reconstruct(
    qmodel: torch.nn.Module,
    fp_model: torch.nn.Module,
    calib: Iterable[torch.Tensor] | torch.Tensor,
    method: str | ReconstructConfig = "ttaq",
    *,
    inplace: bool = False,
    **options: Any,
) -> torch.nn.Module:
    """PTQ reconstruction of ``qmodel`` against the float model it was quantized from.

    ``method``: ``"ttaq"`` (default: QDrop + PEM + PCR + L_logits), ``"qdrop"``, ``"brecq"``, any
    installed plugin's, or a config object; ``options`` go to the method's config (e.g.
    ``iters=500``). ``calib``: clean calibration images: batches (tensors or ``(x, y)`` pairs, a
    ``DataLoader``) or one tensor (256-1024 images). Returns the model, still of its backend's
    kind, with the learned rounding and step sizes in the backend's own state.
    ``inplace=False`` (the default) works on a copy; on an error, an in-place model is put back as
    it was.

    ``calib`` is read once, lazily: a method whose config says how many images it uses
    (``calib_images``: ``brecq`` / ``qdrop`` / ``ttaq`` use the first 1024, BRECQ's and QDrop's
    ImageNet setting) gets those as one tensor, and nothing past them (and past the 512 the
    source statistics are measured on) is read, so a shuffled loader over a training set is
    fine; in-memory data with more images than that is cut, with a warning. Any other method gets
    every batch, as a list.
    """
    if isinstance(method, ReconstructConfig):
        if options:
            raise TypeError("pass options inside the config object, or a method name plus options")
        config = method
    else:
        methods = available_methods("reconstruct")
        if method not in methods:
            raise UnknownMethodError(
                f"no installed plugin provides reconstruction method {method!r}; "
                f"available: {', '.join(sorted(methods)) or 'none yet'}"
            )
        config = methods[method].config_cls(method=method, **options)
    if not isinstance(fp_model, torch.nn.Module):
        raise TypeError(
            f"fp_model must be the float torch.nn.Module, got {type(fp_model).__name__}"
        )
    quant_view(qmodel)  # fail on an unknown model before paying for a copy
    # read once, and only what is used: the method reads it, then the source statistics
    calib = _reconstruction_data(calib, config)
    if not inplace:
        qmodel = _copy_model(qmodel)
    view = quant_view(qmodel)
    snapshot = view.snapshot()
    stats = kept_source_statistics(qmodel)
    try:  # no global reseeding: methods draw from their own generators, seeded with config.seed
        result = _plugin_manager().hook.qtta_reconstruct(
            qmodel=qmodel, fp_model=fp_model, calib=calib, config=config
        )
        if result is not None and stats is not None:
            # the statistics quantize kept describe the model before reconstruction
            measure_source_statistics(result, calibration_batches(calib, "reconstruction"))
    except BaseException:
        view.restore(snapshot)
        keep_source_statistics(qmodel, stats)
        raise
    if result is None:
        raise UnknownMethodError(
            f"no installed plugin provides reconstruction method {config.method!r}"
        )
    return result


def _reconstruction_data(
    calib: Iterable[Any] | torch.Tensor, config: ReconstructConfig
) -> list[torch.Tensor] | torch.Tensor:
    """``calib`` read once for :func:`reconstruct`: its method reads it, then the source
    statistics are measured on its first :data:`~qtta_plugins.view.SOURCE_SAMPLE_SIZE` images.

    A config with ``calib_images`` (the block-wise reconstructions: they draw mini-batches at
    random from the whole set, so they hold it) gets one tensor of the first
    ``max(calib_images, SOURCE_SAMPLE_SIZE)`` images, and the batches it was made of are let go:
    one copy in memory (none when ``calib`` is one tensor, which is sliced). Without it, the list
    of every batch (a plugin that did not say what it uses may use everything)."""
    limit = getattr(config, "calib_images", None)
    if limit is None:
        return calibration_batches(calib, "reconstruction")
    wanted = max(int(limit), SOURCE_SAMPLE_SIZE)
    if isinstance(calib, torch.Tensor | Sequence):
        # in memory, so counted for free: a cut the caller may not expect is said
        given = sum(int(b.shape[0]) for b in calibration_batches(calib, "reconstruction") if b.ndim)
        if given > limit:
            warnings.warn(
                f"{config.method} reconstruction uses the first {limit} of the {given} "
                f"calibration images ({type(config).__name__}.calib_images)",
                stacklevel=3,
            )
    return calibration_images(calib, "reconstruction", wanted)


def select_subnet(
    bank: Any,
    budget: dict[str, float] | None = None,
    *,
    backend: str | None = None,
    **limits: float,
) -> torch.nn.Module:
    """RTF-Q: the most accurate subnet of ``bank`` within ``budget`` (``macs``, ``bitops``, ``bytes``),
    as a standalone model of ``backend`` (default: torchao)."""
    budget = {**(budget or {}), **limits}
    unknown = set(budget) - {"macs", "bitops", "bytes"}
    if unknown:
        raise ValueError(f"unknown budget keys {sorted(unknown)}; use macs, bitops and/or bytes")
    if backend is not None and backend not in available_backends():
        raise UnknownBackendError(
            f"unknown backend {backend!r}; installed adapters: "
            f"{', '.join(available_backends()) or 'none'}"
        )
    result = _plugin_manager().hook.qtta_select_subnet(bank=bank, budget=budget, backend=backend)
    if result is None:
        providers = ", ".join(sorted(available_methods("select_subnet"))) or "none yet"
        raise UnknownMethodError(
            f"no installed plugin provides subnet selection for a bank of type {type(bank).__name__} "
            f"(installed select_subnet methods: {providers})"
        )
    return result

"""Feature statistics and the output shift, shared by the forward-only methods (``zoa``, ``foa``).

Both methods look at the model through the same window: per-channel statistics of intermediate
features, compared with the same statistics of the quantized model on clean source data, and an
additive shift of the last layer's input that moves its mean back to the source mean (FOA's
"back-to-source activation shifting"). Features are read at the inputs of quantized layers, through
:meth:`~qtta_plugins.view.QuantView.layer_input_module`, so this works on every backend, including
integer graphs that cannot backpropagate.

It sits in the core, not in ``methods/``, because :func:`qtta_plugins.quantize` and
:func:`qtta_plugins.reconstruct` measure these statistics once, for every method that needs them
(ZOA, FOA, EATA's source batches), and the core imports no method module. Over 500 lines: the
recorder, the output shift and the source statistics are one mechanism (the statistics are the
recorder's, on clean data), read together.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .source import (
    SOURCE_BATCH_SIZE,
    FeatureStatistics,
    SourceStatistics,
    first_inputs,
    keep_source_statistics,
    kept_source_statistics,
    remember_source_sample,
    source_sample,
    state_fingerprint,
)
from .view import NormLayer, QuantLayer, QuantView, copy_model, fake_quantize, model_device


@dataclass
class ChannelStats:
    """Per-channel mean and standard deviation of a feature over the batch."""

    mean: torch.Tensor
    std: torch.Tensor


def pooled(x: torch.Tensor) -> torch.Tensor:
    """A feature as ``(N, C)``: conv maps averaged over space, token sequences over tokens."""
    if x.ndim == 4:
        return x.mean((2, 3))
    if x.ndim == 3:
        return x.mean(1)
    if x.ndim == 2:
        return x
    return x.reshape(x.shape[0], -1)


def channel_stats(x: torch.Tensor, *, unbiased: bool = False) -> ChannelStats:
    """Mean and std over the batch of a feature already pooled to ``(N, C)``."""
    return ChannelStats(
        x.mean(0), x.std(0, unbiased=unbiased) if x.shape[0] > 1 else x.new_zeros(x.shape[1])
    )


def map_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and variance over every position of a feature map (for the detector)."""
    if x.ndim == 4:
        dims: tuple[int, ...] = (0, 2, 3)
    elif x.ndim == 3:
        dims = (0, 1)
    else:
        dims = (0,)
    # E[x^2] - E[x]^2 rather than torch.var_mean: on CPU, var_mean over (0, 2, 3) of a
    # (64, 32, 28, 28) map takes ~14x as long (measured), and this runs on every batch.
    mean = x.mean(dims)
    var = (x * x).mean(dims) - mean * mean
    return mean, var.clamp_min(0)


def feature_layers(view: QuantView, which: str = "blocks") -> list[QuantLayer]:
    """The layers whose inputs are the features: ``"blocks"`` (default) the first layer of every
    block but the first - the block boundaries, i.e. the stage outputs of a CNN and the residual
    stream between transformer blocks - plus the last layer (the pooled feature the head sees);
    ``"all"``: every layer but the first (whose input is the image)."""
    layers = view.layers()
    if len(layers) < 2:
        raise ValueError(f"this {view.backend} model has fewer than two quantized layers")
    if which == "all":
        chosen = layers[1:]
    elif which == "blocks":
        firsts = {b.layers[0].name for b in view.blocks()[1:] if b.layers}
        chosen = [layer for layer in layers[1:] if layer.name in firsts]
        if layers[-1] not in chosen:
            chosen.append(layers[-1])
    else:
        raise ValueError(f"feature layers must be 'blocks' or 'all', not {which!r}")
    return chosen


class FeatureRecorder:
    """Forward pre-hooks at the inputs of ``layers``: record their statistics, shift the last one.

    ``record``: whether a forward pass records, per tap, the feature pooled to ``(N, C)``
    (:attr:`features`; :func:`pooled`, or with ``token=0`` the class token of a token sequence,
    FOA's features) and its :class:`ChannelStats` over the batch (``unbiased`` std or not). The
    last layer's input is shifted by
    ``shift_target - feature_ema`` when ``shift_target`` is set (recording sees the unshifted
    feature). ``detector``: a module whose input's per-channel map statistics are recorded for the
    domain-change detector. Layers sharing one input (a residual block's conv and shortcut) are
    tapped once.

    The hooks are on the model only inside :meth:`attached` (a method's step): between steps the
    model carries none, and the output shift lives in the last layer's own bias,
    ``bias_0 + W_q @ shift`` (``W_q`` the weight as the layer computes with it), so the adapted
    model is the backend's own model, exported by its own path. The shift then acts after the
    layer's input quantizer rather than before it: the same function up to that quantizer's
    rounding. A last layer without a bias the view can write (or a conv) keeps the shift on its
    input, in a hook that stays between steps (:attr:`persistent_hooks`).
    """

    def __init__(
        self,
        view: QuantView,
        layers: Sequence[QuantLayer],
        detector: nn.Module | None = None,
        *,
        token: int | None = None,
    ) -> None:
        modules: dict[int, nn.Module] = {}
        for layer in layers:
            module = view.layer_input_module(layer)
            modules.setdefault(id(module), module)
        self.modules = list(modules.values())
        self.device = model_device(view.model)
        self.detector = detector
        self.record = True
        # None: token sequences averaged over tokens (ZOA's); 0: their class token, with the
        # unbiased std over the batch (FOA's, as its authors' code takes them)
        self.token = token
        self.stats: list[ChannelStats | None] = [None] * len(self.modules)
        self.features: list[torch.Tensor | None] = [None] * len(self.modules)
        self.sequences = [False] * len(self.modules)  # which taps have seen token sequences
        self.detector_stats: tuple[torch.Tensor, torch.Tensor] | None = None
        # The output shift: the last feature is moved by (source mean - EMA of its batch means).
        self.shift_target: torch.Tensor | None = None  # None: no shift
        self.shift_decay = 0.9
        self.shift_enabled = True
        self.update_ema = True  # False on extra passes over the same batch
        self.feature_ema: torch.Tensor | None = None
        self.last_feature_mean: torch.Tensor | None = None
        self.applied_shift: torch.Tensor | None = None
        self.head = _HeadBias.of(view, layers[-1]) if layers else None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._input_shift_handle: torch.utils.hooks.RemovableHandle | None = None
        self._depth = 0
        # token positions the statistics leave out (FOA's prompt tokens: the source statistics
        # were measured without them); None: every token
        self.skip_tokens: slice | None = None

    # --- hooks: on the model only during a step ----------------------------------------------
    @contextlib.contextmanager
    def attached(self) -> Iterator[FeatureRecorder]:
        """The recording hooks on the model for the duration of the block (re-entrant)."""
        if self._depth == 0:
            self._attach()
        self._depth += 1
        try:
            yield self
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._detach()

    def _attach(self) -> None:
        self._drop_input_shift()  # the step's hook on the last input does its work
        self._handles = [
            m.register_forward_pre_hook(self._hook_for(i)) for i, m in enumerate(self.modules)
        ]
        if self.detector is not None:
            self._handles.append(self.detector.register_forward_pre_hook(self._detector_hook))

    def _detach(self) -> None:
        self._remove_hooks()
        if self.head is None and self.applied_shift is not None and self.modules:
            # no bias to hold the shift: the model keeps it on the last layer's input
            self._input_shift_handle = self.modules[-1].register_forward_pre_hook(
                self._between_steps_shift
            )

    def _remove_hooks(self) -> None:
        """Every hook this recorder has on the model off (the step's and the input shift)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._drop_input_shift()

    def _drop_input_shift(self) -> None:
        if self._input_shift_handle is not None:
            self._input_shift_handle.remove()
            self._input_shift_handle = None

    @property
    def persistent_hooks(self) -> int:
        """How many hooks this recorder leaves on the model between steps (0 or 1)."""
        return int(self._input_shift_handle is not None)

    def _between_steps_shift(self, module: nn.Module, args: tuple) -> tuple | None:
        return self._shifted(args, self.applied_shift)

    @staticmethod
    def _shifted(args: tuple, shift: torch.Tensor | None) -> tuple | None:
        if shift is None:
            return None
        x = args[0]
        # Broadcast over everything but the channel axis: (C,1,1) for maps, (C,) for tokens / vectors.
        return (x + shift.view(-1, *([1] * (x.ndim - 2))) if x.ndim == 4 else x + shift, *args[1:])

    def _without_skipped(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.skip_tokens
        if skip is None or x.ndim != 3:
            return x
        return torch.cat([x[:, : skip.start], x[:, skip.stop :]], 1)

    def _detector_hook(self, module: nn.Module, args: tuple) -> None:
        if self.record and self.update_ema:  # once per batch: pass 1 only
            self.detector_stats = map_stats(args[0])

    def _hook_for(self, index: int):
        last = len(self.modules) - 1

        def hook(module: nn.Module, args: tuple) -> tuple | None:
            x = args[0]
            if self.record:
                if self.token is None:
                    f = pooled(self._without_skipped(x))
                else:
                    f = x[:, self.token] if x.ndim == 3 else pooled(x)
                self.features[index] = f
                self.sequences[index] = x.ndim == 3
                self.stats[index] = channel_stats(f, unbiased=self.token is not None)
            if index != last or self.shift_target is None:
                return None
            if not self.shift_enabled:
                if self.head is not None:
                    self.head.write(None)
                return None
            if self.update_ema:
                mean = pooled(x).mean(0)
                self.last_feature_mean = mean
                m = self.shift_decay
                self.feature_ema = (
                    mean if self.feature_ema is None else m * self.feature_ema + (1 - m) * mean
                )
                self.applied_shift = self.shift_target - self.feature_ema
            # extra passes over the same batch reuse pass 1's shift
            if self.head is not None:
                self.head.write(self.applied_shift)
                return None
            return self._shifted(args, self.applied_shift)

        return hook

    def apply_shift(self) -> None:
        """Put the current shift (``applied_shift``; none: the original bias) on the model."""
        if self.head is not None:
            self.head.write(self.applied_shift)

    def reset_shift(self) -> None:
        """Forget the output shift's running mean (a fresh start, or a reset)."""
        self.feature_ema = None
        self.applied_shift = None
        self.apply_shift()
        self._drop_input_shift()

    def shift_state(self) -> dict[str, torch.Tensor | None]:
        """The output shift's running state, for a method's ``state_dict``."""
        return {
            "feature_ema": _clone(self.feature_ema),
            "applied_shift": _clone(self.applied_shift),
        }

    def load_shift_state(self, state: dict) -> None:
        self.feature_ema = _clone(state["feature_ema"], self.device)
        self.applied_shift = _clone(state.get("applied_shift"), self.device)
        self.apply_shift()
        if self._depth == 0:
            self._detach()  # re-places (or drops) the between-steps input shift

    def clear(self) -> None:
        self.stats = [None] * len(self.modules)
        self.features = [None] * len(self.modules)
        self.detector_stats = None

    @contextlib.contextmanager
    def input_shift(self, shift: torch.Tensor) -> Iterator[None]:
        """The last layer's input shifted by ``shift`` for the block (a model whose last layer
        has no bias to hold it)."""
        handle = self.modules[-1].register_forward_pre_hook(
            lambda module, args: self._shifted(args, shift)
        )
        try:
            yield
        finally:
            handle.remove()

    def collected(self) -> list[ChannelStats]:
        missing = [i for i, s in enumerate(self.stats) if s is None]
        if missing:
            raise RuntimeError(f"feature tap(s) {missing} saw no input in this forward pass")
        return self.stats  # type: ignore[return-value]

    def tensors(self) -> list[torch.Tensor]:
        """The model tensors the shift writes (the last layer's bias), for the core's backups."""
        return [self.head.bias] if self.head is not None else []

    def remove(self) -> None:
        """Take every hook off and put the original bias back."""
        self._remove_hooks()
        if self.head is not None:
            self.head.write(None)


class _HeadBias:
    """The last layer's bias as the place the output shift lives: ``bias = bias_0 + W_q @ shift``."""

    def __init__(self, bias: torch.Tensor, weight: torch.Tensor) -> None:
        self.bias = bias
        self.base = bias.detach().clone()
        self.weight = weight  # (out, in), as the layer computes with it

    @classmethod
    def of(cls, view: QuantView, layer: QuantLayer) -> _HeadBias | None:
        if layer.kind != "linear":
            return None  # a conv's shift through the bias is not exact at padded borders
        bias = view.layer_bias(layer)
        if bias is None:
            return None
        weight = view.weight_quantizer_input(layer)
        handle = layer.weight_quantizer
        if handle is not None and handle.enabled:
            weight = fake_quantize(weight, handle.grid())
        if weight.ndim != 2 or bias.shape != weight.shape[:1]:
            return None
        return cls(bias, weight.detach().clone())

    def write(self, shift: torch.Tensor | None) -> None:
        with torch.no_grad():
            if shift is None:
                self.bias.copy_(self.base)
            else:
                self.bias.copy_(self.base + self.weight.to(shift.dtype) @ shift)


def _clone(t: torch.Tensor | None, device: torch.device | None = None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(device or t.device, copy=True)


def source_batches(view: QuantView, data: object, batch_size: int) -> list[torch.Tensor] | None:
    """Clean source inputs as batches: ``data`` (a tensor, or an iterable of tensors / ``(x, y)``
    pairs), or else the calibration sample :func:`qtta_plugins.quantize` kept on the model
    (``keep_calibration_sample=True``); ``None`` without either (see :func:`kept_statistics`)."""
    if data is None:
        data = source_sample(view.model)
        if data is None:
            return None
    if isinstance(data, torch.Tensor):
        return [data[i : i + batch_size] for i in range(0, data.shape[0], batch_size)]
    if isinstance(data, Iterable):
        out = []
        for item in data:
            x = item[0] if isinstance(item, tuple | list) else getattr(item, "x", item)
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                raise TypeError("source_data must hold floating-point input tensors")
            out.append(x)
        return out
    raise TypeError(
        f"source_data must be a tensor or an iterable of tensors, not {type(data).__name__}"
    )


@torch.no_grad()
def source_statistics(
    view: QuantView, recorder: FeatureRecorder, batches: list[torch.Tensor]
) -> tuple[list[ChannelStats], tuple[torch.Tensor, torch.Tensor] | None]:
    """Feature statistics of the quantized model on clean batches, in the mode it will adapt in,
    and the detector feature's per-channel mean and variance.

    The features' statistics are estimated as the test batches' are compared with them: averaged
    over batches (ZOA's; with batch norms on test-batch statistics the features depend on the
    batch); with a class-token recorder (``recorder.token`` set, FOA's), over all images at once
    with the unbiased std, as the authors' code takes them."""
    sums: list[ChannelStats] | None = None
    det_mean = det_var = None
    # over all images: per tap, the sum of the features, of their squares, and the count
    moments: list[list[torch.Tensor]] | None = None
    count = 0
    was_recording, shift = recorder.record, recorder.shift_enabled
    recorder.record, recorder.shift_enabled = True, False
    try:
        for x in batches:
            recorder.clear()
            with recorder.attached():
                view.model(x.to(recorder.device))  # the kept sample lives on the CPU
            stats = recorder.collected()
            if recorder.token is not None:
                feats = [f.double() for f in recorder.features]  # type: ignore[union-attr]
                if moments is None:
                    moments = [[f.sum(0), f.square().sum(0)] for f in feats]
                else:
                    for acc, f in zip(moments, feats, strict=True):
                        acc[0] += f.sum(0)
                        acc[1] += f.square().sum(0)
                count += feats[0].shape[0]
            if sums is None:
                sums = [ChannelStats(s.mean.clone(), s.std.clone()) for s in stats]
                if recorder.detector_stats is not None:
                    det_mean, det_var = (t.clone() for t in recorder.detector_stats)
            else:
                for acc, s in zip(sums, stats, strict=True):
                    acc.mean += s.mean
                    acc.std += s.std
                if det_mean is not None and recorder.detector_stats is not None:
                    det_mean += recorder.detector_stats[0]
                    det_var += recorder.detector_stats[1]  # type: ignore[operator]
    finally:
        recorder.record, recorder.shift_enabled = was_recording, shift
        recorder.clear()
    n = len(batches)
    assert sums is not None
    detector = None if det_mean is None else (det_mean / n, det_var / n)  # type: ignore[operator]
    if moments is not None:
        return [
            _over_images(s, q, count, a.mean.dtype) for (s, q), a in zip(moments, sums, strict=True)
        ], detector
    return [ChannelStats(s.mean / n, s.std / n) for s in sums], detector


def _over_images(
    total: torch.Tensor, squares: torch.Tensor, count: int, dtype: torch.dtype
) -> ChannelStats:
    """Mean and unbiased std of ``count`` features from their sum and sum of squares."""
    mean = total / count
    var = (squares - count * mean.square()).clamp_min(0) / max(count - 1, 1)
    return ChannelStats(mean.to(dtype), var.sqrt().to(dtype))


def no_source_data_warning(method: str, reason: str = "") -> None:
    warnings.warn(
        f"{method}: no clean source data{reason or ''} (pass source_data=clean_batches, or "
        "quantize with qtta_plugins.quantize, which keeps source statistics; "
        "keep_calibration_sample=True keeps the images, for a model you will convert or change "
        "before adapting): the statistics-alignment term and the output shift are off",
        stacklevel=4,
    )


def detector_norm(view: QuantView) -> NormLayer | None:
    """The norm whose input the domain-change detector watches: the first with statistics (what
    it normalises still carries the shift), else the first norm."""
    norms = view.norms()
    return next((n for n in norms if n.has_statistics), norms[0] if norms else None)


def measure_source_statistics(
    model: nn.Module, batches: Iterable[torch.Tensor], *, keep_sample: bool = False
) -> None:
    """Measure what the forward-only methods and the adapter need of clean source data on
    ``model`` (its first :data:`~qtta_plugins.view.SOURCE_SAMPLE_SIZE` inputs of ``batches``) and
    keep it on the model as :class:`~qtta_plugins.view.SourceStatistics`, replacing any kept
    before; ``keep_sample=True`` keeps the inputs themselves instead (methods then measure on the
    model as it is when they start). The model is not changed: features are measured on a copy,
    prepared for adaptation the way :func:`qtta_plugins.adapt` prepares one.

    One failure is expected and only warned about: a model that cannot be deep-copied (an
    object in it that ``copy.deepcopy`` refuses), or whose copy its adapter no longer
    recognises. The adapter's statistics are kept, the feature statistics are not, and ``zoa`` /
    ``foa`` then need clean data at adapt time. Anything else raises: a failure to measure on a
    copy that exists is a fault, and hiding it would quietly cost those methods their alignment
    and output shift."""
    import copy

    from . import quant_view  # the adapters' views; qtta_plugins imports this module
    from .errors import UnknownBackendError

    keep_source_statistics(model, None)
    sample = first_inputs(batches)
    if sample is None:
        return
    if keep_sample:
        remember_source_sample(model, [sample])
        return
    batches = [sample[i : i + SOURCE_BATCH_SIZE] for i in range(0, len(sample), SOURCE_BATCH_SIZE)]
    view = quant_view(model)
    stats = SourceStatistics(
        images=len(sample),
        batch_size=SOURCE_BATCH_SIZE,
        input_shape=tuple(sample.shape[1:]),
        fingerprint=state_fingerprint(view),
        adapter=view.measure_source(batches),
    )
    keep_source_statistics(model, stats)  # the copy's prepare_adaptation reads stats.adapter
    try:
        # the features are measured on a copy: preparing and tapping it must not change `model`
        work = quant_view(copy_model(model))
    except (RuntimeError, TypeError, copy.Error, UnknownBackendError) as exc:
        # what deepcopy raises for an object it cannot copy (a lock, a non-leaf tensor, ...),
        # and a copy no adapter recognises: the model is fine, there is just no copy to measure on
        warnings.warn(
            f"quantize kept no source feature statistics on this model: it could not copy the "
            f"model to measure them on ({type(exc).__name__}: {exc}). 'zoa' and 'foa' will run "
            "without feature alignment and output shift unless adapt is given "
            "source_data=clean_batches (or quantize keeps the images: keep_calibration_sample=True)",
            stacklevel=3,
        )
        return
    work.prepare_adaptation()
    _measure_features(work, batches, stats)


def _measure_features(
    work: QuantView, batches: list[torch.Tensor], stats: SourceStatistics
) -> None:
    """Add the feature statistics of ``work``'s model as it is (a copy: it gets tapped and its
    norm mode changes) to ``stats.measured``."""
    layers = work.layers()
    if len(layers) < 2:
        return
    measured = FeatureStatistics(state_fingerprint(work))
    first = detector_norm(work)
    recorder = FeatureRecorder(
        work, layers[1:], work.norm_input_module(first) if first is not None else None
    )
    names = _module_names(work, layers[1:], recorder)
    has_bn = any(n.has_statistics for n in work.norms())
    # the mode zoa and foa adapt in (batch_stats=True, their default): one pass over the sample
    for mode in ("batch",) if has_bn else ("source",):
        work.set_norm_mode(mode)
        features, detector = source_statistics(work, recorder, batches)
        measured.features[mode] = _as_kept(names, features)
        if first is not None and detector is not None:
            measured.detector[mode] = {first.name: (detector[0].cpu(), detector[1].cpu())}
        if any(recorder.sequences):  # token sequences: FOA's class-token statistics too
            tokens = FeatureRecorder(work, layers[1:], token=0)
            measured.class_token[mode] = _as_kept(
                names, source_statistics(work, tokens, batches)[0]
            )
            tokens.remove()
    recorder.remove()
    if not has_bn:  # without batch-norm statistics both modes normalise alike
        for kept in (measured.features, measured.class_token, measured.detector):
            if "source" in kept:
                kept["batch"] = kept["source"]
    stats.measured.append(measured)


def _as_kept(
    names: Sequence[str], features: Sequence[ChannelStats]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        name: (f.mean.detach().cpu(), f.std.detach().cpu())
        for name, f in zip(names, features, strict=True)
    }


def _module_names(
    view: QuantView, layers: Sequence[QuantLayer], recorder: FeatureRecorder
) -> list[str]:
    """For each of ``recorder``'s tapped modules, the name of the first of ``layers`` it feeds."""
    by_module: dict[int, str] = {}
    for layer in layers:
        by_module.setdefault(id(view.layer_input_module(layer)), layer.name)
    return [by_module[id(m)] for m in recorder.modules]


def kept_statistics(
    view: QuantView,
    recorder: FeatureRecorder,
    layers: Sequence[QuantLayer],
    detector: NormLayer | None,
    batch_size: int,
    method: str,
) -> tuple[list[ChannelStats], tuple[torch.Tensor, torch.Tensor] | None] | None:
    """The source statistics for ``recorder`` (features at ``layers``' inputs, and at
    ``detector``'s input if given) that :func:`qtta_plugins.quantize` kept on the model, in the
    view's current norm mode, on the recorder's device. ``None``, with a warning that says why
    and what to pass, when none were kept or the model has changed since they were measured.
    Raises ``ValueError`` when ``batch_size`` is not the one they were measured in."""
    stats = kept_source_statistics(view.model)
    if stats is None:
        no_source_data_warning(method)
        return None
    if not stats.measured:
        no_source_data_warning(
            method, ": qtta_plugins.quantize could not measure source statistics on this model"
        )
        return None
    if batch_size != stats.batch_size:
        raise ValueError(
            f"{method}: source_batch_size={batch_size}, but the source statistics "
            f"qtta_plugins.quantize kept were measured in batches of {stats.batch_size} (batch "
            "statistics depend on the batch size): pass source_data=clean_batches, or quantize "
            "with keep_calibration_sample=True"
        )
    measured = stats.for_view(view)
    if measured is None:
        no_source_data_warning(
            method,
            ": the source statistics qtta_plugins.quantize kept describe the model it returned, "
            "and this one differs from it (converted, reconstructed or adapted in place, edited)",
        )
        return None
    if view.norm_mode not in measured.features:
        no_source_data_warning(
            method,
            f": the source statistics qtta_plugins.quantize kept were measured with batch norms "
            f"on test-batch statistics, and this run normalises in mode {view.norm_mode!r} "
            "(batch_stats=False)",
        )
        return None
    names = _module_names(view, layers, recorder)
    if recorder.token is not None:
        features = measured.class_token.get(view.norm_mode, {})
        if not features:
            no_source_data_warning(
                method,
                ": qtta_plugins.quantize kept no class-token statistics (it keeps them for models "
                "whose layers see token sequences)",
            )
            return None
    else:
        features = measured.features[view.norm_mode]
    detectors = measured.detector.get(view.norm_mode, {})
    if any(name not in features for name in names) or (
        detector is not None and detector.name not in detectors
    ):
        no_source_data_warning(
            method, ": the source statistics qtta_plugins.quantize kept miss layers of this model"
        )
        return None
    device = recorder.device
    found = [
        ChannelStats(
            features[name][0].to(device, copy=True), features[name][1].to(device, copy=True)
        )
        for name in names
    ]
    det = None
    if detector is not None:
        mean, var = detectors[detector.name]
        det = (mean.to(device, copy=True), var.to(device, copy=True))
    return found, det


def source_input_shape(view: QuantView) -> tuple[int, ...] | None:
    """The shape of one input, as the calibration data quantize saw had it (``None`` if unknown)."""
    sample = source_sample(view.model)
    if sample is not None:
        return tuple(sample.shape[1:])
    stats = kept_source_statistics(view.model)
    return stats.input_shape if stats is not None else None

"""The uniform view of a quantized model (docs/design.md, "The uniform view").

Methods never touch backend classes: an adapter wraps a backend's model in a :class:`QuantView`, and
methods read and change the model only through it. The view wraps the model object itself; copying,
when the user did not ask for in-place work, is the caller's job (see :func:`qtta_plugins.adapt`).
"""

from __future__ import annotations

import copy
import hashlib
import io
import math
import re
import warnings
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from .fakequant import fake_quant
from .fakequant import (
    round_ste as round_ste,
)  # re-exported: adapters write their own quantizers with it
from .prefix import PrefixCache, prefix_cache

NormMode = Literal["source", "batch"]


@dataclass
class Grid:
    """A quantizer's integer grid, backend-neutral: the quantizer maps ``x`` to
    ``(clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale``
    (:func:`fake_quantize`).

    ``scale`` is the step size, shape ``()`` per-tensor or ``(C,)`` per-channel, running along
    axis ``ch_axis`` of the quantized tensor (``None`` per-tensor); ``zero_point`` has the shape of
    ``scale`` and integer values (float dtype). Tensors are detached copies: changing them changes
    nothing in the model (use :meth:`QuantizerHandle.set_grid`).
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int
    ch_axis: int | None

    def __post_init__(self) -> None:
        if self.scale.shape != self.zero_point.shape:
            raise ValueError(
                f"scale {tuple(self.scale.shape)} and zero_point {tuple(self.zero_point.shape)} "
                "must have the same shape"
            )
        if self.scale.ndim > 1 or (self.scale.ndim == 1) != (self.ch_axis is not None):
            raise ValueError(
                f"a grid's scale is () with ch_axis=None or (C,) with a ch_axis; got shape "
                f"{tuple(self.scale.shape)} with ch_axis={self.ch_axis}"
            )
        if self.qmin >= self.qmax:
            raise ValueError(f"empty integer range [{self.qmin}, {self.qmax}]")

    def with_values(self, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> Grid:
        """This grid with a new step size (and zero point; ``None`` keeps the current one),
        checked: same shapes, finite positive scale, integer zero point inside ``[qmin, qmax]``.
        Adapters use it to validate the arguments of :meth:`QuantizerHandle.set_grid`."""
        scale = torch.as_tensor(scale, dtype=torch.float32).detach().clone()
        if zero_point is None:
            zero_point = self.zero_point
        zero_point = torch.as_tensor(zero_point, dtype=torch.float32).detach().clone()
        for name, new in (("scale", scale), ("zero_point", zero_point)):
            if new.shape != self.scale.shape:
                raise ValueError(
                    f"{name} must have the grid's shape {tuple(self.scale.shape)}, "
                    f"got {tuple(new.shape)}"
                )
        if not (torch.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError("scale must be finite and positive")
        if not torch.equal(zero_point, zero_point.round()):
            raise ValueError("zero_point must hold integer values")
        if ((zero_point < self.qmin) | (zero_point > self.qmax)).any():
            raise ValueError(f"zero_point must lie in [{self.qmin}, {self.qmax}]")
        return Grid(scale, zero_point, self.qmin, self.qmax, self.ch_axis)

    def along(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """``t`` (shaped like ``scale``) reshaped to broadcast against a tensor of ``ndim`` dims."""
        if self.ch_axis is None or t.ndim == 0:
            return t
        shape = [1] * ndim
        shape[self.ch_axis % ndim] = -1
        return t.reshape(shape)


def fake_quantize(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``(clamp(round(x / s) + zp, qmin, qmax) - zp) * s``, ``s`` and ``zp`` broadcast along
    ``grid.ch_axis``.

    ``torch.round`` rounds half to even, as torch's, torchao's, Brevitas' and NNCF's quantizers
    do; backends that multiply by ``1 / s`` instead of dividing (torch, torchao, NNCF) can land on
    the other side of a tie for inputs within a few ulps of ``(k + 0.5) * s``, i.e. one step apart
    on a vanishing fraction of random inputs. Values already on the grid are reproduced exactly.
    No straight-through gradient: this is the reference function, not a training op.
    """
    s = grid.along(grid.scale.to(x.dtype), x.ndim)
    zp = grid.along(grid.zero_point.to(x.dtype), x.ndim)
    return fake_quant(x, s, zp, grid.qmin, grid.qmax)


class QuantizerHandle(ABC):
    """One fake-quantizer of a model, whatever the backend's class for it."""

    name: str
    role: Literal["weight", "act"]
    #: An activation quantizer that replaces its producer's output for *every* consumer (torchao
    #: pt2e and NNCF quantize a tensor once, so a residual shortcut reads the quantized value too),
    #: rather than only this layer's input (Brevitas quantizes inside the layer). Simulations of
    #: the backend's function (reconstruction) need to know which.
    shared_by_consumers: bool = False

    @property
    @abstractmethod
    def bits(self) -> int:
        """Bit-width (the integer grid has ``qmax - qmin + 1 == 2**bits`` levels, or one fewer when
        a symmetric quantizer drops the most negative level)."""

    @bits.setter
    @abstractmethod
    def bits(self, value: int) -> None: ...

    @property
    @abstractmethod
    def enabled(self) -> bool:
        """Whether fake quantization is applied (``False``: the quantizer is the identity)."""

    @enabled.setter
    @abstractmethod
    def enabled(self, value: bool) -> None: ...

    @property
    @abstractmethod
    def qrange(self) -> tuple[int, int]:
        """The integer range ``(qmin, qmax)``."""

    @property
    @abstractmethod
    def ch_axis(self) -> int | None:
        """Channel axis of per-channel parameters; ``None`` for per-tensor (or per-token)."""

    @abstractmethod
    def params(self) -> dict[str, torch.Tensor]:
        """The quantizer's parameters under the backend's own names (scale, zero_point, ...)."""

    def set_trainable(self, flag: bool = True) -> list[nn.Parameter]:
        """Make the scale parameters trainable; return them. Raise where the backend cannot."""
        raise NotImplementedError(f"{type(self).__name__} has no trainable scale on this backend")

    def grid(self) -> Grid:
        """The grid the backend's forward applies now: ``fake_quantize(x, h.grid())`` equals
        what the backend's quantizer outputs for ``x`` (with quantization enabled), up to float
        rounding and the tie cases :func:`fake_quantize` describes. A copy: see :meth:`set_grid`.

        Raises ``NotImplementedError`` where the backend has no fixed grid (a dynamic quantizer
        whose scale is computed from each input)."""
        raise NotImplementedError(f"{type(self).__name__} cannot report its grid")

    def set_grid(self, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> None:
        """Write a new step size (and zero point, where the backend has one; ``None`` keeps the
        current one) into the backend's own parameters / buffers, so that afterwards the
        backend's forward applies exactly ``Grid(scale, zero_point, *qrange, ch_axis)``
        (:meth:`grid` returns it, up to float rounding of the backend's parametrisation).

        Shapes are those of :meth:`grid`'s tensors. The integer range and the channel axis do not
        change (set :attr:`bits` first for a new range). Raises ``ValueError`` for arguments the
        grid cannot hold, and ``NotImplementedError`` where the backend cannot store the grid:
        a scale recomputed from statistics on every call, a constant of a converted graph, a
        zero point on a symmetric quantizer."""
        raise NotImplementedError(f"{type(self).__name__} cannot set its grid")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, role={self.role}, bits={self.bits})"


def bits_of(qmin: int, qmax: int) -> int:
    """Bit-width of an integer range; symmetric ranges like -7..7 are 4-bit."""
    return max(1, math.ceil(math.log2(qmax - qmin + 1)))


@dataclass
class QuantLayer:
    """A quantized compute layer (conv / linear), in forward order."""

    name: str
    kind: Literal["conv", "linear"]
    weight: torch.Tensor
    weight_quantizer: QuantizerHandle | None
    input_quantizer: QuantizerHandle | None = None
    output_quantizer: QuantizerHandle | None = None


@dataclass
class NormLayer:
    """A normalisation layer and its affine parameters.

    ``folded``: the backend folded this norm into the preceding conv, and the adapter offers a
    stand-in in its place: a per-channel affine on the conv output that is the identity as inserted,
    with the folded norm's statistics, so batch-statistics mode and affine adaptation still apply.
    """

    name: str
    kind: Literal["batch", "layer", "group"]
    weight: nn.Parameter | None
    bias: nn.Parameter | None
    running_mean: torch.Tensor | None = None
    running_var: torch.Tensor | None = None
    folded: bool = False
    #: the ``eps`` the norm adds to the variance (``None`` where the adapter does not say)
    eps: float | None = None

    def affine(self) -> list[nn.Parameter]:
        return [p for p in (self.weight, self.bias) if p is not None]

    @property
    def has_statistics(self) -> bool:
        """A batch norm with running statistics (batch-statistics mode applies to it)."""
        return self.kind == "batch" and self.running_mean is not None


@dataclass
class Block:
    """A unit of reconstruction (residual block, transformer block, stem, head)."""

    name: str
    layers: list[QuantLayer] = field(default_factory=list)


_SOURCE_SAMPLE = "_qtta_source_sample"
_SOURCE_STATS = "_qtta_source_statistics"
SOURCE_SAMPLE_SIZE = 512
#: the batch size source statistics are measured in (the methods' ``source_batch_size`` default)
SOURCE_BATCH_SIZE = 64


def first_inputs(
    batches: Iterable[torch.Tensor], n: int = SOURCE_SAMPLE_SIZE
) -> torch.Tensor | None:
    """The first ``n`` inputs of ``batches`` as one detached tensor (``None`` if there are none)."""
    kept, count = [], 0
    for x in batches:
        x = x.detach()[: n - count].clone()
        kept.append(x)
        count += x.shape[0]
        if count >= n:
            break
    return torch.cat(kept) if kept else None


def _set_meta(model: nn.Module, key: str, value: object) -> None:
    if isinstance(model, torch.fx.GraphModule):
        model.meta[key] = value  # a GraphModule's deep copy keeps .meta, not attributes
    else:
        object.__setattr__(model, key, value)


def _get_meta(model: nn.Module, key: str) -> object:
    inner = model._modules.get("_orig_mod")  # a torch.compile wrapper: the model inside
    if isinstance(inner, nn.Module):
        return _get_meta(inner, key)
    if isinstance(model, torch.fx.GraphModule):
        return model.meta.get(key)
    return model.__dict__.get(key)


def remember_source_sample(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Keep up to :data:`SOURCE_SAMPLE_SIZE` clean inputs on ``model`` (outside its state dict).

    :func:`qtta_plugins.quantize` does so only when asked (``keep_calibration_sample=True``): the
    sample follows the model through deep copies, :func:`copy_model` and every copy a user makes,
    so by default the model carries :class:`SourceStatistics` instead. With a sample, methods
    measure source statistics on the model as it is when they start (after a conversion, say).
    """
    sample = first_inputs(batches)
    if sample is not None:
        _set_meta(model, _SOURCE_SAMPLE, sample)


def source_sample(model: nn.Module) -> torch.Tensor | None:
    """The clean inputs :func:`remember_source_sample` kept on ``model`` (or its compiled wrapper)."""
    return _get_meta(model, _SOURCE_SAMPLE)  # type: ignore[return-value]


@dataclass
class FeatureStatistics:
    """Source feature statistics of one model state, the one whose :func:`state_fingerprint` is
    ``fingerprint``: ``features[mode][layer]``, the per-channel ``(mean, std)`` of the pooled
    input of each quantized layer but the first, averaged over batches, with norms in ``mode``
    (``"source"`` / ``"batch"``), as ``zoa`` compares test batches with; ``class_token[mode]
    [layer]``, for models whose layers see token sequences, the same of the class token (the
    pooled feature where a layer sees none) over all images at once, unbiased std, as ``foa``
    compares; and ``detector[mode][norm]``, the per-channel ``(mean, var)`` of what the first
    norm normalises."""

    fingerprint: str
    features: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    class_token: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(
        default_factory=dict
    )
    detector: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)


@dataclass
class SourceStatistics:
    """What :func:`qtta_plugins.quantize` keeps on a model in place of its calibration images:
    statistics measured on them, small tensors outside the state dict that follow the model through
    copies (:func:`qtta_plugins.methods.features.measure_source_statistics`).

    ``measured``: :class:`FeatureStatistics` of the model as :func:`qtta_plugins.adapt` prepares it
    (:meth:`QuantView.prepare_adaptation`), in batches of ``batch_size``, with batch norms on
    test-batch statistics (as ``zoa`` and ``foa`` run by default; a model without batch-norm
    statistics normalises alike in both modes). ``adapter``: what the adapter measured on the
    model as quantized (:func:`state_fingerprint` ``fingerprint``) for its own preparation
    (:meth:`QuantView.measure_source`). Statistics hold only for the model states they were
    measured on: a model changed since (converted, reconstructed or adapted in place, edited)
    matches none of them, and methods then need clean data again (``source_data=``, or
    ``keep_calibration_sample=True`` at quantize time).
    """

    images: int
    batch_size: int
    input_shape: tuple[int, ...]
    fingerprint: str
    adapter: dict[str, object] = field(default_factory=dict)
    measured: list[FeatureStatistics] = field(default_factory=list)

    def matches(self, view: QuantView) -> bool:
        """Whether ``view``'s model is still the model as quantized (what ``adapter`` describes)."""
        return state_fingerprint(view) == self.fingerprint

    def for_view(self, view: QuantView) -> FeatureStatistics | None:
        """The feature statistics measured on ``view``'s model as it is now, if any."""
        if not self.measured:
            return None
        fingerprint = state_fingerprint(view)
        return next((m for m in self.measured if m.fingerprint == fingerprint), None)


def keep_source_statistics(model: nn.Module, stats: SourceStatistics | None) -> None:
    """Keep ``stats`` on ``model`` (outside its state dict; ``None`` removes them)."""
    if stats is None:
        if isinstance(model, torch.fx.GraphModule):
            model.meta.pop(_SOURCE_STATS, None)
        else:
            model.__dict__.pop(_SOURCE_STATS, None)
        return
    _set_meta(model, _SOURCE_STATS, stats)


def kept_source_statistics(model: nn.Module) -> SourceStatistics | None:
    """The :class:`SourceStatistics` kept on ``model`` (or its compiled wrapper), if any."""
    return _get_meta(model, _SOURCE_STATS)  # type: ignore[return-value]


#: a memory address in a repr (``<... at 0x7f...>``): differs between a model and its deep copy
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _tensor_digest(t: torch.Tensor) -> bytes:
    """Bytes that change whenever ``t``'s values do, equal for equal tensors (a deep copy's too).

    A plain dense tensor: its raw bytes. A traceable tensor subclass (torchao's packed weights,
    ``Int8Tensor``, ``IntxUnpackedToInt8Tensor``, ...): its type, its metadata and, recursively,
    the inner tensors ``__tensor_flatten__`` names (the integer data, scales, zero points), which
    are what it computes with. Anything else (torch's quantized or sparse tensors, subclasses
    without ``__tensor_flatten__``): its ``torch.save`` serialization, which holds its values.
    """
    t = t.detach()
    if (
        type(t) is torch.Tensor
        and t.layout == torch.strided
        and not t.is_quantized
        and not t.is_meta
    ):
        return t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None:
        names, context = flatten()
        parts = [type(t).__qualname__.encode(), _ADDRESS.sub("", repr(context)).encode()]
        for name in names:
            inner = getattr(t, name)
            parts += [f"{name}|{inner.dtype}|{tuple(inner.shape)}".encode(), _tensor_digest(inner)]
        return b"|".join(parts)
    buffer = io.BytesIO()
    torch.save(t, buffer)
    return buffer.getvalue()


def state_fingerprint(view: QuantView) -> str:
    """A digest of everything a model's function depends on that a view can change: every
    state-dict tensor (names, dtypes, shapes and values; a tensor subclass such as torchao's
    packed weights by its inner tensors, :func:`_tensor_digest`) and each quantizer's bit-width
    and switch. Equal fingerprints: statistics measured on one model hold for the other.

    Batch norms' ``num_batches_tracked`` counters are left out: they do not change what the model
    computes, and torchao's train-mode pt2e graph increments them on every forward, so merely
    running a quantized model would otherwise invalidate its source statistics."""
    model = view.model
    inner = model._modules.get("_orig_mod")
    if isinstance(inner, nn.Module):
        model = inner
    digest = hashlib.sha256()
    for name, t in model.state_dict(keep_vars=True).items():
        if name.rsplit(".", 1)[-1] == "num_batches_tracked":
            continue
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(_tensor_digest(t))
    for q in view.quantizers():
        digest.update(f"{q.name}|{q.bits}|{q.enabled}|".encode())
    return digest.hexdigest()


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``, quietly: torch's pytree warns (FutureWarning, about ``LeafSpec``)
    whenever an exported graph is deep-copied, which says nothing to our users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        return copy.deepcopy(model)


_NORM_KINDS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.modules.batchnorm._BatchNorm, "batch"),
    (nn.LayerNorm, "layer"),
    (nn.GroupNorm, "group"),
)


def module_norms(named_modules: Iterable[tuple[str, nn.Module]]) -> list[NormLayer]:
    """The torch norm modules among ``named_modules`` (for backends that keep norms as modules)."""
    norms = []
    for name, module in named_modules:
        kind = next((k for t, k in _NORM_KINDS if isinstance(module, t)), None)
        if kind is None:
            continue
        norms.append(
            NormLayer(
                name,
                kind,  # type: ignore[arg-type]
                getattr(module, "weight", None),
                getattr(module, "bias", None),
                getattr(module, "running_mean", None),
                getattr(module, "running_var", None),
                eps=getattr(module, "eps", None),
            )
        )
    return norms


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (or buffer); the CPU for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def set_module_norm_mode(model: nn.Module, mode: NormMode) -> None:
    """:meth:`QuantView.set_norm_mode` for models whose batch norms are torch modules.

    The model goes to eval mode (no dropout, no observer updates); in ``"batch"`` mode each batch
    norm uses batch statistics with momentum 0. The source momentum is kept on the module itself,
    so a new view of the same model, or a deep copy, puts back the user's value.
    """
    model.eval()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            state = module.__dict__
            if mode == "batch":
                state.setdefault("_qtta_momentum", module.momentum)
                module.momentum = 0.0
            elif "_qtta_momentum" in state:
                module.momentum = state.pop("_qtta_momentum")
            module.train(mode == "batch")


class _RobustNormHook:
    """The forward pre-hook :class:`RobustBatchNorm` puts in front of one batch norm. It holds
    its owner by a weak reference, so a deep copy of the model does not copy the owner (and
    :meth:`QuantView.copy` drops it from copies)."""

    def __init__(self, owner: RobustBatchNorm, norm: NormLayer) -> None:
        self.owner = weakref.ref(owner)
        self.norm = norm

    def __call__(self, module: nn.Module, args: tuple[object, ...]) -> tuple[object, ...] | None:
        owner = self.owner()
        if owner is None or not owner.updating or not args:
            return None
        x = args[0]
        if not isinstance(x, torch.Tensor) or x.ndim < 2:
            return None
        return (owner._fold(self.norm, x), *args[1:])


class RobustBatchNorm:
    """Robust batch normalisation (RBN; Yuan et al., "Robust Test-Time Adaptation in Dynamic
    Scenarios", CVPR 2023) on a view's batch norms with running statistics.

    Each such norm normalises with *global* statistics ``(mu, var)`` that follow an exponential
    moving average of the batch statistics it sees while :attr:`updating` is on::

        mu  <- (1 - momentum) * mu  + momentum * mean_batch(x)
        var <- (1 - momentum) * var + momentum * var_batch(x)     (biased variance)

    and stay as they are otherwise (prediction). A small batch, or a batch of one class, then moves
    the normalisation only a little, where test-batch statistics would follow it entirely.

    How it is served on every backend: the global statistics *are* the norm's own running
    buffers, and the norms run on them (``"source"`` norm mode). While updating, a forward
    pre-hook on :meth:`QuantView.norm_input_module` (the module whose input is what the norm
    normalises) folds the batch statistics into the buffers in place and hands the norm
    ``x' = x.detach() + (g - g.detach())`` with ``g = (x - mu) * sqrt(rv + eps) / sqrt(var + eps) + rm``,
    where ``mu`` / ``var`` are the new statistics *as functions of the batch* and ``rm`` / ``rv``
    the buffers holding their values. ``x'`` equals ``x`` exactly, so the norm computes
    ``(x - mu) / sqrt(var + eps) * weight + bias``; its gradient is that of RBN, which reaches the
    batch statistics with weight ``momentum``. Keeping the statistics in the running buffers keeps
    the model its backend's own: a deep copy, a snapshot, the core's rollback and the backend's
    export carry them (torchao's ``convert_pt2e`` folds them into the conv like any running
    statistics).

    ``momentum``: the paper's ``alpha`` (0.05). Norms without running statistics (LayerNorm,
    GroupNorm) are left alone.
    """

    def __init__(self, view: QuantView, momentum: float) -> None:
        if isinstance(momentum, bool) or not 0 < float(momentum) <= 1:
            raise ValueError(f"RBN momentum must be in (0, 1], got {momentum!r}")
        self.momentum = float(momentum)
        self.norms = [n for n in view.norms() if n.has_statistics and n.running_var is not None]
        #: whether forwards fold their batch statistics into the global ones
        self.updating = False
        view.set_norm_mode("source")
        self._handles = []
        for norm in self.norms:
            module = view.norm_input_module(norm)
            for key, hook in list(module._forward_pre_hooks.items()):
                if isinstance(hook, _RobustNormHook):  # one RBN per norm: a new one replaces it
                    del module._forward_pre_hooks[key]
            self._handles.append(module.register_forward_pre_hook(_RobustNormHook(self, norm)))

    def statistics(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The global ``(mean, var)`` of each norm, by name (the live buffers)."""
        return {n.name: (n.running_mean, n.running_var) for n in self.norms}  # type: ignore[misc]

    def remove(self) -> None:
        """Take the hooks off (the statistics stay in the running buffers)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _fold(self, norm: NormLayer, x: torch.Tensor) -> torch.Tensor:
        rm, rv = norm.running_mean, norm.running_var
        assert rm is not None and rv is not None
        eps = 1e-5 if norm.eps is None else norm.eps
        dims = [d for d in range(x.ndim) if d != 1]
        batch_var, batch_mean = torch.var_mean(x, dim=dims, unbiased=False)
        a = self.momentum
        mean = (1 - a) * rm.detach().to(x.dtype) + a * batch_mean
        var = (1 - a) * rv.detach().to(x.dtype) + a * batch_var
        with torch.no_grad():
            rm.copy_(mean)
            rv.copy_(var)
        shape = [1] * x.ndim
        shape[1] = -1
        ratio = (rv.to(x.dtype) + eps).sqrt() / (var + eps).sqrt()
        g = (x - mean.reshape(shape)) * ratio.reshape(shape) + rm.to(x.dtype).reshape(shape)
        return x.detach() + (g - g.detach())  # the value of x exactly, RBN's gradient


class QuantView(ABC):
    """A backend's quantized model seen uniformly.

    Subclasses implement :meth:`layers`, :meth:`norms`, :attr:`can_backprop` and
    :meth:`set_norm_mode`; snapshot / restore work on any ``nn.Module`` and may be extended.
    """

    backend: str = "?"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._norm_mode: NormMode = "source"

    # --- what the model is made of -------------------------------------------------------------
    @abstractmethod
    def layers(self) -> list[QuantLayer]:
        """The quantized conv / linear layers in forward order."""

    @abstractmethod
    def norms(self) -> list[NormLayer]:
        """The norm layers in forward order (empty when all were folded and none is offered)."""

    @property
    @abstractmethod
    def can_backprop(self) -> bool:
        """Whether gradients reach the norm parameters (False for integer-kernel models)."""

    def quantizers(self) -> list[QuantizerHandle]:
        """Every distinct quantizer, in forward order."""
        seen: dict[int, QuantizerHandle] = {}
        for layer in self.layers():
            for q in (layer.input_quantizer, layer.weight_quantizer, layer.output_quantizer):
                if q is not None and id(q) not in seen:
                    seen[id(q)] = q
        return list(seen.values())

    def blocks(self) -> list[Block]:
        """Layers grouped by their top-level module (``layer1.0.conv1`` -> ``layer1.0``).

        Adapters with better knowledge of their models' structure override this.
        """
        groups: dict[str, Block] = {}
        for layer in self.layers():
            parts = layer.name.split(".")
            key = ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]
            groups.setdefault(key, Block(key)).layers.append(layer)
        return list(groups.values())

    def layer_input_module(self, layer: QuantLayer) -> nn.Module:
        """The module whose forward *input* is ``layer``'s input activation before it is quantized.

        Forward pre-hooks on it see, and may replace, what the layer will quantize and compute on:
        forward-only methods read feature statistics there and add their output shift there. The
        default is the layer's own module (backends that keep layers as modules and quantize inside
        them); graph backends return a module in the graph just before the input quantizer.
        """
        return self.model.get_submodule(layer.name)

    def layer_bias(self, layer: QuantLayer) -> torch.Tensor | None:
        """The float bias tensor ``layer`` adds to its output, written in place to change it
        (forward-only methods keep their output shift there), or ``None`` where the layer has no
        bias this view can write. The default: the ``bias`` of the layer's own module."""
        try:
            module = self.model.get_submodule(layer.name)
        except AttributeError:
            return None
        bias = getattr(module, "bias", None)
        return bias if isinstance(bias, torch.Tensor) and bias.is_floating_point() else None

    def norm_input_module(self, norm: NormLayer) -> nn.Module:
        """The module whose forward input is what ``norm`` normalises (its pre-hooks see the raw
        conv / residual output, before any statistics are taken out of it). Default: the norm's own
        module; graph backends return a module in the graph just before the norm."""
        return self.model.get_submodule(norm.name)

    def prefix_cache(self, params: Sequence[torch.Tensor]) -> PrefixCache:
        """A :class:`~qtta_plugins.prefix.PrefixCache` over this model: run a batch, then run it
        again after ``params`` changed, recomputing only what depends on them. The default serves
        fx graphs (split) and module models (replay) alike; an adapter may offer a better one."""
        return prefix_cache(self.model, params)

    def measure_source(self, batches: Sequence[torch.Tensor]) -> dict[str, object]:
        """Called by :func:`qtta_plugins.quantize` on the model it returns, with clean batches:
        what this adapter's :meth:`prepare_adaptation` will need of the source data, so that the
        calibration images need not be kept (kept in :attr:`SourceStatistics.adapter`, valid
        while the model is unchanged). Small tensors only. Default: nothing."""
        return {}

    def prepare_adaptation(self) -> list[str]:
        """Called by :func:`qtta_plugins.adapt` before a method (other than ``source``) is built
        and before the run's snapshot, on the model adapt works on: the adapter may correct what
        would keep adaptation from taking effect on its backend. Returns one message per
        correction made or problem left (adapt warns with each). Default: nothing."""
        return []

    # --- how norms normalise ---------------------------------------------------------------------
    @property
    def norm_mode(self) -> NormMode:
        return self._norm_mode

    def set_norm_mode(self, mode: NormMode) -> None:
        """``"source"``: batch norms use their running (source) statistics. ``"batch"``: they use the
        current batch's statistics and leave the running statistics untouched (test-time methods
        must not drift the source statistics, which a folded weight scale may depend on)."""
        if mode not in ("source", "batch"):
            raise ValueError(f"norm mode must be 'source' or 'batch', not {mode!r}")
        self._apply_norm_mode(mode)
        self._norm_mode = mode

    @abstractmethod
    def _apply_norm_mode(self, mode: NormMode) -> None: ...

    # --- what adapts -----------------------------------------------------------------------------
    def freeze(self) -> None:
        """No parameter requires grad."""
        for p in self.model.parameters():
            p.requires_grad_(False)

    def weight_quantizer_input(self, layer: QuantLayer) -> torch.Tensor:
        """The float tensor ``layer``'s weight quantizer quantizes (detached).

        Usually the layer's weight; graph backends that scale the weight before quantizing it
        (torchao's QAT batch-norm fold: ``w * gamma / sqrt(running_var + eps)``) return the
        scaled weight. Rounding is learned on this tensor, and :meth:`set_layer_weight` takes it.
        """
        return layer.weight.detach()

    def set_layer_weight(self, layer: QuantLayer, weight: torch.Tensor) -> None:
        """Replace ``layer``'s float weight in place so that its weight quantizer now quantizes
        ``weight`` (in the domain of :meth:`weight_quantizer_input`, which gives the same shape):
        ``fake_quantize(weight, layer.weight_quantizer.grid())`` is then what the backend's
        forward uses. Raises ``ValueError`` on a shape mismatch.

        Write-back of snapped weights (AdaRound): if ``weight`` lies on the quantizer's grid, the
        backend's quantized weight equals ``weight`` exactly. Precondition where the backend
        recomputes the weight scale from the weight on every call (Brevitas' stats-based weight
        quantizers, e.g. its default per-tensor / per-channel abs-max): the statistic must come
        out the same for ``weight``, so keep each channel's (or the tensor's) extreme element at
        its grid extreme (``qmax * scale`` for abs-max); otherwise the scale, and every snapped
        value, moves.

        The default writes into ``layer.weight`` (the module parameter of module backends).
        """
        target = layer.weight
        if target.numel() == 0:
            raise NotImplementedError(f"{layer.name}: no float weight is known for this layer")
        self._check_weight_shape(layer, weight, target.shape)
        with torch.no_grad():
            target.copy_(weight)

    @staticmethod
    def _check_weight_shape(layer: QuantLayer, weight: torch.Tensor, shape: torch.Size) -> None:
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise ValueError(f"{layer.name}: the new weight must be a float tensor")
        if weight.shape != shape:
            raise ValueError(
                f"{layer.name}: the new weight has shape {tuple(weight.shape)}, the layer's "
                f"weight {tuple(shape)}"
            )

    def norm_parameters(self) -> list[nn.Parameter]:
        """Affine parameters of every norm layer, in forward order, each once."""
        seen: dict[int, nn.Parameter] = {}
        for norm in self.norms():
            for p in norm.affine():
                seen.setdefault(id(p), p)
        return list(seen.values())

    # --- copies and robust norms (teacher-student methods) ----------------------------------------
    def copy(self) -> QuantView:
        """A view of a deep copy of this model: the same view class, norm mode and sample shape,
        and no tensor shared with this model. Teacher-student methods keep their teacher, student
        and source copies this way (``cotta``, ``rotta``), so every backend serves them.

        The hooks a :class:`RobustBatchNorm` put on this model are not carried over (a copied hook
        would still update this model's statistics); other hooks are copied with the model.
        Adapters whose view needs more than the model to be rebuilt override this."""
        clone = type(self)(copy_model(self.model))
        for module in clone.model.modules():
            for key, hook in list(module._forward_pre_hooks.items()):
                if isinstance(hook, _RobustNormHook):
                    del module._forward_pre_hooks[key]
        clone.set_norm_mode(self.norm_mode)
        if hasattr(self, "sample_shape"):
            clone.sample_shape = self.sample_shape  # type: ignore[attr-defined]
        return clone

    def robust_batch_norms(self, momentum: float) -> RobustBatchNorm:
        """Robust batch normalisation (RoTTA's RBN) on this model's batch norms with running
        statistics: see :class:`RobustBatchNorm`. Puts the view in ``"source"`` norm mode (the
        norms normalise with their running statistics, which RBN keeps). The default works
        through :meth:`norm_input_module` and the norms' running buffers, on any backend that
        lists them; an adapter with another way to hold the statistics overrides it."""
        return RobustBatchNorm(self, momentum)

    # --- state -----------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, object]:
        """Everything adaptation may change: parameters, buffers, requires_grad flags, norm mode,
        and each quantizer's bit-width and on/off switch (backends keep some of those outside the
        state dict)."""
        state = {k: v.detach().clone() for k, v in self.model.state_dict(keep_vars=True).items()}
        grads = {k: p.requires_grad for k, p in self.model.named_parameters()}
        quantizers = {q.name: (q.bits, q.enabled) for q in self.quantizers()}
        return {
            "tensors": state,
            "requires_grad": grads,
            "norm_mode": self._norm_mode,
            "quantizers": quantizers,
        }

    def restore(self, snapshot: dict[str, object]) -> None:
        """Put back exactly what :meth:`snapshot` saw. The snapshot is checked against this model
        before anything is written (see :meth:`check_snapshot`): one that does not match raises
        ``ValueError`` and leaves the model as it was."""
        self.check_snapshot(snapshot)
        tensors: dict[str, torch.Tensor] = snapshot["tensors"]  # type: ignore[assignment]
        saved_quantizers: dict[str, tuple[int, bool]] = snapshot.get("quantizers", {})  # type: ignore[assignment]
        for q in self.quantizers():
            bits, enabled = saved_quantizers.get(q.name, (q.bits, q.enabled))
            if q.bits != bits:
                q.bits = bits  # before the tensors: a new bit-width re-derives the scale
            if q.enabled != enabled:
                q.enabled = enabled
        current = self.model.state_dict(keep_vars=True)
        with torch.no_grad():
            for k, v in tensors.items():
                current[k].copy_(v)
        for k, p in self.model.named_parameters():
            p.requires_grad_(snapshot["requires_grad"].get(k, p.requires_grad))  # type: ignore[union-attr]
        self.set_norm_mode(snapshot["norm_mode"])  # type: ignore[arg-type]

    def check_snapshot(self, snapshot: object) -> None:
        """Raise ``ValueError`` naming the mismatch unless ``snapshot`` is a :meth:`snapshot` of
        this model: the same state-dict keys with tensors of the same shapes, the same quantizer
        names (where the snapshot records quantizers), a known norm mode. Writes nothing."""
        if not isinstance(snapshot, dict):
            raise ValueError(
                f"a snapshot is the dict QuantView.snapshot returns, not a {type(snapshot).__name__}"
            )
        absent = [k for k in ("tensors", "requires_grad", "norm_mode") if k not in snapshot]
        if absent:
            raise ValueError(f"snapshot lacks {absent}: it is not a QuantView.snapshot")
        tensors = snapshot["tensors"]
        if not isinstance(tensors, dict):
            raise ValueError("snapshot['tensors'] must be a dict of tensors")
        current = self.model.state_dict(keep_vars=True)
        differing = set(tensors) ^ set(current)
        if differing:
            raise ValueError(
                f"snapshot does not match this model: differing keys {sorted(differing)[:5]}"
            )
        shapes = [
            f"{k}: {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__} vs "
            f"{tuple(current[k].shape)}"
            for k, v in tensors.items()
            if not isinstance(v, torch.Tensor) or not _copies_into(v.shape, current[k].shape)
        ]
        if shapes:
            raise ValueError(f"snapshot does not match this model: tensor shapes {shapes[:5]}")
        if snapshot["norm_mode"] not in ("source", "batch"):
            raise ValueError(
                f"snapshot norm mode must be 'source' or 'batch', not {snapshot['norm_mode']!r}"
            )
        saved = snapshot.get("quantizers")
        if saved is None:
            return
        if not isinstance(saved, dict):
            raise ValueError("snapshot['quantizers'] must map quantizer names to (bits, enabled)")
        differing = set(saved) ^ {q.name for q in self.quantizers()}
        if differing:
            raise ValueError(
                "snapshot does not match this model: differing quantizer names "
                f"{sorted(differing)[:5]}"
            )
        malformed = [
            name
            for name, value in saved.items()
            if not (
                isinstance(value, tuple | list)
                and len(value) == 2
                and isinstance(value[0], int)
                and isinstance(value[1], bool)
            )
        ]
        if malformed:
            raise ValueError(
                f"snapshot quantizer entries must be (bits, enabled), not so for {malformed[:5]}"
            )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(backend={self.backend!r}, layers={len(self.layers())}, "
            f"norms={len(self.norms())}, can_backprop={self.can_backprop})"
        )


def _copies_into(source: torch.Size, target: torch.Size) -> bool:
    """Whether ``target.copy_(source)`` restores every element: the same shape, or the same
    elements in a broadcastable shape (an observer's scalar ``min_val`` recorded before
    calibration restores into the ``(1,)`` it became); never a slice broadcast over the rest."""
    if source.numel() != target.numel():
        return False
    try:
        return torch.broadcast_shapes(source, target) == target
    except RuntimeError:
        return False

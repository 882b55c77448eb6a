"""The uniform view of a quantized model (docs/design.md, "The uniform view").

Methods never touch backend classes: an adapter wraps a backend's model in a :class:`QuantView`, and
methods read and change the model only through it. The view wraps the model object itself; copying,
when the user did not ask for in-place work, is the caller's job (see :func:`qtta_plugins.adapt`).

Over 500 lines: most of it is :class:`QuantView`, the contract every adapter implements, kept whole so that an adapter writer reads it in one place.
"""

from __future__ import annotations

import copy
import math
import warnings
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

# re-exported: adapters and methods import the source-data names from the view
from .source import (
    SOURCE_BATCH_SIZE as SOURCE_BATCH_SIZE,
)
from .source import (
    SOURCE_SAMPLE_SIZE as SOURCE_SAMPLE_SIZE,
)
from .source import (
    FeatureStatistics as FeatureStatistics,
)
from .source import (
    SourceStatistics as SourceStatistics,
)
from .source import (
    first_inputs as first_inputs,
)
from .source import (
    keep_source_statistics as keep_source_statistics,
)
from .source import (
    kept_source_statistics as kept_source_statistics,
)
from .source import (
    remember_source_sample as remember_source_sample,
)
from .source import (
    source_sample as source_sample,
)
from .source import (
    state_fingerprint as state_fingerprint,
)

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

    def input_module(self) -> nn.Module:
        """The module whose forward receives, as its first argument, exactly the tensor this
        quantizer quantizes, on every forward while it is enabled: forward pre-hooks on it observe
        the quantizer's input (the shared activation-range search reads it there). Raises
        ``NotImplementedError`` where the backend has no such module."""
        raise NotImplementedError(f"{type(self).__name__} cannot show its input")

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

    # --- copies (teacher-student methods) ----------------------------------------
    def copy(self) -> QuantView:
        """A view of a deep copy of this model: the same view class, norm mode and sample shape,
        and no tensor shared with this model. Teacher-student methods keep their teacher, student
        and source copies this way (``cotta``, ``rotta``), so every backend serves them.

        Hooks that set ``drop_on_copy = True`` (RoTTA's robust batch norm) are not carried over (a
        copied hook would still update this model's statistics); other hooks are copied with the
        model.
        Adapters whose view needs more than the model to be rebuilt override this."""
        clone = type(self)(copy_model(self.model))
        for module in clone.model.modules():
            for key, hook in list(module._forward_pre_hooks.items()):
                if getattr(hook, "drop_on_copy", False):
                    del module._forward_pre_hooks[key]
        clone.set_norm_mode(self.norm_mode)
        if hasattr(self, "sample_shape"):
            clone.sample_shape = self.sample_shape  # type: ignore[attr-defined]
        return clone

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

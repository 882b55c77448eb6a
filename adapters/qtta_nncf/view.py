"""NNCF models seen through the uniform :class:`~qtta_plugins.view.QuantView`.

``nncf.quantize`` on a PyTorch model returns the same class, its ``forward`` wrapped by NNCF and a
``HookStorage`` module at ``model.__nncf_hooks`` holding the fake quantizers:

* ``pre_hooks["<op>__<port>"]`` run on an operation's input ``port`` (port 1 of a conv / linear
  is its weight: the weight quantizers live here);
* ``post_hooks["<op>__<port>"]`` run on an operation's output (most activation quantizers: NNCF
  puts them after the producer of a tensor, not in front of its consumers).

Op names are NNCF's (``layer1/conv1/conv2d/0``), not module paths: inside a ``ModuleList`` the list
scope is dropped (``blocks[1].qkv`` calls ``qkv/linear/1``), so module names, forward order and which
activation quantizer feeds which layer are read from a trace of the model with NNCF's own graph
builder. The trace needs one example input: the one ``qtta_plugins.quantize`` stored on the model
(attribute ``_qtta_example_input``), one set as ``view.example_input = x``, or else the first input
the model is called with once a view has looked at it (a one-shot forward pre-hook keeps it). Until
one is known, :meth:`NNCFView.layers` falls back to what the hook names alone say (weight
quantizers; only input quantizers NNCF pre-hooked on the layer itself) and warns;
:meth:`NNCFView.quantizers` (all that snapshot / restore and the methods need) is exact either way,
in hook-storage order instead of forward order.

Quantizer handles wrap NNCF's ``SymmetricQuantizer`` (parameter ``scale``: the clipping threshold,
so the grid is ``scale * k / level_high``) and ``AsymmetricQuantizer`` (``input_low``,
``input_range``). Their bit-width is NNCF's ``num_bits``; the thresholds stay where calibration put
them when it changes, so the same range is cut into ``2**bits`` levels (or one fewer, narrow range).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from qtta_plugins.view import (
    Grid,
    NormLayer,
    NormMode,
    QuantizerHandle,
    QuantLayer,
    QuantView,
    kept_source_statistics,
    module_norms,
    set_module_norm_mode,
    source_sample,
)

HOOKS_ATTR = "__nncf_hooks"
EXAMPLE_ATTR = "_qtta_example_input"
"""Model attribute holding one example input (a batch of one), used to trace the model's graph."""

_COMPUTE_FUNCS = {
    "conv1d": "conv",
    "conv2d": "conv",
    "conv3d": "conv",
    "conv_transpose1d": "conv",
    "conv_transpose2d": "conv",
    "conv_transpose3d": "conv",
    "linear": "linear",
}
# Operations that only move or select values: an activation quantizer in front of one of them
# quantizes the input of whatever consumes its output (NNCF propagates quantizers through them).
_PASS_THROUGH = {
    "reshape",
    "view",
    "flatten",
    "permute",
    "transpose",
    "contiguous",
    "unfold",
    "squeeze",
    "unsqueeze",
    "expand",
    "clone",
    "__getitem__",
    "__get__",
    "dropout",
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "adaptive_max_pool1d",
    "adaptive_max_pool2d",
    "adaptive_max_pool3d",
    "chunk",
    "split",
    "unbind",
}
_QUANTIZE_FUNCS = ("symmetric_quantize", "asymmetric_quantize")


def _from_nncf(obj: object) -> bool:
    return type(obj).__module__.startswith("nncf.")


def hook_storage(model: nn.Module) -> nn.Module | None:
    """NNCF's ``HookStorage`` of ``model``, or ``None``."""
    return model._modules.get(HOOKS_ATTR)


def is_quantizer(module: nn.Module) -> bool:
    """An NNCF fake quantizer (``BaseQuantizer``: symmetric, asymmetric, LoRA variants)."""
    return (
        _from_nncf(module)
        and hasattr(module, "_num_bits")
        and hasattr(module, "enabled")
        and hasattr(module, "set_levels")
    )


def quantizer_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every NNCF quantizer of ``model`` by its module path, in hook-storage order."""
    storage = hook_storage(model)
    if storage is None:
        return {}
    return {
        f"{HOOKS_ATTR}.{name}": module
        for name, module in storage.named_modules()
        if is_quantizer(module)
    }


# --- quantizer handles ---------------------------------------------------------------------------
class NNCFQuantizerHandle(QuantizerHandle):
    """An NNCF ``SymmetricQuantizer`` / ``AsymmetricQuantizer`` hook module.

    ``name`` is the quantizer's module path in the model (as in its ``state_dict``), e.g.
    ``__nncf_hooks.pre_hooks.layer1/conv1/conv2d/0__1.0``.
    """

    def __init__(self, name: str, module: nn.Module, role: str) -> None:
        self.name, self.module, self.role = name, module, role  # type: ignore[assignment]
        # NNCF's activation quantizers are post-hooks on the producer's output.
        self.shared_by_consumers = role == "act"

    @property
    def qrange(self) -> tuple[int, int]:
        return int(self.module.level_low), int(self.module.level_high)

    @property
    def bits(self) -> int:
        return int(self.module.num_bits)

    @bits.setter
    def bits(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
            raise ValueError(f"bit-width must be an int in 2..8, got {value!r}")
        module = self.module
        # NNCF's overflow fix ("half range", first layer on some CPU targets) drops one bit of an
        # 8-bit weight grid. Below 8 bit it would halve the grid again: keep it only at 8 bit.
        if not hasattr(module, "_qtta_half_range"):
            module._qtta_half_range = bool(module._half_range)
        module._half_range = module._qtta_half_range if value == 8 else False
        # NNCF recomputes level_low / level_high from num_bits; scale (symmetric) and
        # input_low / input_range (asymmetric) are thresholds, not step sizes: the calibrated
        # range is kept and cut into the new number of levels.
        module.num_bits = value

    @property
    def enabled(self) -> bool:
        return bool(self.module.is_enabled_quantization())

    @enabled.setter
    def enabled(self, value: bool) -> None:
        # NNCF's switch is the quantizer's ``enabled`` buffer (in the state dict). Its
        # enable_quantization() / disable_quantization() also flip requires_grad of the
        # quantizer's parameters, which would undo a method's freeze() / set_trainable(): set
        # the buffer only.
        self.module.enabled.fill_(1 if value else 0)

    @property
    def ch_axis(self) -> int | None:
        if not self.module.per_channel:
            return None
        shape = list(self.module.scale_shape)
        return max(range(len(shape)), key=lambda i: shape[i])

    @property
    def symmetric(self) -> bool:
        return hasattr(self.module, "_scale_param_storage")

    def params(self) -> dict[str, torch.Tensor]:
        """``{"scale": ...}`` (symmetric) or ``{"input_low": ..., "input_range": ...}``."""
        return dict(self.module.get_trainable_params())

    def _flat(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().float().reshape(-1 if self.ch_axis is not None else ()).clone()

    def grid(self) -> Grid:
        """What NNCF's ``Quantize_forward`` computes from its thresholds, with ``n = levels - 1``:

        * symmetric: ``input_low = s' * level_low / level_high``, ``input_range = s' - input_low``
          (``s' = |scale| + eps``): step ``input_range / n`` (``= s' / level_high``), zero point 0,
          integers ``level_low..level_high``;
        * asymmetric: ``input_low`` and ``input_range`` first tuned by NNCF's ``TuneRange`` (so
          that 0 is on the grid): step ``input_range / n``, zero point
          ``round(-input_low / step)``, integers ``0..n``.

        NNCF multiplies by ``1 / step`` and offsets by ``input_low`` before rounding, so it may
        round the other way within ~1e-5 steps of a tie (one step apart, see
        :func:`~qtta_plugins.view.fake_quantize`); values on the grid come back exact.
        """
        return self._grid(warn=True)

    def _grid(self, warn: bool) -> Grid:
        q = self.module
        n = q.levels - 1
        with torch.no_grad():
            if self.symmetric:
                scale = q.scale.abs() + q.eps
                input_low = scale * (q.level_low / q.level_high)
                step = (scale - input_low) / n
                zero_point = torch.zeros_like(step)
                qmin, qmax = self.qrange
            else:
                tune = nncf_tune_range()
                input_low, input_range = tune(q.input_low, q.input_range.abs() + q.eps, q.levels)
                step = input_range / n
                position = -input_low * (n / input_range)
                zero_point = torch.round(position)
                qmin, qmax = 0, n
                if warn:
                    self._warn_unaligned(position - zero_point)
        return Grid(self._flat(step), self._flat(zero_point), qmin, qmax, self.ch_axis)

    def _warn_unaligned(self, offset: torch.Tensor) -> None:
        """NNCF's ``TuneRange`` moves an asymmetric range so that 0 is a grid point, except when
        the zero point rounds to 0 or to ``n`` (its two candidate ranges then compare the wrong
        way and it keeps the range as it is). NNCF's forward then rounds ``x / step + offset``
        (``offset = -input_low / step - zero_point``, up to half a step): no ``Grid`` describes
        that, and :func:`fake_quantize` with the grid returned differs by one step near the
        shifted ties. :meth:`set_grid` writes an aligned range, which NNCF applies exactly."""
        worst = float(offset.abs().max())
        if worst > 1e-3:
            warnings.warn(
                f"{self.name}: NNCF's range puts 0 {worst:.3g} steps off the grid (its TuneRange "
                "leaves a zero point of 0 or n unaligned); its forward differs from grid() by "
                "one step near ties until set_grid() writes the grid",
                RuntimeWarning,
                stacklevel=4,
            )

    def set_grid(self, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> None:
        """Into NNCF's storage, inverting :meth:`grid`: symmetric ``scale_nncf = step *
        level_high`` (no zero point: a new one raises ``NotImplementedError``); asymmetric
        ``input_low = -zero_point * step``, ``input_range = step * n``. Log-domain storage
        (``logarithm_scale``) gets the logarithm of ``scale_nncf`` / ``input_range``."""
        current = self._grid(warn=False)  # an unaligned range is about to be replaced
        new = current.with_values(scale, zero_point)
        q = self.module
        if self.symmetric and not torch.equal(new.zero_point, current.zero_point):
            raise NotImplementedError(f"{self.name}: an NNCF SymmetricQuantizer has no zero point")
        storage = self._storage()
        old = [p.detach().clone() for p in storage]
        shape = storage[-1].shape
        step = new.scale.reshape(shape)

        def stored(threshold: torch.Tensor) -> torch.Tensor:
            return threshold.log() if q.is_using_log_scale_storage else threshold

        with torch.no_grad():
            if self.symmetric:
                storage[0].copy_(stored(step * q.level_high))
            else:
                storage[0].copy_(-new.zero_point.reshape(shape) * step)
                storage[1].copy_(stored(step * (q.levels - 1)))
        written = self._grid(warn=False)
        if not (
            torch.allclose(written.scale, new.scale, rtol=1e-5, atol=0.0)
            and torch.equal(written.zero_point, new.zero_point)
        ):  # pragma: no cover - a parametrisation this inversion does not know
            with torch.no_grad():
                for p, v in zip(storage, old, strict=True):
                    p.copy_(v)
            raise NotImplementedError(f"{self.name}: NNCF did not take the grid as written")

    def _storage(self) -> list[nn.Parameter]:
        names = (
            ("_scale_param_storage",)
            if self.symmetric
            else ("input_low", "_input_range_param_storage")
        )
        return [getattr(self.module, n) for n in names]

    def set_trainable(self, flag: bool = True) -> list[nn.Parameter]:
        """NNCF's own storage parameters (``_scale_param_storage``, or ``input_low`` and
        ``_input_range_param_storage``; log-domain when NNCF stores the scale as a logarithm)."""
        params = self._storage()
        for p in params:
            p.requires_grad_(flag)
        return params


def nncf_tune_range():
    """NNCF's ``TuneRange.apply`` (asymmetric ranges moved so that 0 is on the grid)."""
    from ._backend import nncf_module

    return nncf_module("nncf.torch.quantization.quantize_functions").TuneRange.apply


# --- structure of the traced graph ---------------------------------------------------------------
@dataclass
class _LayerInfo:
    name: str
    kind: str
    weight_name: str | None
    weight_q: str | None
    input_q: str | None
    output_q: str | None = None


@dataclass
class _Structure:
    layers: list[_LayerInfo] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # quantizer names in forward order
    roles: dict[str, str] = field(default_factory=dict)
    traced: bool = False


def _module_path(const_name: str) -> str:
    return const_name.rsplit(".", 1)[0]


def trace_structure(model: nn.Module, example: torch.Tensor) -> _Structure:
    """Layers, their quantizers and the quantizers' forward order, from one traced forward.

    Uses NNCF's graph builder (the trace NNCF itself quantizes from), in eval mode, with every
    quantizer switched on for the trace (a disabled quantizer leaves no node) and put back after.
    """
    from ._backend import nncf_module

    build_graph = nncf_module("nncf.torch.function_hook.graph.build_graph_mode").build_graph
    NodeType = nncf_module("nncf.torch.function_hook.graph.graph_utils").NodeType

    modules = quantizer_modules(model)
    saved = {name: int(m.enabled[0]) for name, m in modules.items()}
    device = next((p.device for p in model.parameters()), example.device)
    try:
        for m in modules.values():
            m.enabled.fill_(1)
        graph = build_graph(model, example.to(device))
    finally:
        for name, m in modules.items():
            m.enabled.fill_(saved[name])

    def inputs(node: int) -> dict[int, int]:
        return {data["meta"].input_port: src for src, _, data in graph.in_edges(node, data=True)}

    def func_name(node: int) -> str | None:
        data = graph.nodes[node]
        if data["type"] is not NodeType.fn_call:
            return None
        return getattr(data["meta"].func, "__name__", "")

    def const_name(node: int | None) -> str | None:
        if node is None or graph.nodes[node]["type"] is not NodeType.const:
            return None
        return graph.nodes[node]["meta"].name_in_model

    quantizer_of: dict[int, str] = {}
    structure = _Structure(traced=True)
    for node in sorted(graph.nodes):
        fname = func_name(node)
        if fname is None or not fname.startswith(_QUANTIZE_FUNCS):
            continue
        ports = inputs(node)
        name = next(
            (
                _module_path(c)
                for port, src in sorted(ports.items())
                if port > 0 and (c := const_name(src)) and _module_path(c) in modules
            ),
            None,
        )
        if name is None:
            continue
        quantizer_of[node] = name
        if name not in structure.roles:
            structure.order.append(name)
            # A quantizer of a parameter (a weight, or a norm's affine parameter, which NNCF
            # quantizes too in some presets) is a weight quantizer.
            structure.roles[name] = "weight" if const_name(ports.get(0)) else "act"

    def source_quantizer(node: int | None) -> str | None:
        for _ in range(64):
            if node is None:
                return None
            if node in quantizer_of:
                return quantizer_of[node]
            if func_name(node) not in _PASS_THROUGH:
                return None
            node = inputs(node).get(0)
        return None

    consumers: dict[int, list[int]] = {}
    for src, dst in graph.edges():
        consumers.setdefault(src, []).append(dst)

    seen: dict[str, int] = {}
    for node in sorted(graph.nodes):
        kind = _COMPUTE_FUNCS.get(func_name(node) or "")
        if kind is None:
            continue
        ports = inputs(node)
        w_src = ports.get(1)
        weight_q = quantizer_of.get(w_src) if w_src is not None else None
        if weight_q is None:
            continue  # not a quantized layer
        weight_name = const_name(inputs(w_src).get(0))
        base = weight_name[: -len(".weight")] if weight_name else graph.nodes[node]["meta"].op_name
        count = seen.get(base, 0)
        seen[base] = count + 1
        name = base if count == 0 else f"{base}#{count}"  # a module called more than once
        output_q = next(
            (quantizer_of[c] for c in consumers.get(node, []) if c in quantizer_of), None
        )
        structure.layers.append(
            _LayerInfo(name, kind, weight_name, weight_q, source_quantizer(ports.get(0)), output_q)
        )
    # Quantizers the trace did not reach (dead branches) keep their storage order, at the end.
    for name in modules:
        if name not in structure.roles:
            structure.order.append(name)
            structure.roles[name] = _static_role(name)
    return structure


def _split_hook_name(name: str) -> tuple[str, str, int]:
    """``__nncf_hooks.pre_hooks.a/b/conv2d/0__1.0`` -> ``("pre_hooks", "a/b/conv2d/0", 1)``."""
    parts = name.split(".")
    op, _, port = parts[-2].rpartition("__")
    return parts[-3], op.replace(":", "."), int(port)


def norm_parameter_quantizers(model: nn.Module) -> list[str]:
    """The enabled quantizers NNCF put on norm layers' affine parameters (``model_type=None`` on a
    model with LayerNorm / GroupNorm, e.g. a timm ViT), by module path.

    Their 8-bit range is calibrated on the source values of ``gamma`` / ``beta`` (a LayerNorm's
    weight of ones gets the range [-1, 1]), so whatever adaptation does to those parameters is
    clamped or rounded away: measured on a timm ViT, scaling every LayerNorm weight by 3 left the
    output bit-identical. :func:`release_norm_parameters` removes them."""
    found = []
    for name, module in quantizer_modules(model).items():
        kind, op, port = _split_hook_name(name)
        func = op.rsplit("/", 2)[-2] if op.count("/") >= 1 else op
        if kind == "pre_hooks" and port > 0 and func.endswith("_norm") and module.enabled:
            found.append(name)
    return found


def release_norm_parameters(model: nn.Module) -> list[str]:
    """Remove NNCF's quantizers of norm affine parameters from ``model`` (in place), so that test-
    time adaptation of those parameters takes effect; returns their names. Deployment runtimes keep
    norm parameters in float anyway (OpenVINO folds BatchNorm and runs LayerNorm in float)."""
    names = norm_parameter_quantizers(model)
    storage = hook_storage(model)
    for name in names:
        storage.delete_hook(name[len(HOOKS_ATTR) + 1 :])
    return names


@contextlib.contextmanager
def quantizers_off(model: nn.Module) -> Iterator[None]:
    """Every NNCF quantizer of ``model`` switched off inside the block (the model computes its
    float function), each put back as it was after."""
    every = list(quantizer_modules(model).values())
    saved = [m.enabled.clone() for m in every]
    try:
        for m in every:
            m.enabled.fill_(0)
        yield
    finally:
        for m, enabled in zip(every, saved, strict=True):
            m.enabled.copy_(enabled)


def _act_handles(model: nn.Module) -> list[NNCFQuantizerHandle]:
    return [h for h in NNCFView(model).quantizers() if h.role == "act" and h.enabled]


def _activation_extremes(
    model: nn.Module,
    handles: list[NNCFQuantizerHandle],
    batches: list[torch.Tensor],
    mode: NormMode,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per quantizer of ``handles``: the min and max (per channel where it is per channel) of
    what reaches it in the float function (all quantizers off), batch norms in ``mode``."""
    view = NNCFView(model, example_input=batches[0][:1])
    saved_mode = view.norm_mode
    # batch-mode forwards count batches: the model's counters are put back as they were
    counters = {
        name: buf.clone()
        for name, buf in model.named_buffers()
        if name.endswith("num_batches_tracked")
    }
    found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def recorder(handle: NNCFQuantizerHandle):
        shape = tuple(handle.module.scale_shape)

        def record(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            keep = (
                {x.ndim - len(shape) + i for i, n in enumerate(shape) if n != 1}
                if handle.module.per_channel
                else set()
            )
            dims = [d for d in range(x.ndim) if d not in keep]
            lo, hi = x.amin(dims), x.amax(dims)
            if handle.name in found:
                lo = torch.minimum(found[handle.name][0], lo)
                hi = torch.maximum(found[handle.name][1], hi)
            found[handle.name] = (lo, hi)

        return record

    hooks = [h.module.register_forward_pre_hook(recorder(h)) for h in handles]
    try:
        view.set_norm_mode(mode)
        with quantizers_off(model), torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for hook in hooks:
            hook.remove()
        view.set_norm_mode(saved_mode)
        buffers = dict(model.named_buffers())
        for name, value in counters.items():
            buffers[name].copy_(value)
    return found


def _current_range(handle: NNCFQuantizerHandle) -> tuple[torch.Tensor, torch.Tensor]:
    q = handle.module
    with torch.no_grad():
        if handle.symmetric:
            threshold = q.scale.detach().flatten()
            return (-threshold if q.signed else torch.zeros_like(threshold)), threshold
        low = q.input_low.detach().flatten()
        return low, low + q.input_range.detach().flatten()


def batch_mode_overflow(
    model: nn.Module, batches: list[torch.Tensor], factor: float = 1.5
) -> list[str]:
    """The enabled activation quantizers whose calibrated range the float function's tensors
    exceed by more than ``factor`` (or whose unsigned range meets negative values) when the batch
    norms use the statistics of ``batches``; see :func:`recalibrate_activations`."""
    handles = _act_handles(model)
    return _overflowing(handles, _activation_extremes(model, handles, batches, "batch"), factor)


def _overflowing(
    handles: list[NNCFQuantizerHandle],
    extremes: dict[str, tuple[torch.Tensor, torch.Tensor]],
    factor: float = 1.5,
) -> list[str]:
    over = []
    for h in handles:
        lo, hi = (t.flatten() for t in extremes[h.name])
        low, high = _current_range(h)
        span = (high - low).clamp_min(1e-8)
        if bool(
            ((hi - high) > (factor - 1) * span).any() or ((low - lo) > (factor - 1) * span).any()
        ):
            over.append(h.name)
    return over


def recalibrate_activations(
    model: nn.Module, batches: list[torch.Tensor], *, mode: NormMode = "batch"
) -> list[str]:
    """Re-estimate every enabled NNCF activation quantizer's range and sign (min-max of what
    reaches it in the float function, all quantizers off) on ``batches``, with the batch norms in
    ``mode``; in place. Returns the quantizers' names.

    NNCF quantizes batch-norm outputs and residual sums too, all calibrated under the running
    statistics. A test-time method that normalises with batch statistics (norm, tent, zoa, foa)
    moves those tensors: where the running statistics are far from any batch's (a briefly trained
    model, or a strong shift), on a MobileNetV2 the batch-mode tensors spanned 3-4x the calibrated
    ranges, and quantizers calibrated unsigned met negative values. Calibrated on clean source
    batches in batch mode, the ranges are those the adapted model runs in."""
    handles = _act_handles(model)
    _write_ranges(handles, _activation_extremes(model, handles, batches, mode))
    return [h.name for h in handles]


def _write_ranges(
    handles: list[NNCFQuantizerHandle], extremes: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """Each quantizer's sign and range set to cover its ``extremes`` (and zero)."""
    with torch.no_grad():
        for h in handles:
            q = h.module
            lo, hi = extremes[h.name]
            lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
            if h.symmetric:
                q.signed = bool((lo < 0).any())
                threshold = torch.maximum(-lo, hi).clamp_min(1e-8)
                value = threshold.log() if q.is_using_log_scale_storage else threshold
                q._scale_param_storage.copy_(value.reshape(q._scale_param_storage.shape))
            else:
                span = (hi - lo).clamp_min(1e-8)
                value = span.log() if q.is_using_log_scale_storage else span
                q.input_low.copy_(lo.reshape(q.input_low.shape))
                q._input_range_param_storage.copy_(value.reshape(q.input_low.shape))


def _static_role(name: str) -> str:
    kind, op, port = _split_hook_name(name)
    func = op.rsplit("/", 2)[-2] if op.count("/") >= 1 else op
    if kind == "pre_hooks" and port > 0 and (func in _COMPUTE_FUNCS or func.endswith("_norm")):
        return "weight"
    return "act"


def static_structure(model: nn.Module) -> _Structure:
    """What the hook names alone say, without running the model (no example input known).

    Weight quantizers are exact; a layer's name is its NNCF op scope made a module path when such
    a module exists (wrong inside a ``ModuleList``, whose scope NNCF drops); only input quantizers
    that NNCF put in front of the layer itself (pre-hooks on port 0) are found.
    """
    modules = quantizer_modules(model)
    structure = _Structure(traced=False)
    structure.order = list(modules)
    structure.roles = {name: _static_role(name) for name in modules}
    pre = {
        (op, port): name
        for name in modules
        for kind, op, port in [_split_hook_name(name)]
        if kind == "pre_hooks"
    }
    module_names = dict(model.named_modules())
    for (op, port), name in pre.items():
        parts = op.split("/")
        if port != 1 or len(parts) < 2 or parts[-2] not in _COMPUTE_FUNCS:
            continue
        scope = ".".join(p for p in parts[:-2] if p)
        target = module_names.get(scope)
        layer_name = scope if target is not None and hasattr(target, "weight") else op
        weight_name = f"{scope}.weight" if layer_name == scope else None
        structure.layers.append(
            _LayerInfo(
                layer_name, _COMPUTE_FUNCS[parts[-2]], weight_name, name, pre.get((op, 0)), None
            )
        )
    return structure


class _CaptureExample:
    """One-shot forward pre-hook: keeps the first input's first sample on the model, then leaves.

    Holds no reference to a view, so a deep copy of the model carries a working copy of it.
    """

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor) and args[0].ndim > 0 and len(args[0]):
            module.__dict__[EXAMPLE_ATTR] = args[0][:1].detach().clone()
            for key, hook in list(module._forward_pre_hooks.items()):
                if hook is self:
                    del module._forward_pre_hooks[key]


# --- the view ------------------------------------------------------------------------------------
class NNCFView(QuantView):
    """A model returned by ``nncf.quantize`` (PyTorch backend), whoever called it.

    The model stays an eager ``nn.Module`` with its norms unfolded, so gradients reach the norm
    affine parameters and (see :meth:`NNCFQuantizerHandle.set_trainable`) the quantizer ranges.
    """

    backend = "nncf"

    def __init__(self, model: nn.Module, example_input: torch.Tensor | None = None) -> None:
        super().__init__(model)
        self.sample_shape = None
        self._handles: dict[int, NNCFQuantizerHandle] = {}
        self._cache: tuple[object, tuple[int, ...], _Structure] | None = None
        self._warned = False
        if example_input is not None:
            self.example_input = example_input

    # --- example input -------------------------------------------------------------------------
    @property
    def example_input(self) -> torch.Tensor | None:
        """One input sample (batch of one) used to trace the model; stored on the model."""
        return self.model.__dict__.get(EXAMPLE_ATTR)

    @example_input.setter
    def example_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim == 0 or len(x) == 0:
            raise ValueError("example_input must be a non-empty batch tensor")
        self.model.__dict__[EXAMPLE_ATTR] = x[:1].detach().clone()
        self._cache = None

    # --- structure -----------------------------------------------------------------------------
    def _structure(self, *, warn: bool = False) -> _Structure:
        modules = quantizer_modules(self.model)
        example = self.example_input
        ids = tuple(id(m) for m in modules.values())
        if self._cache is not None and self._cache[0] is example and self._cache[1] == ids:
            structure = self._cache[2]
        else:
            if example is not None:
                structure = trace_structure(self.model, example)
            else:
                structure = static_structure(self.model)
                self._capture_next_input()
            self._cache = (example, ids, structure)
        if warn and not structure.traced and not self._warned:
            self._warned = True
            warnings.warn(
                "NNCF view without an example input: layer names and input quantizers come from "
                "NNCF's hook names only (run the model once, or set view.example_input = x, for "
                "the traced structure)",
                stacklevel=3,
            )
        return structure

    def _capture_next_input(self) -> None:
        hooks = self.model._forward_pre_hooks.values()
        if not any(isinstance(h, _CaptureExample) for h in hooks):
            self.model.register_forward_pre_hook(_CaptureExample())

    def _handle(self, name: str, structure: _Structure) -> NNCFQuantizerHandle:
        module = self.model.get_submodule(name)
        handle = self._handles.get(id(module))
        if handle is None or handle.name != name:
            handle = NNCFQuantizerHandle(name, module, structure.roles.get(name, "act"))
            self._handles[id(module)] = handle
        else:
            handle.role = structure.roles.get(name, handle.role)  # type: ignore[assignment]
        return handle

    def layers(self) -> list[QuantLayer]:
        structure = self._structure(warn=True)
        params = dict(self.model.named_parameters())
        layers = []
        for info in structure.layers:
            weight = params.get(info.weight_name) if info.weight_name else None
            layers.append(
                QuantLayer(
                    info.name,
                    info.kind,  # type: ignore[arg-type]
                    weight if weight is not None else torch.empty(0),
                    self._handle(info.weight_q, structure) if info.weight_q else None,
                    self._handle(info.input_q, structure) if info.input_q else None,
                    self._handle(info.output_q, structure) if info.output_q else None,
                )
            )
        return layers

    def quantizers(self) -> list[QuantizerHandle]:
        """Every NNCF quantizer, including those that feed no conv / linear (NNCF also quantizes
        residual branches, attention inputs, pooled features): in forward order once the model
        was traced, in hook-storage order before."""
        structure = self._structure()
        return [self._handle(name, structure) for name in structure.order]

    def norms(self) -> list[NormLayer]:
        return module_norms(self.model.named_modules())

    _EXTREMES = "nncf_batch_extremes"

    def measure_source(self, batches: Sequence[torch.Tensor]) -> dict[str, object]:
        """What :meth:`prepare_adaptation` needs of the source data: each activation quantizer's
        extremes in batch-statistics mode on the first 4 batches (none for a model without batch
        norm statistics)."""
        if not batches or not any(n.has_statistics for n in self.norms()):
            return {}
        device = next((t.device for t in self.model.parameters()), torch.device("cpu"))
        handles = _act_handles(self.model)
        first = [b.to(device) for b in batches[:4]]
        extremes = _activation_extremes(self.model, handles, first, "batch")
        return {
            self._EXTREMES: {
                name: (lo.detach().cpu(), hi.detach().cpu()) for name, (lo, hi) in extremes.items()
            }
        }

    def _source_extremes(
        self, handles: list[NNCFQuantizerHandle]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        """Batch-mode activation extremes on clean data: measured on the calibration sample when
        the model keeps one, else those ``qtta_plugins.quantize`` measured, while the model is
        still as quantized; ``None`` when neither is known."""
        sample = source_sample(self.model)
        if sample is not None and len(sample) >= 2:
            batches = [sample[i : i + 64] for i in range(0, min(len(sample), 256), 64)]
            return _activation_extremes(self.model, handles, batches, "batch")
        stats = kept_source_statistics(self.model)
        if stats is None or self._EXTREMES not in stats.adapter:
            return None
        kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = stats.adapter[self._EXTREMES]  # type: ignore[assignment]
        if any(h.name not in kept for h in handles) or not stats.matches(self):
            return None
        device = next((t.device for t in self.model.parameters()), torch.device("cpu"))
        return {name: (lo.to(device), hi.to(device)) for name, (lo, hi) in kept.items()}

    def prepare_adaptation(self) -> list[str]:
        """Two things keep adaptation from working on an NNCF model, both from calibrating under
        the running statistics: quantizers on norm affine parameters (named, see
        :func:`norm_parameter_quantizers`), and activation ranges that batch statistics overflow
        (recalibrated here from clean source data, see :func:`recalibrate_activations`: the
        calibration sample when ``quantize`` kept one, else the batch-mode extremes it measured,
        :meth:`measure_source`; without either, or on a model changed since, left as they are,
        with a message)."""
        messages = []
        clamped = norm_parameter_quantizers(self.model)
        if clamped:
            messages.append(
                f"NNCF quantizes the affine parameters of {len(clamped)} norm layer(s) "
                f"({clamped[0]}, ...) on a range calibrated on their source values: adapted "
                "values are clamped to it, so norm adaptation barely moves the output. Remove "
                "them first with qtta_nncf.view.release_norm_parameters(model) "
                "(qtta_plugins.quantize does)."
            )
        if not any(n.has_statistics for n in self.norms()):
            return messages
        handles = _act_handles(self.model)
        extremes = self._source_extremes(handles)
        if extremes is None:
            if kept_source_statistics(self.model) is not None:
                messages.append(
                    "NNCF activation ranges were not checked against batch statistics: the "
                    "source measurements qtta_plugins.quantize kept describe the model it "
                    "returned, and this one has changed since. Quantize with "
                    "keep_calibration_sample=True to have them measured on the model as it is."
                )
            return messages
        over = _overflowing(handles, extremes)
        if over:  # recalibrated from the same batch-mode measurement (recalibrate_activations)
            _write_ranges(handles, extremes)
            messages.append(
                f"{len(over)} NNCF activation range(s) (e.g. {over[0]}) were calibrated under "
                "running statistics that the source data's batch statistics overflow (a model "
                "whose running statistics are far from its batches'): every activation range was "
                "recalibrated on the source sample in batch-statistics mode, which adaptation runs in."
            )
        return messages

    # --- state ---------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, object]:
        """As :meth:`QuantView.snapshot`, plus the raw storage of quantizers that keep their range
        as a logarithm (``logarithm_scale``): NNCF's state dict holds ``exp(storage)``, a computed
        copy that a restore cannot write into."""
        state = super().snapshot()
        state["nncf_log_storage"] = {
            h.name: [p.detach().clone() for p in h._storage()]
            for h in self.quantizers()
            if h.module.is_using_log_scale_storage
        }
        return state

    def check_snapshot(self, snapshot: object) -> None:
        """As :meth:`QuantView.check_snapshot`, and the log-scale storage must name this model's
        quantizers with tensors of their storage's shapes."""
        super().check_snapshot(snapshot)
        saved = snapshot.get("nncf_log_storage", {})  # type: ignore[union-attr]
        if not isinstance(saved, dict):
            raise ValueError("snapshot['nncf_log_storage'] must map quantizer names to tensors")
        handles = {h.name: h for h in self.quantizers()}
        for name, values in saved.items():
            handle = handles.get(name)
            if handle is None:
                raise ValueError(
                    f"snapshot does not match this model: log-scale storage for {name!r}, "
                    "which is not one of its quantizers"
                )
            storage = handle._storage()
            if len(values) != len(storage) or any(
                not isinstance(v, torch.Tensor) or v.shape != p.shape
                for v, p in zip(values, storage, strict=False)
            ):
                raise ValueError(
                    f"snapshot does not match this model: log-scale storage of {name!r} has "
                    f"shapes {[tuple(getattr(v, 'shape', ())) for v in values]}, the quantizer's "
                    f"{[tuple(p.shape) for p in storage]}"
                )

    def restore(self, snapshot: dict[str, object]) -> None:
        super().restore(snapshot)  # checks the whole snapshot (check_snapshot) before writing
        saved: dict[str, list[torch.Tensor]] = snapshot.get("nncf_log_storage", {})  # type: ignore[assignment]
        with torch.no_grad():
            for handle in self.quantizers():
                for p, v in zip(handle._storage(), saved.get(handle.name, ()), strict=False):
                    p.copy_(v)

    @property
    def can_backprop(self) -> bool:
        return True

    def _apply_norm_mode(self, mode: NormMode) -> None:
        set_module_norm_mode(self.model, mode)


def recognise(model: nn.Module) -> NNCFView | None:
    """The view of a model quantized by ``nncf.quantize``, or ``None`` if this is not one."""
    if not quantizer_modules(model):
        return None
    return NNCFView(model)

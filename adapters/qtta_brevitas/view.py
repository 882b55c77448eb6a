"""Brevitas models seen through the uniform :class:`~qtta_plugins.view.QuantView`.

Any eager model holding Brevitas quant layers is recognised, whoever quantized it: ours
(:func:`qtta_brevitas.quantize.quantize`), Brevitas' ``layerwise_quantize`` / graph ``quantize``, or
a model written by hand from ``brevitas.nn.QuantConv2d`` / ``QuantLinear`` / ``QuantReLU`` /
``QuantIdentity`` with their default quantizers.

How Brevitas keeps what the uniform view exposes (measured on Brevitas 0.13.4):

* A quantizer is a *proxy* module (``weight_quant``, ``input_quant``, ``output_quant``, ``act_quant``)
  wrapping a ``tensor_quant`` (``RescalingIntQuant``): ``scale = scaling_impl(x) / int_threshold(b)``.
  ``scaling_impl.value`` is a *threshold* (the clipping range), so a new bit-width keeps the range
  and refines or coarsens the grid: nothing has to be re-derived.
* The bit-width is ``msb_clamp_bit_width_impl`` (``BitWidthConst``: a ``StatelessBuffer``, read on
  every call, *not* in the state dict), so it is settable in place.
* ``proxy.disable_quant`` switches a quantizer off (an activation proxy then still applies its
  activation, e.g. the ReLU of a ``QuantReLU``).
* Learned thresholds are lazily materialised: a ``PARAMETER_FROM_STATS`` weight threshold is
  initialised on the quantizer's first call, and a runtime-statistics activation threshold only after
  its collection phase; until then the state dict omits them or holds a *computed copy* that a
  restore cannot write into. :meth:`BrevitasView.snapshot` materialises them first (the function
  the model computes in eval mode does not change).
"""

from __future__ import annotations

import torch
from torch import nn

from qtta_plugins.view import (
    Grid,
    NormLayer,
    NormMode,
    QuantizerHandle,
    QuantLayer,
    QuantView,
    module_norms,
    set_module_norm_mode,
)

from ._backend import brevitas_module

# call_function / call_method targets whose output stays on its input's quantization grid
_GRID_PRESERVING = (
    "flatten",
    "reshape",
    "view",
    "permute",
    "transpose",
    "contiguous",
    "squeeze",
    "max_pool",
    "dropout",
    "getitem",
)


def _graph_nodes(model: nn.Module) -> list | None:
    """The FX graph's nodes of a ``GraphModule``: torch's, or Brevitas' backport of it
    (``brevitas.fx`` traces to ``brevitas.backport.fx.graph_module.GraphModule``, which is *not* a
    ``torch.fx.GraphModule``)."""
    nodes = getattr(getattr(model, "graph", None), "nodes", None)
    return list(nodes) if nodes is not None else None


def _is_node(obj: object) -> bool:
    return hasattr(obj, "op") and hasattr(obj, "target") and hasattr(obj, "args")


_PARAMETER_PROXY = object()


def _tensor_quant(proxy: nn.Module) -> nn.Module | None:
    """The proxy's quantizer proper, or ``None`` when the proxy quantizes nothing."""
    fused = getattr(proxy, "fused_activation_quant_proxy", _PARAMETER_PROXY)
    if fused is _PARAMETER_PROXY:  # a weight / bias proxy has no fused activation
        return getattr(proxy, "tensor_quant", None)
    if fused is None:
        return None
    tq = fused.tensor_quant
    if tq is None or type(tq).__name__ == "_TensorQuantDisabledIdentity":
        return None
    return tq


class _EvalMode:
    """Run a module in eval mode and put every submodule's training flag back afterwards."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.flags = [(m, m.training) for m in self.module.modules()]
        self.module.eval()

    def __exit__(self, *exc: object) -> None:
        for m, flag in self.flags:
            m.training = flag


def materialise(proxy: nn.Module) -> None:
    """Bring a proxy's lazily initialised thresholds into their final, learnable form.

    A ``PARAMETER_FROM_STATS`` weight threshold is initialised from the weight (what the first call
    would do); an activation threshold part-way through statistics collection is set to the
    collected statistic (what eval mode already uses). Neither changes the eval-mode function.
    """
    tq = _tensor_quant(proxy)
    if tq is None:
        return
    for module in tq.modules():
        if getattr(module, "init_done", True) is False:
            weights = getattr(proxy, "tracked_parameter_list", [])
            if weights:
                with torch.no_grad(), _EvalMode(tq):
                    tq(weights[0])
        counter = getattr(module, "counter", None)
        steps = getattr(module, "collect_stats_steps", None)
        if (
            isinstance(counter, int)
            and isinstance(steps, int)
            and 0 < counter <= steps
            and hasattr(module, "init_scale")
        ):
            with torch.no_grad():
                module.init_scale()


class BrevitasQuantizerHandle(QuantizerHandle):
    """One Brevitas quant proxy (weight, input, output or activation quantizer)."""

    def __init__(self, name: str, proxy: nn.Module, role: str) -> None:
        self.name, self.proxy, self.role = name, proxy, role  # type: ignore[assignment]
        #: bias quantizers whose scale is this quantizer's times another's (Int32Bias, what
        #: ``layerwise_quantize`` gives every conv / linear: input scale x weight scale): with
        #: either unquantized they have no scale and raise, so they go off with the first of the
        #: two and back on with the last
        self.bias_proxies: list[nn.Module] = []

    @property
    def tensor_quant(self) -> nn.Module:
        tq = _tensor_quant(self.proxy)
        if tq is None:  # pragma: no cover - handles are only made for proxies that quantize
            raise RuntimeError(f"{self.name} has no quantizer")
        return tq

    # --- bit-width ---------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        impl = getattr(self.tensor_quant, "msb_clamp_bit_width_impl", None)
        if impl is not None:
            return round(float(impl()))
        return round(float(self.proxy.bit_width()))  # pragma: no cover - non-integer quantizers

    @bits.setter
    def bits(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or not 2 <= value <= 8:
            raise ValueError(f"bit-width must be an int in 2..8, got {value!r}")
        impl = getattr(self.tensor_quant, "msb_clamp_bit_width_impl", None)
        holder = getattr(impl, "bit_width", None)
        # BitWidthConst keeps it in a StatelessBuffer (.value), BitWidthStatefulConst in a buffer.
        target = getattr(holder, "value", holder)
        if not isinstance(target, torch.Tensor) or isinstance(target, nn.Parameter):
            raise NotImplementedError(
                f"{self.name}: the bit-width of a {type(impl).__name__} cannot be set (only "
                "BitWidthConst / BitWidthStatefulConst, Brevitas' default, can)"
            )
        with torch.no_grad():
            target.fill_(float(value))
        self._clear_cache()

    # --- on / off ------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return not self.proxy.disable_quant

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.proxy.disable_quant = not bool(value)
        for bias in self.bias_proxies:
            off_by: set[str] | None = bias.__dict__.get("_qtta_off_by")
            if not value and (off_by is not None or not bias.disable_quant):
                bias.disable_quant = True
                bias.__dict__.setdefault("_qtta_off_by", set()).add(self.name)
            elif value and off_by is not None:
                off_by.discard(self.name)
                if not off_by:
                    del bias.__dict__["_qtta_off_by"]
                    bias.disable_quant = False
        self._clear_cache()

    def _clear_cache(self) -> None:
        for attr in ("_cached_weight", "_cached_act"):
            if getattr(self.proxy, attr, None) is not None:
                setattr(self.proxy, attr, None)

    # --- grid ----------------------------------------------------------------------------------
    @property
    def qrange(self) -> tuple[int, int]:
        brevitas_module()
        from brevitas.function.ops import max_int, min_int

        signed = bool(self.proxy.is_signed) if self.proxy.is_signed is not None else True
        narrow = bool(self.proxy.is_narrow_range)
        bits = torch.tensor(float(self.bits))
        return int(min_int(signed, narrow, bits)), int(max_int(signed, narrow, bits))

    def _scale(self) -> torch.Tensor:
        """The current scale, computed by the quantizer itself (eval mode, no statistics taken)."""
        weights = getattr(self.proxy, "tracked_parameter_list", None)
        x = weights[0] if self.role == "weight" and weights else self.proxy._zero_hw_sentinel()
        with torch.no_grad(), _EvalMode(self.tensor_quant):
            return self.tensor_quant(x)[1].detach()

    @property
    def ch_axis(self) -> int | None:
        scale = self._scale()
        if scale.numel() <= 1:
            return None
        return next(d for d, n in enumerate(scale.shape) if n > 1)

    def input_module(self) -> nn.Module:
        """The proxy's tensor quantizer: it receives the tensor to quantize after the proxy's
        activation (a ``QuantReLU``'s ReLU), and runs only while quantization is enabled."""
        return self.tensor_quant

    def params(self) -> dict[str, torch.Tensor]:
        """Brevitas' own parameters of this quantizer, by their names under the proxy (e.g.
        ``tensor_quant.scaling_impl.value``, a threshold: ``scale = value / int_threshold``); a
        quantizer whose scale is recomputed from statistics on every call has none, and gets its
        current ``scale`` instead."""
        found = dict(self.proxy.named_parameters())
        return found or {"scale": self._scale()}

    def grid(self) -> Grid:
        """Scale and zero point as the quantizer computes them in eval mode (for a weight
        quantizer: from the current weight; no statistics are taken). Brevitas' ``IntQuant``
        computes ``(clamp(round(x / scale + zp), min_int, max_int) - zp) * scale`` with
        ``torch.round``, which is
        :func:`~qtta_plugins.view.fake_quantize` to the last bit. A fused activation (the ReLU of
        a ``QuantReLU``) is applied before this grid."""
        weights = getattr(self.proxy, "tracked_parameter_list", None)
        x = weights[0] if self.role == "weight" and weights else self.proxy._zero_hw_sentinel()
        with torch.no_grad(), _EvalMode(self.tensor_quant):
            _, scale, zero_point, _ = self.tensor_quant(x)[:4]
        scale = scale.detach().float()
        zero_point = torch.as_tensor(zero_point).detach().float().expand_as(scale)
        axes = [d for d, n in enumerate(scale.shape) if n > 1]
        if len(axes) > 1:
            raise NotImplementedError(
                f"{self.name}: scale of shape {tuple(scale.shape)} varies along several axes"
            )
        axis = axes[0] if axes else None
        shape = (-1,) if axis is not None else ()
        return Grid(
            scale.reshape(shape).clone(), zero_point.reshape(shape).clone(), *self.qrange, axis
        )

    def set_grid(self, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> None:
        """Into the learned threshold ``tensor_quant.scaling_impl.value``:
        ``value = scale * int_threshold`` (``int_threshold = int_scaling_impl(bit_width)``, e.g.
        ``2^(b-1)`` signed, ``2^(b-1) - 1`` signed narrow, ``2^b - 1`` unsigned), materialised
        first (see :func:`materialise`). Raises ``NotImplementedError`` for a scale recomputed from
        statistics on every call (no ``value`` parameter: Brevitas' default weight quantizers), a
        restricted scale (power-of-two: the written value would not come back), or a new zero
        point (Brevitas' integer quantizers here have ``ZeroZeroPoint``)."""
        current = self.grid()
        new = current.with_values(scale, zero_point)
        if not torch.equal(new.zero_point, current.zero_point):
            raise NotImplementedError(
                f"{self.name}: writing a Brevitas zero point is not supported (this quantizer's "
                "zero point is fixed)"
            )
        tq = self.tensor_quant
        scaling = getattr(tq, "scaling_impl", None)
        value = getattr(scaling, "value", None)
        if not isinstance(value, nn.Parameter):
            raise NotImplementedError(
                f"{self.name}: this Brevitas quantizer ({type(scaling).__name__}) recomputes its "
                "scale from statistics of its input on every call, so no scale can be written "
                "(quantize with scaling_impl_type=PARAMETER_FROM_STATS for a stored one)"
            )
        materialise(self.proxy)
        if getattr(scaling, "counter", None) == 0 and hasattr(scaling, "init_scale"):
            with torch.no_grad():
                scaling.init_scale()  # never calibrated: leave the statistics phase now
        old = value.detach().clone()
        with torch.no_grad():
            threshold = tq.int_scaling_impl(tq.msb_clamp_bit_width_impl()).detach()
            value.copy_((new.scale * threshold).reshape(value.shape).to(value.dtype))
        self._clear_cache()
        written = self.grid().scale
        if not torch.allclose(written, new.scale, rtol=1e-5, atol=0.0):
            with torch.no_grad():
                value.copy_(old)
            self._clear_cache()
            raise NotImplementedError(
                f"{self.name}: the scale written into scaling_impl.value did not come back (a "
                "restricted scale, e.g. power-of-two); only float thresholds can be set"
            )

    def set_trainable(self, flag: bool = True) -> list[nn.Parameter]:
        scaling = getattr(self.tensor_quant, "scaling_impl", None)
        if flag and scaling is not None:
            materialise(self.proxy)
            counter = getattr(scaling, "counter", None)
            if counter == 0 and hasattr(scaling, "init_scale"):
                with torch.no_grad():
                    scaling.init_scale()  # never calibrated: learn from its initial threshold
        params = list(self.proxy.parameters())
        if not params:
            raise NotImplementedError(
                f"{self.name}: this Brevitas quantizer recomputes its scale from statistics on every "
                "call, so there is no scale parameter to train (quantize with "
                "scaling_impl_type=PARAMETER_FROM_STATS for learnable weight scales)"
            )
        for p in params:
            p.requires_grad_(flag)
        return params


def _is_compute_layer(module: nn.Module) -> bool:
    brevitas_module()
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer as QuantWBIOL

    return isinstance(module, QuantWBIOL)


def _is_act_layer(module: nn.Module) -> bool:
    brevitas_module()
    from brevitas.nn.quant_layer import QuantNonLinearActLayer

    return isinstance(module, QuantNonLinearActLayer)


class BrevitasView(QuantView):
    """An eager model with Brevitas quant layers; fake-quant throughout, so gradients flow.

    Eager models: layers are listed in module registration order, which is the forward order of
    models whose ``__init__`` creates layers in the order ``forward`` uses them (ours and most
    others'). A layer's input quantizer is its own ``input_quant`` when it has one; otherwise the
    ``act_quant`` of the last ``QuantReLU`` / ``QuantIdentity`` / ... registered since the previous
    compute layer, or else that layer's ``output_quant`` (a registration-order reading of the data
    flow; ``None`` when neither). FX graph modules (Brevitas' graph ``quantize``) are read from the
    graph: call order, and the module that actually produces each layer's input.
    """

    backend = "brevitas"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.sample_shape = None
        self._handles: dict[int, BrevitasQuantizerHandle] = {}

    def _handle(self, name: str, proxy: nn.Module | None, role: str):
        if proxy is None or _tensor_quant(proxy) is None:
            return None
        handle = self._handles.get(id(proxy))
        if handle is None or handle.proxy is not proxy:
            handle = self._handles[id(proxy)] = BrevitasQuantizerHandle(name, proxy, role)
        return handle

    def _in_forward_order(self) -> list[tuple[str, nn.Module]]:
        """Named modules in forward order: graph order for an FX ``GraphModule`` (Brevitas' graph
        ``quantize`` inserts its activation quantizers as new, last-registered modules),
        registration order otherwise."""
        named = list(self.model.named_modules())
        nodes = _graph_nodes(self.model)
        if nodes is None:
            return named
        rank: dict[str, int] = {}
        for node in nodes:
            if node.op == "call_module":
                rank.setdefault(str(node.target), len(rank))
        order = {name: i for i, (name, _) in enumerate(named)}
        return sorted(named, key=lambda item: (rank.get(item[0], len(rank)), order[item[0]]))

    def _graph_sources(self) -> dict[str, str | None]:
        """For an FX ``GraphModule``: compute layer -> the module whose output it reads, looking
        back through ops that keep values on the quantization grid (reshapes, max-pooling...)."""
        nodes = _graph_nodes(self.model)
        if nodes is None:
            return {}
        sources: dict[str, str | None] = {}
        for node in nodes:
            if node.op != "call_module":
                continue
            source = node.args[0] if node.args else None
            while (
                _is_node(source)
                and source.op in ("call_function", "call_method")
                and any(op in str(source.target) for op in _GRID_PRESERVING)
                and source.args
            ):
                source = source.args[0]
            sources.setdefault(
                str(node.target),
                str(source.target) if _is_node(source) and source.op == "call_module" else None,
            )
        return sources

    def _output_handle(self, name: str, module: nn.Module):
        if _is_act_layer(module):
            return self._handle(f"{name}.act_quant", getattr(module, "act_quant", None), "act")
        if _is_compute_layer(module):
            return self._handle(f"{name}.output_quant", module.output_quant, "act")
        return None

    def layers(self) -> list[QuantLayer]:
        layers: list[QuantLayer] = []
        sources = self._graph_sources()
        modules = dict(self.model.named_modules())
        # graph: an activation quantizer reading a compute layer's output directly is its output one
        consumers: dict[str, str] = {}
        for consumer, source in sources.items():
            if source is not None and _is_act_layer(modules[consumer]):
                consumers.setdefault(source, consumer)
        feeding: BrevitasQuantizerHandle | None = None  # the output quantizer seen last
        for name, module in self._in_forward_order():
            if _is_act_layer(module):
                # its output feeds what follows; unquantized (act_quant=None), nothing does
                feeding = self._output_handle(name, module)
                continue
            if not _is_compute_layer(module):
                continue
            if name in sources:  # graph: the actual producer of this layer's input
                source = sources[name]
                feeding = None if source is None else self._output_handle(source, modules[source])
            kind = "linear" if isinstance(module, nn.Linear) else "conv"
            own_input = self._handle(f"{name}.input_quant", module.input_quant, "act")
            output = self._output_handle(name, module)
            if output is None and name in consumers:
                output = self._output_handle(consumers[name], modules[consumers[name]])
            input_handle = own_input or feeding
            weight_handle = self._handle(f"{name}.weight_quant", module.weight_quant, "weight")
            bias = getattr(module, "bias_quant", None)
            if getattr(bias, "requires_input_scale", False):
                for handle in (input_handle, weight_handle):
                    if handle is not None and not any(b is bias for b in handle.bias_proxies):
                        handle.bias_proxies.append(bias)
            layers.append(
                QuantLayer(name, kind, module.weight, weight_handle, input_handle, output)
            )
            feeding = self._output_handle(name, module)
        return layers

    def norms(self) -> list[NormLayer]:
        return module_norms(self._in_forward_order())

    @property
    def can_backprop(self) -> bool:
        return True  # fake quantization with straight-through rounding

    def _apply_norm_mode(self, mode: NormMode) -> None:
        # eval() also stops Brevitas' activation quantizers from collecting statistics.
        set_module_norm_mode(self.model, mode)

    def set_layer_weight(self, layer: QuantLayer, weight: torch.Tensor) -> None:
        """Into the module's ``weight`` parameter. A learned (``PARAMETER_FROM_STATS``) weight
        threshold is materialised from the *current* weight first, so the new weight is quantized
        on the grid read before; a stats-based weight scale is recomputed from the new weight
        (the precondition of :meth:`QuantView.set_layer_weight`)."""
        handle = layer.weight_quantizer
        if isinstance(handle, BrevitasQuantizerHandle):
            materialise(handle.proxy)
        super().set_layer_weight(layer, weight)
        if isinstance(handle, BrevitasQuantizerHandle):
            handle._clear_cache()

    # --- state ---------------------------------------------------------------------------------
    def _materialise(self) -> None:
        brevitas_module()
        from brevitas.proxy.quant_proxy import QuantProxyFromInjector

        for module in self.model.modules():
            if isinstance(module, QuantProxyFromInjector):
                materialise(module)

    def snapshot(self) -> dict[str, object]:
        """As :meth:`QuantView.snapshot`, after materialising Brevitas' lazily initialised
        thresholds, so that every threshold is in the state dict as itself (not as a copy)."""
        self._materialise()
        return super().snapshot()

    def restore(self, snapshot: dict[str, object]) -> None:
        self._materialise()
        super().restore(snapshot)


def recognise(model: nn.Module) -> QuantView | None:
    """A :class:`BrevitasView` for a model holding Brevitas quant layers, or ``None``."""
    if any(_is_compute_layer(m) or _is_act_layer(m) for m in model.modules()):
        return BrevitasView(model)
    return None

"""torchao models seen through the uniform :class:`~qtta_plugins.view.QuantView`.

Three kinds of torchao model are recognised, whoever quantized them:

* :class:`Pt2eView` - a pt2e graph prepared with fake-quant (``prepare_pt2e`` / ``prepare_qat_pt2e``):
  quantizers are ``FakeQuantize`` modules in the graph, norms are ``aten.batch_norm`` / ``layer_norm``
  nodes; gradients flow.
* :class:`ConvertedView` - the integer Q/DQ graph of ``convert_pt2e``: weights are frozen integer
  constants, batch norms are folded; forward-only.
* :class:`ModuleView` - an eager model whose Linear layers went through ``quantize_``: QAT
  (``FakeQuantizedLinear``, gradients flow) or a weight tensor subclass such as
  ``Int8DynamicActivationInt8WeightConfig``'s (forward-only: those cut autograd).
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
    bits_of,
    module_norms,
    set_module_norm_mode,
)

from .quantize import get_tensor, is_compute_node, set_batchnorm_mode


def _from_torchao(obj: object) -> bool:
    return type(obj).__module__.startswith("torchao.")


# --- quantizer handles ---------------------------------------------------------------------------
class FakeQuantizeHandle(QuantizerHandle):
    """A pt2e ``FakeQuantize`` module (scale and zero-point are buffers set by its observer)."""

    def __init__(self, name: str, module: nn.Module, role: str) -> None:
        self.name, self.module, self.role = name, module, role  # type: ignore[assignment]

    @property
    def qrange(self) -> tuple[int, int]:
        return int(self.module.quant_min), int(self.module.quant_max)

    @property
    def bits(self) -> int:
        return bits_of(*self.qrange)

    @bits.setter
    def bits(self, value: int) -> None:
        if not isinstance(value, int) or not 2 <= value <= 8:
            raise ValueError(f"bit-width must be an int in 2..8, got {value!r}")
        qmin, qmax = self.qrange
        if qmin < 0 and qmin == -qmax:  # restricted symmetric, e.g. -7..7
            new = (-(2 ** (value - 1) - 1), 2 ** (value - 1) - 1)
        elif qmin < 0:
            new = (-(2 ** (value - 1)), 2 ** (value - 1) - 1)
        else:
            new = (0, 2**value - 1)
        fq, obs = self.module, self.module.activation_post_process
        fq.quant_min, fq.quant_max = new
        obs.quant_min, obs.quant_max = new
        # Re-derive the scale from the range the observer recorded during calibration.
        if getattr(obs, "min_val", torch.empty(0)).numel() and torch.isfinite(obs.min_val).all():
            scale, zero_point = obs.calculate_qparams()
            fq.scale.resize_(scale.shape).copy_(scale)
            fq.zero_point.resize_(zero_point.shape).copy_(zero_point)

    @property
    def enabled(self) -> bool:
        return bool(self.module.fake_quant_enabled[0])

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.module.enable_fake_quant(bool(value))

    @property
    def ch_axis(self) -> int | None:
        per_channel = self.module.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine)
        return int(self.module.ch_axis) if per_channel else None

    def params(self) -> dict[str, torch.Tensor]:
        return {"scale": self.module.scale, "zero_point": self.module.zero_point}

    def grid(self) -> Grid:
        """``scale`` / ``zero_point`` buffers as they are: ``FakeQuantize`` runs
        ``torch.fake_quantize_per_{tensor,channel}_affine`` on them (``round(x * (1 / s))``, half
        to even)."""
        axis = self.ch_axis
        scale = self.module.scale.detach().float().clone()
        zero_point = self.module.zero_point.detach().float().clone()
        if axis is None:
            scale, zero_point = scale.reshape(()), zero_point.reshape(())
        return Grid(scale, zero_point, *self.qrange, axis)

    def set_grid(self, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> None:
        """Into the ``scale`` (float) and ``zero_point`` (int) buffers, and into the observer's
        recorded range: ``convert_pt2e`` takes its quantize parameters from the observer
        (``calculate_qparams()``), not from the buffers, so the range is set to the one that
        yields exactly this grid. The observer is then switched off: while on, every forward
        would re-derive the buffers from newly observed statistics."""
        current = self.grid()
        new = current.with_values(scale, zero_point)
        symmetric = self.module.qscheme in (torch.per_tensor_symmetric, torch.per_channel_symmetric)
        if symmetric and not torch.equal(new.zero_point, current.zero_point):
            raise NotImplementedError(f"{self.name}: a symmetric FakeQuantize keeps its zero point")
        fq, obs = self.module, self.module.activation_post_process
        with torch.no_grad():
            fq.scale.copy_(new.scale.reshape(fq.scale.shape).to(fq.scale.dtype))
            fq.zero_point.copy_(new.zero_point.reshape(fq.zero_point.shape).to(fq.zero_point.dtype))
            if isinstance(getattr(obs, "min_val", None), torch.Tensor):
                if symmetric:  # the observer's scale is max(|lo|, hi) / ((qmax - qmin) / 2)
                    hi = new.scale * (new.qmax - new.qmin) / 2
                    lo = -hi
                else:  # scale = (hi - lo) / (qmax - qmin), zero point = qmin - round(lo / scale)
                    lo = (new.qmin - new.zero_point) * new.scale
                    hi = (new.qmax - new.zero_point) * new.scale
                shape = fq.scale.shape
                obs.min_val.resize_(shape).copy_(lo.reshape(shape).to(obs.min_val.dtype))
                obs.max_val.resize_(shape).copy_(hi.reshape(shape).to(obs.max_val.dtype))
        fq.disable_observer()


class IntxFakeQuantizerHandle(QuantizerHandle):
    """torchao QAT's ``IntxFakeQuantizer`` (on a ``FakeQuantizedLinear``)."""

    def __init__(
        self, name: str, module: nn.Module, role: str, weight: torch.Tensor | None
    ) -> None:
        self.name, self.module, self.role, self._weight = name, module, role, weight  # type: ignore[assignment]

    @property
    def qrange(self) -> tuple[int, int]:
        from torchao.quantization.quant_primitives import _DTYPE_TO_QVALUE_BOUNDS

        return tuple(_DTYPE_TO_QVALUE_BOUNDS[self.module.config.dtype])  # type: ignore[return-value]

    @property
    def bits(self) -> int:
        return bits_of(*self.qrange)

    @bits.setter
    def bits(self, value: int) -> None:
        if not isinstance(value, int) or not 2 <= value <= 8:
            raise ValueError(f"bit-width must be an int in 2..8, got {value!r}")
        signed = self.qrange[0] < 0
        self.module.config.dtype = getattr(torch, f"{'int' if signed else 'uint'}{value}")
        if not self.module.config.is_dynamic:
            # Static scales belong to the old grid: re-initialise them from the weight. They may be
            # registered Parameters (range learning), which cannot be re-assigned plain tensors.
            for name in ("scale", "zero_point"):
                self.module._parameters.pop(name, None)
                setattr(self.module, name, None)
            if self._weight is not None:
                with torch.no_grad():
                    self.module(self._weight)

    @property
    def enabled(self) -> bool:
        return bool(self.module.enabled)

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.module.enabled = bool(value)

    @property
    def ch_axis(self) -> int | None:
        axis = getattr(self.module.config.granularity, "axis", None)
        return int(axis) if axis is not None else None

    def params(self) -> dict[str, torch.Tensor]:
        if self.module.config.is_dynamic:
            return {}
        return {"scale": self.module.scale, "zero_point": self.module.zero_point}

    def _static_per_channel(self) -> None:
        config = self.module.config
        if config.is_dynamic:
            raise NotImplementedError(
                f"{self.name}: a dynamic torchao fake quantizer computes its scale from each input "
                f"({type(config.granularity).__name__}); it has no fixed grid"
            )
        if self.ch_axis is None:  # PerGroup: one scale per group of a row, not one per channel
            raise NotImplementedError(
                f"{self.name}: {type(config.granularity).__name__} scales are not a per-tensor / "
                "per-channel grid"
            )
        if self.module.scale is None or self.module.zero_point is None:
            raise NotImplementedError(
                f"{self.name}: scales are not initialised yet (run the model, or "
                "initialize_fake_quantizers, once)"
            )

    def grid(self) -> Grid:
        """Static per-channel (``PerAxis(0)``) quantizers: ``scale`` / ``zero_point`` of shape
        ``(C, 1)`` flattened; torchao computes ``round(x * (1 / s)) + zp`` (half to even)."""
        self._static_per_channel()
        scale = self.module.scale.detach().float().reshape(-1).clone()
        zero_point = self.module.zero_point.detach().float().reshape(-1).clone()
        return Grid(scale, zero_point, *self.qrange, self.ch_axis)

    def set_grid(self, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> None:
        """In place into ``scale`` / ``zero_point`` (tensors, or Parameters under range
        learning); a symmetric config's zero point stays 0."""
        self._static_per_channel()
        current = self.grid()
        new = current.with_values(scale, zero_point)
        if self.module.config.is_symmetric and not torch.equal(new.zero_point, current.zero_point):
            raise NotImplementedError(f"{self.name}: a symmetric quantizer keeps its zero point 0")
        with torch.no_grad():
            for target, value in (
                (self.module.scale, new.scale),
                (self.module.zero_point, new.zero_point),
            ):
                target.copy_(value.reshape(target.shape).to(target.dtype))

    def set_trainable(self, flag: bool = True) -> list[nn.Parameter]:
        scale = self.module.scale
        if not isinstance(scale, nn.Parameter):
            raise NotImplementedError(
                f"{self.name}: scale is not learnable (dynamic quantizer, or range_learning=False)"
            )
        scale.requires_grad_(flag)
        return [scale]


class ConstantQuantizerHandle(QuantizerHandle):
    """A quantize/dequantize pair of a converted graph: parameters are constants, read-only."""

    def __init__(self, name: str, node: torch.fx.Node, role: str, gm: torch.fx.GraphModule) -> None:
        self.name, self.node, self.role, self.gm = name, node, role, gm  # type: ignore[assignment]
        per_channel = "per_channel" in str(node.target)
        # per_tensor: (x, scale, zp, qmin, qmax, dtype); per_channel: (x, scale, zp, axis, qmin, qmax, dtype)
        self._range_at = 4 if per_channel else 3
        self._axis = node.args[3] if per_channel else None

    def _value(self, arg: object) -> object:
        if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
            return getattr(self.gm, str(arg.target))
        return arg

    @property
    def qrange(self) -> tuple[int, int]:
        return int(self.node.args[self._range_at]), int(self.node.args[self._range_at + 1])

    @property
    def bits(self) -> int:
        return bits_of(*self.qrange)

    @bits.setter
    def bits(self, value: int) -> None:
        raise NotImplementedError(
            f"{self.name}: a convert_pt2e model stores integer weights; change bit-widths on the "
            "prepared model, before convert_pt2e"
        )

    @property
    def enabled(self) -> bool:
        return True

    @enabled.setter
    def enabled(self, value: bool) -> None:
        raise NotImplementedError(f"{self.name}: a convert_pt2e model cannot turn quantization off")

    @property
    def ch_axis(self) -> int | None:
        return int(self._axis) if self._axis is not None else None

    def params(self) -> dict[str, torch.Tensor]:
        return {
            "scale": torch.as_tensor(self._value(self.node.args[1])),
            "zero_point": torch.as_tensor(self._value(self.node.args[2])),
        }

    def grid(self) -> Grid:
        """The constants of the dequantize node (its quantize twin has the same ones)."""
        params = self.params()
        scale = params["scale"].detach().float().clone()
        zero_point = params["zero_point"].detach().float().clone()
        if self._axis is None:
            scale, zero_point = scale.reshape(()), zero_point.reshape(())
        return Grid(scale, zero_point, *self.qrange, self.ch_axis)

    def set_grid(self, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> None:
        raise NotImplementedError(
            f"{self.name}: a convert_pt2e model holds integer weights quantized with these "
            "constants; set grids on the prepared model, before convert_pt2e"
        )


# --- graph helpers -------------------------------------------------------------------------------
def _find_param_target(node: object, gm: torch.fx.GraphModule, depth: int = 6) -> str | None:
    """The ``get_attr`` parameter feeding ``node`` (through a fake-quant / fold pattern)."""
    if not isinstance(node, torch.fx.Node) or depth < 0:
        return None
    if node.op == "get_attr":
        return str(node.target)
    for arg in node.args:
        found = _find_param_target(arg, gm, depth - 1)
        if found is not None and found.endswith("weight"):
            return found
    return None


def _bias_of(node: torch.fx.Node, gm: torch.fx.GraphModule) -> torch.Tensor | None:
    """A conv / linear node's float bias, where it is a graph attribute (not computed)."""
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if not (isinstance(bias, torch.fx.Node) and bias.op == "get_attr"):
        return None
    tensor = get_tensor(gm, str(bias.target))
    return tensor if tensor.is_floating_point() else None


def _module_of(node: object, gm: torch.fx.GraphModule) -> nn.Module | None:
    if isinstance(node, torch.fx.Node) and node.op == "call_module":
        return gm.get_submodule(str(node.target))
    return None


def _sample_shape(gm: torch.fx.GraphModule) -> tuple[int, ...] | None:
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            shape = getattr(val, "shape", None)
            if shape is not None and all(isinstance(s, int) for s in shape[1:]):
                return tuple(int(s) for s in shape[1:])
            return None
    return None


def _graph_norms(gm: torch.fx.GraphModule) -> list[NormLayer]:
    norms = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        if target is torch.ops.aten.batch_norm.default:
            weight, bias, mean, var = node.args[1:5]
            kind = "batch"
        elif target is torch.ops.aten.layer_norm.default:
            weight = node.args[2] if len(node.args) > 2 else None
            bias = node.args[3] if len(node.args) > 3 else None
            mean = var = None
            kind = "layer"
        elif target is torch.ops.aten.group_norm.default:
            weight = node.args[2] if len(node.args) > 2 else None
            bias = node.args[3] if len(node.args) > 3 else None
            mean = var = None
            kind = "group"
        else:
            continue

        def fetch(arg: object) -> torch.Tensor | None:
            if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
                return get_tensor(gm, str(arg.target))
            return None

        w = fetch(weight)
        name = (
            str(weight.target).rsplit(".", 1)[0] if isinstance(weight, torch.fx.Node) else node.name
        )
        norms.append(NormLayer(name, kind, w, fetch(bias), fetch(mean), fetch(var)))  # type: ignore[arg-type]
    return norms


# --- views ---------------------------------------------------------------------------------------
class Pt2eView(QuantView):
    """A pt2e graph with fake-quant modules (prepared, not converted)."""

    backend = "torchao"

    def __init__(self, model: torch.fx.GraphModule) -> None:
        super().__init__(model)
        self.sample_shape = _sample_shape(model)
        self._norm_mode = "batch" if self._bn_training() else "source"

    def _bn_training(self) -> bool:
        flags = [
            bool(n.args[5])
            for n in self.model.graph.nodes
            if n.op == "call_function" and n.target is torch.ops.aten.batch_norm.default
        ]
        return bool(flags) and all(flags)

    def layers(self) -> list[QuantLayer]:
        gm = self.model
        layers = []
        for node in gm.graph.nodes:
            kind = is_compute_node(node)
            if kind is None:
                continue
            w_fq = _module_of(node.args[1], gm)
            x_fq = _module_of(node.args[0], gm)
            target = _find_param_target(node.args[1], gm) or node.name
            name = target[: -len(".weight")] if target.endswith(".weight") else target
            weight = get_tensor(gm, target) if target != node.name else torch.empty(0)
            w_handle = (
                FakeQuantizeHandle(f"{name}.weight_quantizer", w_fq, "weight")
                if w_fq is not None and hasattr(w_fq, "fake_quant_enabled")
                else None
            )
            x_handle = (
                FakeQuantizeHandle(f"{name}.input_quantizer", x_fq, "act")
                if x_fq is not None and hasattr(x_fq, "fake_quant_enabled")
                else None
            )
            layers.append(QuantLayer(name, kind, weight, w_handle, x_handle))  # type: ignore[arg-type]
        # A layer's output quantizer is the next layer's input quantizer when nothing sits between.
        return _dedupe_handles(layers)

    def quantizers(self) -> list[QuantizerHandle]:
        """Every fake-quantizer of the graph, in graph order: those of the conv / linear layers,
        and those a quantizer placed elsewhere (X86InductorQuantizer also quantizes pooling,
        residual-add and concatenation outputs), named by their graph module."""
        by_module = {id(q.module): q for q in super().quantizers()}
        handles: dict[int, QuantizerHandle] = {}
        for node in self.model.graph.nodes:
            if node.op != "call_module":
                continue
            module = self.model.get_submodule(node.target)
            if not hasattr(module, "fake_quant_enabled") or id(module) in handles:
                continue
            handles[id(module)] = by_module.get(id(module)) or FakeQuantizeHandle(
                str(node.target), module, "act"
            )
        return list(handles.values())

    def norms(self) -> list[NormLayer]:
        return _graph_norms(self.model)

    def layer_bias(self, layer: QuantLayer) -> torch.Tensor | None:
        return _bias_of(_compute_nodes(self.model)[self._index(layer)], self.model)

    def layer_input_module(self, layer: QuantLayer) -> nn.Module:
        # The layer's input FakeQuantize module: its forward input is the unquantized activation.
        handle = layer.input_quantizer
        if handle is None or not hasattr(handle, "module"):
            return _input_tap(self.model, _compute_nodes(self.model)[self._index(layer)])
        return handle.module

    def norm_input_module(self, norm: NormLayer) -> nn.Module:
        return _norm_tap(self.model, norm.name)

    def _index(self, layer: QuantLayer) -> int:
        return [x.name for x in self.layers()].index(layer.name)

    def _weight_source(self, layer: QuantLayer) -> torch.fx.Node:
        """The graph node whose value ``layer``'s weight quantizer quantizes."""
        w_node = _compute_nodes(self.model)[self._index(layer)].args[1]
        if _module_of(w_node, self.model) is not None:  # the weight FakeQuantize
            w_node = w_node.args[0]
        if not isinstance(w_node, torch.fx.Node):
            raise NotImplementedError(f"{layer.name}: the weight is not a graph value")
        return w_node

    def _weight_fold(self, layer: QuantLayer) -> torch.Tensor | None:
        """The factor the graph multiplies the weight attribute by before quantizing it (the QAT
        batch-norm fold ``gamma / sqrt(running_var + eps)``, shaped to broadcast), or ``None``
        when the quantizer reads the attribute itself."""
        source = self._weight_source(layer)
        if source.op == "get_attr":
            return None
        if source.op == "call_function" and source.target is torch.ops.aten.mul.Tensor:
            for this, other in (source.args, source.args[::-1]):
                if (
                    isinstance(this, torch.fx.Node)
                    and this.op == "get_attr"
                    and get_tensor(self.model, str(this.target)) is layer.weight
                ):
                    return _evaluate(other, self.model)
        raise NotImplementedError(
            f"{layer.name}: the weight reaches its quantizer through {source.target}, which this "
            "view cannot invert"
        )

    def weight_quantizer_input(self, layer: QuantLayer) -> torch.Tensor:
        """The weight as the weight ``FakeQuantize`` sees it: in a QAT graph with batch norms,
        the conv weight times ``gamma / sqrt(running_var + eps)`` (the fold ``convert_pt2e`` will
        make), not ``layer.weight``."""
        with torch.no_grad():
            return _evaluate(self._weight_source(layer), self.model).detach()

    def set_layer_weight(self, layer: QuantLayer, weight: torch.Tensor) -> None:
        """Writes ``weight / fold`` into the graph's weight attribute (``fold`` the batch-norm
        factor of :meth:`weight_quantizer_input`; 1 without one), so the quantizer sees
        ``weight`` again up to an ulp, which does not move a value that lies on the grid."""
        if layer.weight.numel() == 0:
            raise NotImplementedError(f"{layer.name}: no weight attribute found in the graph")
        self._check_weight_shape(layer, weight, layer.weight.shape)
        fold = self._weight_fold(layer)
        with torch.no_grad():
            if fold is None:
                layer.weight.copy_(weight)
                return
            if (fold == 0).any():
                raise NotImplementedError(
                    f"{layer.name}: a folded batch norm has gamma = 0 on some channel; the weight "
                    "there cannot be recovered"
                )
            layer.weight.copy_(weight / fold)

    @property
    def can_backprop(self) -> bool:
        return True

    def _apply_norm_mode(self, mode: NormMode) -> None:
        set_batchnorm_mode(self.model, use_batch_stats=mode == "batch")


def _evaluate(value: object, gm: torch.fx.GraphModule, depth: int = 16) -> object:
    """The value of a constant sub-graph (attributes and the ops on them, no graph input)."""
    if not isinstance(value, torch.fx.Node):
        return value
    if value.op == "get_attr":
        return get_tensor(gm, str(value.target))
    if value.op != "call_function" or depth == 0:
        raise NotImplementedError(f"{value.name} does not depend on attributes only")
    args = torch.fx.node.map_arg(value.args, lambda n: _evaluate(n, gm, depth - 1))
    kwargs = torch.fx.node.map_arg(value.kwargs, lambda n: _evaluate(n, gm, depth - 1))
    return value.target(*args, **kwargs)


def _dedupe_handles(layers: list[QuantLayer]) -> list[QuantLayer]:
    """One handle object per quantizer module, so identity compares equal across layers."""
    by_module: dict[int, QuantizerHandle] = {}
    for layer in layers:
        for attr in ("input_quantizer", "weight_quantizer", "output_quantizer"):
            handle = getattr(layer, attr)
            if handle is None:
                continue
            key = id(getattr(handle, "module", handle))
            setattr(layer, attr, by_module.setdefault(key, handle))
    return layers


class ConvertedView(QuantView):
    """``convert_pt2e`` output: integer weights and Q/DQ constants; forward-only.

    ``convert_pt2e`` folds batch norms into the convs. Models converted by
    :func:`qtta_torchao.export.convert` carry a stand-in for each folded norm (see
    :func:`insert_folded_norms`), listed by :meth:`norms` with ``folded=True``; a model converted by
    other means has none, and only its layer norms (if any) can adapt.

    ``model`` may be the ``torch.compile`` wrapper of a converted graph: the view reads the graph
    inside it and runs the compiled module.
    """

    backend = "torchao"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.gm: torch.fx.GraphModule = _inner_graph(model)
        self.sample_shape = _sample_shape(self.gm)

    def layers(self) -> list[QuantLayer]:
        gm = self.gm
        layers = []
        for node in _compute_nodes(gm):
            w_dq, x_dq = node.args[1], node.args[0]
            name = node.name
            w_handle = x_handle = None
            weight = torch.empty(0)
            if isinstance(w_dq, torch.fx.Node) and "dequantize" in str(w_dq.target):
                w_handle = ConstantQuantizerHandle(f"{name}.weight_quantizer", w_dq, "weight", gm)
                q_w = w_dq.args[0]
                if isinstance(q_w, torch.fx.Node) and q_w.op == "get_attr":
                    weight = get_tensor(gm, str(q_w.target))
            if isinstance(x_dq, torch.fx.Node) and "dequantize" in str(x_dq.target):
                x_handle = ConstantQuantizerHandle(f"{name}.input_quantizer", x_dq, "act", gm)
            layers.append(QuantLayer(name, is_compute_node(node), weight, w_handle, x_handle))  # type: ignore[arg-type]
        return layers

    def norms(self) -> list[NormLayer]:
        folded = set(self.gm.meta.get(FOLDED_NORMS_KEY, ()))
        norms = _graph_norms(self.gm)
        for norm in norms:
            norm.folded = norm.name in folded
        return norms

    def layer_input_module(self, layer: QuantLayer) -> nn.Module:
        return _input_tap(self.gm, self._compute_node(layer))

    def layer_bias(self, layer: QuantLayer) -> torch.Tensor | None:
        return _bias_of(self._compute_node(layer), self.gm)

    def _compute_node(self, layer: QuantLayer) -> torch.fx.Node:
        index = [x.name for x in self.layers()].index(layer.name)
        return _compute_nodes(self.gm)[index]

    def weight_quantizer_input(self, layer: QuantLayer) -> torch.Tensor:
        """The dequantized integer weight (batch norms folded in): the only float weight a
        converted graph knows."""
        w_node = self._compute_node(layer).args[1]
        with torch.no_grad():
            return _evaluate(w_node, self.gm).detach()

    def set_layer_weight(self, layer: QuantLayer, weight: torch.Tensor) -> None:
        raise NotImplementedError(
            f"{layer.name}: a convert_pt2e model stores integer weights (possibly compiled in); "
            "write weights into the prepared model, then convert it"
        )

    def norm_input_module(self, norm: NormLayer) -> nn.Module:
        return _norm_tap(self.gm, norm.name)

    @property
    def can_backprop(self) -> bool:
        return False

    def _apply_norm_mode(self, mode: NormMode) -> None:
        set_batchnorm_mode(self.gm, use_batch_stats=mode == "batch")


# --- folded norms and input taps of converted graphs ---------------------------------------------
FOLDED_NORMS_KEY = "qtta_folded_norms"


def _compute_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if is_compute_node(n) is not None]


def _inner_graph(model: nn.Module) -> torch.fx.GraphModule:
    inner = model._modules.get("_orig_mod", model) if hasattr(model, "_orig_mod") else model
    if not isinstance(inner, torch.fx.GraphModule):
        raise TypeError(f"expected a converted pt2e GraphModule, got {type(inner).__name__}")
    return inner


class InputTap(nn.Identity):
    """An identity in a converted graph, in front of a layer's input quantizer: forward pre-hooks on
    it see the unquantized activation (graph nodes cannot carry hooks; modules can)."""


def _input_tap(gm: torch.fx.GraphModule, compute: torch.fx.Node) -> nn.Module:
    """The :class:`InputTap` in front of ``compute``'s input quantizer, inserted on first use."""
    source = compute.args[0]
    # Walk back through dequantize -> quantize to the float activation the layer quantizes.
    q_node = None
    if isinstance(source, torch.fx.Node) and "dequantize" in str(source.target):
        q_node = source.args[0] if isinstance(source.args[0], torch.fx.Node) else None
        if q_node is not None and "quantize" not in str(q_node.target):
            q_node = None
    return _tap_before(gm, q_node if q_node is not None else compute)


def _tap_before(gm: torch.fx.GraphModule, consumer: torch.fx.Node) -> nn.Module:
    """An :class:`InputTap` between ``consumer`` and its first argument (reused if present)."""
    value = consumer.args[0]
    if isinstance(value, torch.fx.Node) and value.op == "call_module":
        module = gm.get_submodule(str(value.target))
        if isinstance(module, InputTap):
            return module
    index = sum(isinstance(m, InputTap) for m in gm.modules())
    target = f"qtta_input_taps.tap{index}"
    gm.add_submodule(target, InputTap())
    with gm.graph.inserting_before(consumer):
        tap = gm.graph.call_module(target, (value,))
    tap.meta = dict(value.meta) if isinstance(value, torch.fx.Node) else {}
    consumer.replace_input_with(value, tap)
    gm.recompile()
    return gm.get_submodule(target)


FoldedNorm = tuple[int, str, torch.Tensor, torch.Tensor, float]


def foldable_norms(prepared: torch.fx.GraphModule) -> list[FoldedNorm]:
    """The batch norms of a prepared QAT graph that ``convert_pt2e`` will fold, each as
    ``(index of its conv among the compute layers, name, gamma, beta, eps)``."""
    found = []
    prepared_convs = _compute_nodes(prepared)
    for node in prepared.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.batch_norm.default:
            continue
        conv = _upstream_compute(node, depth=6)
        weight, bias = node.args[1], node.args[2]
        if (
            conv is None
            or not isinstance(weight, torch.fx.Node)
            or not isinstance(bias, torch.fx.Node)
        ):
            continue
        name = str(weight.target).rsplit(".", 1)[0]
        gamma = get_tensor(prepared, str(weight.target)).detach().clone()
        beta = get_tensor(prepared, str(bias.target)).detach().clone()
        found.append((prepared_convs.index(conv), name, gamma, beta, float(node.args[7])))
    return found


def _norm_tap(gm: torch.fx.GraphModule, name: str) -> nn.Module:
    """The :class:`InputTap` in front of the graph norm called ``name``, inserted on first use."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _NORM_OPS:
            continue
        weight = node.args[1] if node.target is torch.ops.aten.batch_norm.default else node.args[2]
        if isinstance(weight, torch.fx.Node) and str(weight.target).rsplit(".", 1)[0] == name:
            return _tap_before(gm, node)
    raise KeyError(f"no norm named {name!r} in this graph")


_NORM_OPS = (
    torch.ops.aten.batch_norm.default,
    torch.ops.aten.layer_norm.default,
    torch.ops.aten.group_norm.default,
)


def remove_input_taps(gm: torch.fx.GraphModule) -> None:
    """Take every :class:`InputTap` out of ``gm`` (before handing the graph to ``convert_pt2e``)."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), InputTap):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            changed = True
    if changed:
        if hasattr(gm, "qtta_input_taps"):
            del gm.qtta_input_taps
        gm.recompile()


def insert_folded_norms(converted: torch.fx.GraphModule, folded: list[FoldedNorm]) -> None:
    """Give ``converted`` a stand-in for each batch norm ``convert_pt2e`` folded away
    (``folded`` from :func:`foldable_norms` of the prepared graph, taken before converting).

    Each stand-in is an ``aten.batch_norm`` on the folded conv's output, under the folded norm's
    own name. With the norm's affine (gamma, beta) and eps it holds
    ``running_mean = beta``, ``running_var = gamma**2``, ``weight = sqrt(gamma**2 + eps)``,
    ``bias = beta``, which is the identity on running statistics - the converted model computes
    what it computed before - and, on batch statistics, renormalises the conv output exactly as
    the folded norm would have (the folded conv output is an affine map of the unfolded one, whose
    source mean and standard deviation are beta and |gamma|), up to where eps enters. Its
    ``weight`` / ``bias`` are the per-channel affine that forward-only methods adapt.
    """
    converted_convs = _compute_nodes(converted)
    names = []
    for index, name, gamma, beta, eps in folded:
        if index >= len(converted_convs):
            raise RuntimeError(
                "convert_pt2e changed the conv/linear layers; cannot place the norms"
            )
        conv = converted_convs[index]
        holder = nn.BatchNorm2d(gamma.numel(), eps=eps)
        with torch.no_grad():
            holder.running_mean.copy_(beta)
            holder.running_var.copy_(gamma.square())
            holder.weight.copy_((gamma.square() + eps).sqrt())
            holder.bias.copy_(beta)
        holder.requires_grad_(False)
        converted.add_submodule(name, holder)
        graph = converted.graph
        with graph.inserting_before(conv):
            attrs = [
                graph.get_attr(f"{name}.{a}")
                for a in ("weight", "bias", "running_mean", "running_var")
            ]
        with graph.inserting_after(conv):
            bn = graph.call_function(
                torch.ops.aten.batch_norm.default, (conv, *attrs, False, 0.1, eps, False)
            )
        bn.meta = dict(conv.meta)
        for user in list(conv.users):
            if user is not bn:
                user.replace_input_with(conv, bn)
        names.append(name)
    converted.meta[FOLDED_NORMS_KEY] = tuple(names)
    converted.graph.lint()
    converted.recompile()


def _upstream_compute(node: torch.fx.Node, depth: int) -> torch.fx.Node | None:
    """The conv feeding a batch norm through the QAT fold pattern (div / add of the conv output)."""
    current: object = node.args[0]
    for _ in range(depth):
        if not isinstance(current, torch.fx.Node):
            return None
        if is_compute_node(current) is not None:
            return current
        current = current.args[0] if current.args else None
    return None


class ModuleView(QuantView):
    """An eager model with torchao-quantized Linear layers (QAT fake-quant or a weight subclass)."""

    backend = "torchao"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.sample_shape = None

    def layers(self) -> list[QuantLayer]:
        layers = []
        for name, module in self.model.named_modules():
            if not isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
                continue
            kind = "linear" if isinstance(module, nn.Linear) else "conv"
            w_fq = getattr(module, "weight_fake_quantizer", None)
            x_fq = getattr(module, "activation_fake_quantizer", None)
            if w_fq is None and not _from_torchao(module.weight):
                continue
            layers.append(
                QuantLayer(
                    name,
                    kind,
                    module.weight,
                    IntxFakeQuantizerHandle(
                        f"{name}.weight_quantizer", w_fq, "weight", module.weight
                    )
                    if w_fq is not None
                    else None,
                    IntxFakeQuantizerHandle(f"{name}.input_quantizer", x_fq, "act", None)
                    if x_fq is not None
                    else None,
                )
            )
        return layers

    def norms(self) -> list[NormLayer]:
        return module_norms(self.model.named_modules())

    def set_layer_weight(self, layer: QuantLayer, weight: torch.Tensor) -> None:
        """Into the module's weight parameter (QAT fake-quant layers); weight tensor subclasses
        (``quantize_`` with a non-QAT config) hold integer data and are not written."""
        if _from_torchao(layer.weight):
            raise NotImplementedError(
                f"{layer.name}: the weight is a torchao {type(layer.weight).__name__} holding "
                "integer data; write weights into the float / QAT model before quantize_"
            )
        super().set_layer_weight(layer, weight)

    @property
    def can_backprop(self) -> bool:
        # Weight tensor subclasses (quantize_ with a non-QAT config) do not carry gradients.
        return not any(_from_torchao(p) for p in self.model.parameters())

    def _apply_norm_mode(self, mode: NormMode) -> None:
        set_module_norm_mode(self.model, mode)


def recognise(model: nn.Module) -> QuantView | None:
    """The right view for a torchao model, or ``None`` if this is not one."""
    inner = model._modules.get("_orig_mod") if hasattr(model, "_orig_mod") else None
    if isinstance(inner, torch.fx.GraphModule):
        view = recognise(inner)
        if isinstance(view, ConvertedView):
            return ConvertedView(model)  # the compiled integer path: run the compiled module
        return None
    if isinstance(model, torch.fx.GraphModule):
        has_fq = any(_from_torchao(m) and hasattr(m, "fake_quant_enabled") for m in model.modules())
        if has_fq:
            return Pt2eView(model)
        has_qdq = any(
            n.op == "call_function" and str(n.target).startswith("quantized_decomposed.")
            for n in model.graph.nodes
        )
        if has_qdq:
            return ConvertedView(model)
        return None
    for module in model.modules():
        if _from_torchao(module) and "qat" in type(module).__module__:
            return ModuleView(model)
        weight = getattr(module, "weight", None)
        if weight is not None and _from_torchao(weight):
            return ModuleView(model)
    return None

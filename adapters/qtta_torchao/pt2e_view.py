"""The view of a pt2e graph prepared with fake-quant (``prepare_pt2e`` / ``prepare_qat_pt2e``):
quantizers are ``FakeQuantize`` modules, norms ``aten.batch_norm`` / ``layer_norm`` nodes;
gradients flow."""

from __future__ import annotations

import torch
from torch import nn

from qtta_plugins.view import (
    NormLayer,
    NormMode,
    QuantizerHandle,
    QuantLayer,
    QuantView,
)

from .graph import (
    _bias_of,
    _compute_nodes,
    _dedupe_handles,
    _evaluate,
    _find_param_target,
    _graph_norms,
    _input_tap,
    _module_of,
    _norm_tap,
    _sample_shape,
)
from .handles import (
    FakeQuantizeHandle,
)
from .quantize import get_tensor, is_compute_node, set_batchnorm_mode


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

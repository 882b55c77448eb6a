"""The view of ``convert_pt2e``'s integer Q/DQ graph (or its ``torch.compile`` wrapper): weights
are frozen integer constants, batch norms folded (with per-channel stand-ins where
:func:`qtta_torchao.export.convert` inserted them); forward-only."""

from __future__ import annotations

import torch
from torch import nn

from qtta_plugins.view import (
    NormLayer,
    NormMode,
    QuantLayer,
    QuantView,
)

from .graph import (
    FOLDED_NORMS_KEY,
    _bias_of,
    _compute_nodes,
    _evaluate,
    _graph_norms,
    _inner_graph,
    _input_tap,
    _norm_tap,
    _sample_shape,
)
from .handles import (
    ConstantQuantizerHandle,
)
from .quantize import get_tensor, is_compute_node, set_batchnorm_mode


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

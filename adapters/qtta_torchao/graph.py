"""fx graph helpers of the torchao views: parameters and modules behind nodes, norms in a graph,
constant sub-graphs; and the surgery on converted graphs (stand-ins for the batch norms
``convert_pt2e`` folds, input taps that let a method read a layer's input)."""

from __future__ import annotations

import torch
from torch import nn

from qtta_plugins.view import (
    NormLayer,
    QuantizerHandle,
    QuantLayer,
)

from .quantize import get_tensor, is_compute_node


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
        eps = None
        if target is torch.ops.aten.batch_norm.default:
            weight, bias, mean, var = node.args[1:5]
            kind = "batch"
            eps = float(node.args[7]) if len(node.args) > 7 else None
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
        norms.append(NormLayer(name, kind, w, fetch(bias), fetch(mean), fetch(var), eps=eps))  # type: ignore[arg-type]
    return norms


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

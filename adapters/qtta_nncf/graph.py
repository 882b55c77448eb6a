"""The structure of an NNCF model: its layers, which quantizer does what, in forward order.

Op names are NNCF's (``layer1/conv1/conv2d/0``), not module paths: inside a ``ModuleList`` the list
scope is dropped (``blocks[1].qkv`` calls ``qkv/linear/1``), so module names, forward order and which
activation quantizer feeds which layer are read from a trace of the model with NNCF's own graph
builder (:func:`trace_structure`). The trace needs one example input, kept on the model under
:data:`EXAMPLE_ATTR` (:class:`_CaptureExample` keeps the first input the model is called with).
Without one, :func:`static_structure` says what the hook names alone say.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .handles import op_function, quantizer_modules, split_hook_name

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


def _static_role(name: str) -> str:
    kind, op, port = split_hook_name(name)
    func = op_function(op)
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
        for kind, op, port in [split_hook_name(name)]
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

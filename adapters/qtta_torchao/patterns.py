"""torchao's conv-bn patterns, traced once per process while our ``quantize`` and ``convert`` run.

``convert_pt2e`` traces each of torchao's conv + batch-norm fold patterns with ``torch.export`` on
every call: 96 traces, about 10 s of a convert's 11 s on 2 cores, whatever the model (measured on
the digits BN CNN, W8A8; ``prepare_qat_pt2e`` traces 12 more, about 1 s). A traced pattern depends
only on the pattern function (its code and the values it closes over), the kinds (shape, dtype)
of its example inputs and keyword tensors (torchao draws their values at random: they are inputs
of the trace) and the device, so :func:`patterns_traced_once` keeps each traced pattern for the
process and hands every call its own deep copy (the matcher
only reads a pattern; a copy keeps that true whatever torchao does with it later). A pattern it
cannot key (a closure holding something unhashable) is traced as torchao would.

Scoped to our calls on purpose: a user's own ``convert_pt2e`` runs torchao as it is.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ._backend import torchao_module

_TRACED: dict[Any, torch.fx.GraphModule] = {}
_LOCK = threading.RLock()
_depth = 0


class _Unkeyable(Exception):
    pass


def _frozen(value: Any, *, values: bool) -> Any:
    """A hashable stand-in for ``value``: tensors by shape, dtype and device (and their values when
    ``values``), tuples / lists / dicts element-wise; other values as they are, if hashable."""
    if isinstance(value, torch.Tensor):
        meta = ("tensor", tuple(value.shape), value.dtype, value.device.type)
        return (*meta, tuple(value.detach().flatten().tolist())) if values else meta
    if isinstance(value, tuple | list):
        return (type(value).__name__, *(_frozen(v, values=values) for v in value))
    if isinstance(value, dict):
        return ("dict", *sorted((k, _frozen(v, values=values)) for k, v in value.items()))
    if isinstance(value, types.FunctionType):  # made afresh on each call: keyed by what it is
        return _function_key(value)
    if isinstance(value, functools.partial):
        return ("partial", _frozen(value.func, values=True), _frozen(value.args, values=True),
                _frozen(value.keywords, values=True))  # fmt: skip
    try:
        hash(value)
    except TypeError:
        raise _Unkeyable from None
    return value


def _function_key(fn: types.FunctionType) -> Any:
    closure = tuple(_frozen(cell.cell_contents, values=True) for cell in (fn.__closure__ or ()))
    return ("function", fn.__code__, closure, _frozen(fn.__defaults__, values=True))


def _key(pattern: Callable, example_inputs: tuple, is_cuda: bool, kwargs: dict) -> Any:
    wrapper = None
    if isinstance(pattern, torch.nn.Module):  # torchao wraps each pattern function in a module
        fn = getattr(pattern, "fn", None)
        if (
            fn is None
            or any(True for _ in pattern.parameters())
            or any(True for _ in pattern.buffers())
        ):
            raise _Unkeyable
        wrapper, pattern = type(pattern), fn
    if not isinstance(pattern, types.FunctionType):
        raise _Unkeyable
    return (
        wrapper,
        _function_key(pattern),
        _frozen(example_inputs, values=False),  # random example values: only their kind counts
        bool(is_cuda),
        _frozen(kwargs, values=False),  # inputs of the trace too (torchao draws them at random)
    )


@contextlib.contextmanager
def patterns_traced_once() -> Iterator[None]:
    """While inside, torchao's QAT conv-bn patterns are traced once per process (module
    docstring). Re-entrant; the original function is back on exit."""
    global _depth
    qat_utils = torchao_module("torchao.quantization.pt2e.qat_utils")
    with _LOCK:
        if _depth == 0:
            original = qat_utils._get_aten_graph_module_for_pattern

            def traced_once(
                pattern: Callable, example_inputs: tuple, is_cuda: bool = False, **kwargs: Any
            ) -> torch.fx.GraphModule:
                try:
                    key = _key(pattern, example_inputs, is_cuda, kwargs)
                except _Unkeyable:
                    return original(pattern, example_inputs, is_cuda, **kwargs)
                if key not in _TRACED:
                    _TRACED[key] = original(pattern, example_inputs, is_cuda, **kwargs)
                return copy.deepcopy(_TRACED[key])

            traced_once.original = original  # type: ignore[attr-defined]
            qat_utils._get_aten_graph_module_for_pattern = traced_once
        _depth += 1
    try:
        yield
    finally:
        with _LOCK:
            _depth -= 1
            if _depth == 0:
                patched = qat_utils._get_aten_graph_module_for_pattern
                qat_utils._get_aten_graph_module_for_pattern = patched.original

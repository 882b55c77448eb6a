"""The NNCF adapter's hook implementations (registered through the ``qtta_plugins`` entry point)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from qtta_plugins.config import QuantConfig
from qtta_plugins.hookspecs import hookimpl
from qtta_plugins.view import QuantView

from . import BACKEND

_HOOKS_ATTR = "__nncf_hooks"  # where nncf.quantize (PyTorch backend) keeps its quantizers


@hookimpl
def qtta_backends() -> list[str]:
    return [BACKEND]


@hookimpl
def qtta_quant_view(model: torch.nn.Module) -> QuantView | None:
    # Cheap check first: only a model that holds NNCF objects can be one of ours (NNCF itself is
    # imported only then).
    if not _may_be_nncf(model):
        return None
    from .view import recognise

    return recognise(model)


@hookimpl
def qtta_quantize(
    model: torch.nn.Module, config: QuantConfig, calib: Sequence[torch.Tensor]
) -> torch.nn.Module | None:
    if config.backend != BACKEND:
        return None
    from .quantize import quantize

    return quantize(model, config, calib)


@hookimpl
def qtta_export(
    model: torch.nn.Module,
    backend: str,
    path: str | os.PathLike[str] | None,
    options: dict[str, Any],
) -> Any | None:
    if backend != BACKEND:
        return None
    from .export import export

    return export(model, path, **options)


def _may_be_nncf(model: torch.nn.Module) -> bool:
    if _HOOKS_ATTR in model._modules:
        return True
    return any(type(m).__module__.startswith("nncf.") for m in model.modules())

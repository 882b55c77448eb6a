"""Lazy access to torchao, with the error a user needs when it is missing."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from qtta_plugins.errors import BackendNotInstalledError


def torchao_module(name: str = "torchao") -> ModuleType:
    """Import ``name`` from torchao; a missing torchao names the extra to install."""
    # torchao's optional CUDA extensions print load failures on CPU-only machines; nothing here uses them.
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    try:
        return importlib.import_module(name)
    except ImportError as exc:  # pragma: no cover - exercised only without torchao
        raise BackendNotInstalledError(
            "the torchao backend is not installed: pip install 'qtta-plugins[torchao]'"
        ) from exc

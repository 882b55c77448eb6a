"""Lazy access to Brevitas, with the error a user needs when it is missing."""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

from qtta_plugins.errors import BackendNotInstalledError


def brevitas_module(name: str = "brevitas") -> ModuleType:
    """Import ``name`` from Brevitas; a missing Brevitas names the extra to install."""
    try:
        with warnings.catch_warnings():
            # brevitas.graph (for calibration_mode) warns that an optional CUDA kernel is missing
            warnings.filterwarnings("ignore", message=".*fast_hadamard_transform.*")
            return importlib.import_module(name)
    except ImportError as exc:  # pragma: no cover - exercised only without brevitas
        raise BackendNotInstalledError(
            "the brevitas backend is not installed: pip install 'qtta-plugins[brevitas]'"
        ) from exc

"""Lazy access to torchao, with the error a user needs when it is missing."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Iterator
from types import ModuleType

from qtta_plugins.errors import BackendNotInstalledError

# On import, torchao logs warnings about CUDA extensions a CPU machine cannot load, and torch about
# Enum registrations; neither concerns anything this adapter does.
_NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def _quiet_import_logs() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def torchao_module(name: str = "torchao") -> ModuleType:
    """Import ``name`` from torchao; a missing torchao names the extra to install."""
    # torchao's optional CUDA extensions fail to load on CPU-only machines; nothing here uses them.
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    try:
        with _quiet_import_logs():
            return importlib.import_module(name)
    except ImportError as exc:  # pragma: no cover - exercised only without torchao
        raise BackendNotInstalledError(
            "the torchao backend is not installed: pip install 'qtta-plugins[torchao]'"
        ) from exc

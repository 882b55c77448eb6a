"""When to show progress: asked for explicitly, or on a terminal unless ``QTTA_QUIET`` is set.

``QTTA_QUIET`` (``qtta ... -q`` sets it for the command) silences our progress bars and, where an
adapter can, its backend's: NNCF's progress bars and INFO lines during ``nncf.quantize``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

QUIET_ENV = "QTTA_QUIET"


def quiet() -> bool:
    """Whether the user asked for silence (``QTTA_QUIET`` set to anything but empty)."""
    return bool(os.environ.get(QUIET_ENV))


def show_progress(progress: bool | None) -> bool:
    if progress is not None:
        return bool(progress)
    if quiet():
        return False
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def quiet_env(enabled: bool = True) -> Iterator[None]:
    """``QTTA_QUIET`` set for the duration of the block (when ``enabled``), then as it was."""
    if not enabled:
        yield
        return
    saved = os.environ.get(QUIET_ENV)
    os.environ[QUIET_ENV] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(QUIET_ENV, None)
        else:
            os.environ[QUIET_ENV] = saved

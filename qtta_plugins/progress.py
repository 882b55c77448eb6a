"""When to show progress bars: asked for explicitly, or on a terminal unless ``QTTA_QUIET`` is set."""

from __future__ import annotations

import os
import sys


def show_progress(progress: bool | None) -> bool:
    if progress is not None:
        return bool(progress)
    if os.environ.get("QTTA_QUIET"):
        return False
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False

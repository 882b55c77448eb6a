"""Lazy access to NNCF, with the error a user needs when it is missing.

NNCF's PyTorch backend JIT-compiles a small C++ extension (``quantized_functions_cpu``) the first
time a quantizer runs: about 60 s on two cores. The build is cached per torch version in torch's
extension directory: ``$TORCH_EXTENSIONS_DIR/nncf/quantized_functions_cpu/<torch version>/`` when
that variable is set, else ``~/.cache/torch_extensions/py<XY>_<cpu|cuXYZ>/nncf/
quantized_functions_cpu/<torch version>/`` (see :func:`extension_build_dir`); CI should cache that
directory. NNCF aborts the build after ``NNCF_EXTENSION_LOAD_TIMEOUT`` seconds (default 60), which a
small or busy machine overruns.

If the build fails for any other reason (no C++ compiler, say) NNCF itself falls back to its
pure-torch reference kernels, wrapped in ``torch.compile``. ``QTTA_NNCF_TORCH_FALLBACK=1`` skips
the build altogether and installs those reference kernels uncompiled (same numerics, slower on
large tensors, no compiler needed): see :func:`use_torch_fallback`.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from qtta_plugins.errors import BackendNotInstalledError
from qtta_plugins.progress import quiet

_INSTALL_HINT = "the NNCF backend is not installed: pip install 'qtta-plugins[nncf]'"


def nncf_module(name: str = "nncf") -> ModuleType:
    """Import ``name`` from NNCF; a missing NNCF names the extra to install."""
    # The first use of an NNCF quantizer compiles NNCF's C++ extension (~60 s on 2 cores); NNCF's
    # default 60 s limit then fails the build on small or busy machines. 0 disables the limit. A
    # value the user has set is kept.
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")
    try:
        module = importlib.import_module(name)
    except ImportError as exc:  # pragma: no cover - exercised only without nncf
        raise BackendNotInstalledError(_INSTALL_HINT) from exc
    if os.environ.get("QTTA_NNCF_TORCH_FALLBACK", "").strip() not in ("", "0"):
        use_torch_fallback()
    return module


def use_torch_fallback() -> None:
    """Make NNCF's CPU quantizers run its pure-torch reference kernels instead of the C++ extension.

    Nothing is compiled (neither the extension nor ``torch.compile``). Has no effect once the
    extension has been loaded in this process.
    """
    try:
        ext = importlib.import_module("nncf.torch.quantization.extensions")
        ref = importlib.import_module("nncf.torch.quantization.reference")
    except ImportError as exc:  # pragma: no cover - exercised only without nncf
        raise BackendNotInstalledError(_INSTALL_HINT) from exc
    namespace = ext.QuantizedFunctionsCPU
    if getattr(namespace, "_loaded_namespace", None) is None:
        executor = ref.ReferenceQuantize(backend_type=ref.ReferenceBackendType.TORCH)

        class EagerReferenceFunctions:
            Quantize_forward = staticmethod(executor.forward)
            Quantize_backward = staticmethod(executor.backward)

        namespace._loaded_namespace = EagerReferenceFunctions


def extension_build_dir() -> Path:
    """Where NNCF caches its compiled CPU extension (cache this directory in CI)."""
    ext = nncf_module("nncf.torch.quantization.extensions")
    return Path(ext.QuantizedFunctionsCPULoader.get_build_dir())


@contextlib.contextmanager
def nncf_quiet(enabled: bool | None = None) -> Iterator[None]:
    """NNCF silent for the duration of the block: its logger at WARNING (``nncf.set_log_level``:
    no INFO lines) and its rich progress bars off (they draw on rich's global console, made
    quiet). Both are put back as they were afterwards. ``enabled=None``: when the user asked for
    quiet (``QTTA_QUIET``, which ``qtta ... -q`` sets)."""
    if not (quiet() if enabled is None else enabled):
        yield
        return
    nncf = nncf_module()
    import rich

    logger = logging.getLogger("nncf")
    levels = (logger.level, [(h, h.level) for h in logger.handlers])
    console = rich.get_console()
    was_quiet = console.quiet
    nncf.set_log_level(logging.WARNING)
    console.quiet = True
    try:
        yield
    finally:
        console.quiet = was_quiet
        logger.setLevel(levels[0])
        for handler, level in levels[1]:
            handler.setLevel(level)

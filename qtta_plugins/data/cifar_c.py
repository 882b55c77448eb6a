"""Our own corrupted sets written once in RobustBench's CIFAR-10-C layout, so that the tables of
this project and a user's CIFAR-10-C run read their data through one code path
(:func:`~qtta_plugins.data.layouts.cifar_c_domains` and :class:`~qtta_plugins.data.disk.DiskStream`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..progress import show_progress
from .corruption import CORRUPTIONS, _check_seed, cache_dir, corrupt_set
from .layouts import CIFAR_C_FOLDERS, SEVERITIES
from .sources import SOURCES, ImageSet, _load_test


def default_cifar_c_root(n: int | None = None, seed: int = 0) -> Path:
    """Where :func:`write_cifar_c_layout` writes by default (under :func:`cache_dir`): one root
    per ``(n, seed)``, so that a small test set never passes for the full one."""
    return cache_dir() / "cifar-c-layout" / f"{'all' if n is None else f'first{n}'}-seed{seed}"


def write_cifar_c_layout(
    source: str = "fashion-mnist",
    root: str | os.PathLike[str] | None = None,
    *,
    corruptions: Sequence[str] = CORRUPTIONS,
    n: int | None = None,
    seed: int = 0,
    source_root: str | None = None,
    progress: bool | None = None,
) -> Path:
    """Write ``source``'s corrupted test split in RobustBench's CIFAR-10-C layout; return the folder.

    ``<root>/<SOURCE>-C/<corruption>.npy`` (``FASHION-MNIST-C/fog.npy``): ``5n x 32 x 32 x 3``
    ``uint8``, the ``n`` test images (default: all, 10,000 for Fashion-MNIST) at severities 1 to
    5 stacked, gray replicated to RGB; and ``labels.npy`` (the ``n`` labels five times, as
    CIFAR-10-C's). The images are :func:`~qtta_plugins.data.corrupt_set`'s (and come from its
    cache when there), so a stream of source ``"fashion-mnist-c"`` read from here gives, with
    ``channels=1``, exactly the images of ``make_stream(..., "fashion-mnist", seed=seed)``. All five
    severities are written: the layout has no place for fewer.

    Each corruption's file is written through a temporary file and renamed, and skipped when it is
    already complete; ``root`` defaults to :func:`default_cifar_c_root` (the full set: 2.3 GB, from
    750,000 corrupted images). ``n``: the first ``n`` test images only (for tests and trials).
    ``source_root``: where ``source`` is read (see :func:`~qtta_plugins.data.load_source`).

    Raises:
        ValueError: an unknown ``source`` or corruption, a bad ``n``/``seed``, or a folder that
            already holds another set (other labels); before anything is written.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; sources: {', '.join(SOURCES)}")
    corruptions = [corruptions] if isinstance(corruptions, str) else list(corruptions)
    if not corruptions or any(c not in CORRUPTIONS for c in corruptions):
        raise ValueError(f"corruptions must be some of {', '.join(CORRUPTIONS)}; got {corruptions}")
    _check_seed(seed)
    test = _load_test(source, source_root, 32, None, int(seed))
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= len(test):
            raise ValueError(f"n must be an int in [1, {len(test)}], got {n!r}")
        test = ImageSet(test.x[:n], test.y[:n], f"{test.name}-first{n}")
    folder = Path(root if root is not None else default_cifar_c_root(n, seed)).expanduser()
    folder = folder / CIFAR_C_FOLDERS[f"{source}-c"]
    labels = np.tile(test.y.numpy(), SEVERITIES).astype(
        np.uint8 if test.y.max() < 256 else np.int64
    )
    labels_path = folder / "labels.npy"
    if labels_path.is_file():
        held = np.load(labels_path, mmap_mode="r")
        if held.shape != labels.shape or not np.array_equal(held, labels):
            raise ValueError(
                f"{folder} already holds another set ({len(held)} labels, not these "
                f"{len(labels)}): remove it or write to another root"
            )
    folder.mkdir(parents=True, exist_ok=True)
    if not labels_path.is_file():
        _save_npy_atomic(labels_path, labels)
    shape = (SEVERITIES * len(test), 32, 32, 3)
    bar = tqdm(corruptions, desc=folder.name, disable=not show_progress(progress))
    for c in bar:
        path = folder / f"{c}.npy"
        if path.is_file() and _complete(path, shape):
            continue
        _write_stacked(path, shape, test, c, seed, progress)
    return folder


def _complete(path: Path, shape: tuple[int, ...]) -> bool:
    try:
        held = np.load(path, mmap_mode="r")
    except (ValueError, OSError):
        return False
    return held.dtype == np.uint8 and held.shape == shape


def _write_stacked(
    path: Path,
    shape: tuple[int, ...],
    test: ImageSet,
    corruption: str,
    seed: int,
    progress: bool | None,
) -> None:
    """One corruption's five severities into ``path``, through a temporary file (a memmap: one
    severity in memory at a time)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        n = len(test)
        for s in range(1, SEVERITIES + 1):
            gray = corrupt_set(test, corruption, s, seed=seed, progress=progress).x[:, 0]
            u8 = gray.mul(255.0).round_().to(torch.uint8).numpy()
            out[(s - 1) * n : s * n] = u8[..., None]
        out.flush()
        del out
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise

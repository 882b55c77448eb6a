"""The layouts image data sets have on disk, read as domains of labels and file references.

Nothing here decodes an image: a layout is checked (every file and folder a stream will need is
there) and its labels are read, so that a stream's order can be computed from the labels alone;
:mod:`.disk` decodes the images batch by batch. The layouts are those users have:

* RobustBench's CIFAR-10-C / CIFAR-100-C: ``<root>/CIFAR-10-C/<corruption>.npy`` (``N x H x W x 3``
  ``uint8``, the five severities stacked: severity ``s`` is rows ``(s-1)*n : s*n``, ``n = N/5``)
  and ``labels.npy`` (``N`` labels, or the ``n`` of one severity), read with
  ``np.load(mmap_mode="r")`` so that no set is ever wholly in memory. :func:`~qtta_plugins.data.cifar_c.write_cifar_c_layout`
  writes our own corrupted sets (Fashion-MNIST-C, ...) in this layout, read by the same code.
* ImageNet-C: ``<root>/ImageNet-C/<corruption>/<severity>/<wnid>/<image>.JPEG``, with an optional
  image list (``<wnid>/<file>`` first on each line: RobustBench's 5,000-image subset) and the class
  order of the model's head (default: the sorted wnids, ImageNet's class index order).
* a folder of the user's domains, ``<root>/<domain>/<class>/<image>`` (one ImageFolder per domain:
  the rules of :class:`torchvision.datasets.ImageFolder`, classes sorted by name and shared across
  domains by name), and image lists (``<relative path> <label>`` lines, the path's first component
  naming the domain).

The folders are scanned with :func:`os.scandir` under ImageFolder's rules rather than by
ImageFolder itself: torchvision is an optional extra, and a scan needs nothing of it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMG_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".ppm",
    ".bmp",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
)
"""The image file suffixes a folder scan takes (torchvision ImageFolder's, in any case)."""

CIFAR_C_FOLDERS: dict[str, str] = {
    "cifar10-c": "CIFAR-10-C",
    "cifar100-c": "CIFAR-100-C",
    "fashion-mnist-c": "FASHION-MNIST-C",
    "digits-c": "DIGITS-C",
    "mnist-c": "MNIST-C",
}
"""Source name -> its folder in the CIFAR-10-C layout (the last three written by
:func:`~qtta_plugins.data.cifar_c.write_cifar_c_layout` from the sources in memory)."""

SEVERITIES = 5
"""Severities stacked in each ``.npy`` file of the CIFAR-10-C layout."""


# --------------------------------------------------------------------------------------------
# domains: labels and where the images are
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ImageFiles:
    """A domain stored as image files: sample ``i`` is ``root/files[i]``, labelled ``labels[i]``."""

    root: str
    files: Sequence[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> ImageFiles:
        """The samples ``index`` (in that order)."""
        return ImageFiles(self.root, [self.files[i] for i in index], self.labels[index])


@dataclass(frozen=True, eq=False)
class ArrayRows:
    """A domain stored as rows of an ``(N, H, W, 3)`` ``uint8`` ``.npy`` file: sample ``i`` is
    row ``rows[i]`` of ``path``, labelled ``labels[i]``."""

    path: str
    rows: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> ArrayRows:
        """The samples ``index`` (in that order)."""
        return ArrayRows(self.path, self.rows[index], self.labels[index])


DiskDomain = ImageFiles | ArrayRows
"""One domain of a stream on disk."""


# --------------------------------------------------------------------------------------------
# CIFAR-10-C / CIFAR-100-C (RobustBench)
# --------------------------------------------------------------------------------------------


def cifar_c_domains(
    root: str | os.PathLike[str], source: str, pairs: Sequence[tuple[str, int]]
) -> list[ArrayRows]:
    """The ``(corruption, severity)`` domains of ``source`` (a key of :data:`CIFAR_C_FOLDERS`)
    under ``root``. Only the ``.npy`` headers and the labels are read.

    Raises:
        FileNotFoundError: the folder, ``labels.npy`` or a ``<corruption>.npy`` is missing.
        ValueError: a file that is not such an array, or labels that do not fit the images.
    """
    name = CIFAR_C_FOLDERS[source]
    folder = Path(root).expanduser() / name
    layout = (
        f"RobustBench's {name} layout: <root>/{name}/<corruption>.npy (N x H x W x 3 uint8, the "
        "five severities stacked) + labels.npy"
    )
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: expected {layout}")
    corruptions = list(dict.fromkeys(c for c, _ in pairs))
    wanted = [folder / "labels.npy", *(folder / f"{c}.npy" for c in corruptions)]
    missing = [str(p) for p in wanted if not p.is_file()]
    if missing:
        found = sorted(p.stem for p in folder.glob("*.npy") if p.stem != "labels")
        raise FileNotFoundError(
            f"expected {', '.join(missing)} ({layout}); {folder} holds: "
            f"{', '.join(found) or 'no .npy file'}"
        )
    labels = _open_npy(folder / "labels.npy", layout)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{folder / 'labels.npy'}: expected a 1-D integer array, got {labels.dtype} "
            f"{labels.shape} ({layout})"
        )
    sizes: dict[str, int] = {}
    for c in corruptions:
        path = folder / f"{c}.npy"
        images = _open_npy(path, layout)
        shape = images.shape
        if images.dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f"{path}: expected N x H x W x 3 uint8, got {images.dtype} {shape}")
        if shape[0] == 0 or shape[0] % SEVERITIES:
            raise ValueError(
                f"{path}: {shape[0]} images, not the five severities stacked ({layout})"
            )
        n = shape[0] // SEVERITIES
        if len(labels) not in (n, shape[0]):
            raise ValueError(
                f"{folder / 'labels.npy'} has {len(labels)} labels for the {shape[0]} images of "
                f"{path}: expected {shape[0]} (or {n}, one severity's)"
            )
        sizes[c] = n
    domains = []
    for c, s in pairs:
        n = sizes[c]
        rows = np.arange((s - 1) * n, s * n, dtype=np.int64)
        own = labels[rows] if len(labels) > n else labels[:n]
        domains.append(ArrayRows(str(folder / f"{c}.npy"), rows, np.array(own, dtype=np.int64)))
    return domains


def _open_npy(path: Path, layout: str) -> np.ndarray:
    """``np.load(path, mmap_mode="r")``: the header is read, the data stays on disk."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise ValueError(f"{path} is not a .npy array ({err}); expected {layout}") from err


# --------------------------------------------------------------------------------------------
# ImageNet-C
# --------------------------------------------------------------------------------------------


def imagenet_c_domains(
    root: str | os.PathLike[str],
    pairs: Sequence[tuple[str, int]],
    *,
    image_list: str | os.PathLike[str] | None = None,
    class_order: Sequence[str] | Mapping[str, int] | str | os.PathLike[str] | None = None,
) -> list[ImageFiles]:
    """The ``(corruption, severity)`` domains of the ImageNet-C tree under ``root``.

    Each domain holds the images of ``<root>/ImageNet-C/<corruption>/<severity>/`` (sorted by
    wnid, then by file name), or those of ``image_list`` (its lines' first field,
    ``<wnid>/<file>``, in its order). A sample's label is its wnid's index in ``class_order``
    (see :func:`class_index`; default: the sorted wnids of the first domain's folder, which is
    ImageNet's class index order for the full tree).

    Raises:
        FileNotFoundError: the tree, a domain folder or a listed image is missing.
        ValueError: an empty domain, or a wnid the class order lacks.
    """
    base = Path(root).expanduser() / "ImageNet-C"
    layout = "ImageNet-C's layout: <root>/ImageNet-C/<corruption>/<severity>/<wnid>/<image>.JPEG"
    if not base.is_dir():
        raise FileNotFoundError(f"{base} is not a folder: expected {layout}")
    folders = {pair: base / pair[0] / str(pair[1]) for pair in pairs}
    missing = [str(f) for f in dict.fromkeys(folders.values()) if not f.is_dir()]
    if missing:
        found = sorted(p.name for p in base.iterdir() if p.is_dir())
        raise FileNotFoundError(
            f"expected the folder(s) {', '.join(missing)} ({layout}); corruptions in {base}: "
            f"{', '.join(found) or 'none'}"
        )
    listed = read_image_list(image_list) if image_list is not None else None
    first = next(iter(folders.values()))
    classes = class_index(class_order, default=_subfolders(first))
    domains: dict[tuple[str, int], ImageFiles] = {}
    previous: list[str] | None = None
    for pair, folder in folders.items():
        if listed is not None:
            files = listed
            _check_files_exist(folder, files, f"the image list {image_list}")
        else:
            files = [
                f"{wnid}/{name}" for wnid in _subfolders(folder) for name in _images(folder / wnid)
            ]
            if not files:
                raise ValueError(f"{folder} holds no image ({layout})")
            if previous is not None and files == previous:
                files = previous  # one list for all the domains that hold the same files
        previous = files
        labels = _labels_of(files, classes, folder)
        domains[pair] = ImageFiles(str(folder), files, labels)
    return [domains[pair] for pair in pairs]


def read_image_list(path: str | os.PathLike[str]) -> list[str]:
    """The image paths of an image list: each non-empty line's first field (``#`` comments
    skipped), e.g. ``n01440764/ILSVRC2012_val_00000293.JPEG`` of RobustBench's ImageNet-C subset."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"image list {path} does not exist (lines of <wnid>/<file> ...)")
    entries = [
        line.split()[0]
        for line in path.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not entries:
        raise ValueError(f"image list {path} names no image")
    return entries


def _labels_of(files: Sequence[str], classes: Mapping[str, int], where: Path) -> np.ndarray:
    labels = np.empty(len(files), dtype=np.int64)
    for i, rel in enumerate(files):
        wnid = rel.split("/", 1)[0]
        if wnid not in classes:
            raise ValueError(
                f"{where / rel}: class {wnid!r} is not in the class order ({len(classes)} classes, "
                f"e.g. {', '.join(list(classes)[:3])})"
            )
        labels[i] = classes[wnid]
    return labels


# --------------------------------------------------------------------------------------------
# a folder of domains; an image list
# --------------------------------------------------------------------------------------------


def folder_domains(
    root: str | os.PathLike[str],
    domains: Sequence[str] | None = None,
    *,
    class_order: Sequence[str] | Mapping[str, int] | str | os.PathLike[str] | None = None,
) -> tuple[list[str], list[ImageFiles]]:
    """``(names, domains)`` of the folder ``<root>/<domain>/<class>/<image>``.

    ``domains``: the sub-folders to stream, in this order (default: all of them, sorted). Each
    is read as torchvision's ImageFolder reads a folder (images sorted by class, then name); the
    classes are shared across domains by name: their index is in ``class_order`` (default: the
    sorted names of every class folder of every domain).
    """
    base = Path(root).expanduser()
    layout = "a folder of domains: <root>/<domain>/<class>/<image>"
    if not base.is_dir():
        raise FileNotFoundError(f"{base} is not a folder: expected {layout}")
    available = _subfolders(base)
    names = available if domains is None else [str(d) for d in domains]
    missing = [str(base / d) for d in names if d not in available]
    if missing or not names:
        raise FileNotFoundError(
            f"expected the domain folder(s) {', '.join(missing) or '<root>/<domain>'} ({layout}); "
            f"domains in {base}: {', '.join(available) or 'none'}"
        )
    every_class = sorted({c for d in available for c in _subfolders(base / d)})
    classes = class_index(class_order, default=every_class)
    out = []
    for d in names:
        files = [f"{d}/{c}/{f}" for c in _subfolders(base / d) for f in _images(base / d / c)]
        if not files:
            raise ValueError(f"{base / d} holds no image in a class folder ({layout})")
        labels = np.array([classes.get(f.split("/")[1], -1) for f in files], dtype=np.int64)
        if (labels < 0).any():
            bad = files[int(np.flatnonzero(labels < 0)[0])]
            raise ValueError(f"{base / bad}: its class is not in the class order")
        out.append(ImageFiles(str(base), files, labels))
    return names, out


def image_list_domains(
    root: str | os.PathLike[str],
    image_list: str | os.PathLike[str],
    domains: Sequence[str] | None = None,
) -> tuple[list[str], list[ImageFiles]]:
    """``(names, domains)`` of an image list: lines ``<relative path> <label>`` (the path relative
    to ``root``, possibly with spaces; the label an integer; ``#`` comments skipped). The path's
    first component is the domain; ``domains`` chooses and orders them (default: all, sorted);
    within a domain the list's order is kept. ``image_list`` is a path, or a name under ``root``.

    Raises:
        FileNotFoundError: the list or a listed image is missing.
        ValueError: a line that is not ``<path> <label>``, or a path without a domain folder.
    """
    base = Path(root).expanduser()
    path = Path(image_list).expanduser()
    if not path.is_absolute() and not path.is_file():
        path = base / path
    layout = "an image list: lines <domain>/<path> <label>, relative to root"
    if not path.is_file():
        raise FileNotFoundError(f"image list {path} does not exist ({layout})")
    groups: dict[str, tuple[list[str], list[int]]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        label = parts[1] if len(parts) == 2 else ""
        if not label.isdigit() or "/" not in parts[0].strip("/"):
            raise ValueError(f"{path}:{number}: expected '<domain>/<path> <label>', got {line!r}")
        rel = parts[0].strip().strip("/")
        files, labels = groups.setdefault(rel.split("/", 1)[0], ([], []))
        files.append(rel)
        labels.append(int(label))
    available = sorted(groups)
    names = available if domains is None else [str(d) for d in domains]
    unknown = [d for d in names if d not in groups]
    if unknown or not names:
        raise ValueError(
            f"no image of domain(s) {', '.join(unknown) or '(none)'} in {path}; its domains: "
            f"{', '.join(available) or 'none'}"
        )
    out = []
    for d in names:
        files, labels = groups[d]
        _check_files_exist(base, files, f"the image list {path}")
        out.append(ImageFiles(str(base), files, np.array(labels, dtype=np.int64)))
    return names, out


# --------------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------------


def class_index(
    class_order: Sequence[str] | Mapping[str, int] | str | os.PathLike[str] | None,
    *,
    default: Sequence[str],
) -> dict[str, int]:
    """Class name -> index of the model's head.

    ``class_order``: the names in head order; a mapping name -> index; or a file: ``.json``
    (a list, or a mapping such as RobustBench's ``imagenet_class_to_id_map.json``) or text (the
    first field of each line). ``None``: ``default``'s order.
    """
    if class_order is None:
        order: Sequence[str] | Mapping[str, int] = default
    elif isinstance(class_order, (str, os.PathLike)):
        path = Path(class_order).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"class order file {path} does not exist")
        text = path.read_text()
        if path.suffix == ".json":
            order = json.loads(text)
        else:
            order = [line.split()[0] for line in text.splitlines() if line.strip()]
    else:
        order = class_order
    if isinstance(order, Mapping):
        return {str(k): int(v) for k, v in order.items()}
    names = [str(c) for c in order]
    if len(set(names)) != len(names):
        raise ValueError("the class order names a class twice")
    return {c: i for i, c in enumerate(names)}


def _subfolders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _images(folder: Path) -> list[str]:
    return sorted(
        e.name
        for e in os.scandir(folder)
        if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)
    )


def _check_files_exist(base: Path, files: Sequence[str], what: str) -> None:
    missing = [str(base / f) for f in files if not (base / f).is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise FileNotFoundError(f"{what} names missing files: {', '.join(missing[:3])}{more}")

"""Test-time-adaptation streams from image data sets on disk, decoded batch by batch.

A :class:`DiskStream` is the disk twin of :class:`~qtta_plugins.data.ContinualStream`: the same
settings, the same :class:`~qtta_plugins.data.Batch` objects, and the same sample order for the
same labels and seed (both order through :func:`~qtta_plugins.data.streams.sample_order`, from the
labels alone). Its images stay on disk until a :class:`torch.utils.data.DataLoader`, whose batch
sampler follows the stream's order, decodes each batch (in ``num_workers`` worker processes) and
applies the model's own preprocessing (``transform``: torchvision weights' ``transforms()``,
:func:`timm_transform`, or any callable on a PIL image). The layouts are read by :mod:`.layouts`.

Decoding: Pillow (``Image.open(...).convert("RGB")``, what torchvision's ImageFolder does). It is
installed with the core (matplotlib needs it), it gives the PIL images torchvision's and timm's
transforms take, and it works where torchvision's own decoder (``torchvision.io.decode_image``)
does not: a torchvision wheel built for another torch build loads no compiled extension (see
:mod:`qtta_plugins.models.zoo`). ``.npy`` rows are not decoded at all: ``uint8`` ``HWC`` to ``float``
``CHW`` (or a PIL image, when a ``transform`` is given).
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .cifar_c import default_cifar_c_root
from .corruption import CORRUPTIONS, _check_severity
from .layouts import (
    CIFAR_C_FOLDERS,
    ArrayRows,
    DiskDomain,
    ImageFiles,
    cifar_c_domains,
    folder_domains,
    image_list_domains,
    imagenet_c_domains,
)
from .sources import _stratified_subset
from .streams import (
    GRADUAL_SEVERITIES,
    MIXED,
    SETTINGS,
    Batch,
    _check_positive_int,
    batch_plan,
    check_stream_args,
    count_batches,
    sample_order,
)

SEVERITY_SOURCES: tuple[str, ...] = (*CIFAR_C_FOLDERS, "imagenet-c")
"""Disk sources whose domains are ``(corruption, severity)`` pairs."""

WRITTEN_SOURCES: tuple[str, ...] = ("fashion-mnist-c", "digits-c", "mnist-c")
"""Our own corrupted sets in the CIFAR-10-C layout (written by
:func:`~qtta_plugins.data.cifar_c.write_cifar_c_layout`)."""

DISK_SOURCES: tuple[str, ...] = (*SEVERITY_SOURCES, "folder", "image-list")
"""The sources :func:`qtta_plugins.data.make_stream` reads from disk."""

Transform = Callable[[Any], torch.Tensor]


def default_num_workers() -> int:
    """Decoding processes of a stream that does not say: ``min(4, CPU count)``."""
    return min(4, os.cpu_count() or 1)


def timm_transform(model: nn.Module, **overrides: Any) -> Transform:
    """The evaluation transform of a timm model: ``timm.data.create_transform(
    **timm.data.resolve_data_config(overrides, model=model))`` (``overrides``: e.g.
    ``input_size=(3, 32, 32)``, ``crop_pct=1.0``). Needs timm (the ``vision`` extra)."""
    from ..models.zoo import import_timm

    timm = import_timm()
    config = timm.data.resolve_data_config(overrides, model=model)
    return timm.data.create_transform(**config)


# --------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------


class DiskDataset(Dataset):
    """Map-style dataset over the concatenation of ``domains``: item ``i`` is one image tensor.

    Image files are opened with Pillow and converted to RGB (``channels=3``) or to gray
    (``channels=1``: PIL's ITU-R 601 luma, which gives a gray image replicated to RGB back
    exactly); ``.npy`` rows are read from a memory map opened in each process on first use (never
    pickled to the workers). Without ``transform`` an image becomes ``float32`` ``(C, H, W)`` in
    ``[0, 1]`` (torchvision's ``ToTensor``); with one, ``transform(PIL image)`` must give a tensor.
    """

    def __init__(
        self, domains: Sequence[DiskDomain], transform: Transform | None = None, channels: int = 3
    ) -> None:
        self.domains = list(domains)
        self.transform = transform
        self.channels = channels
        self.ends = np.cumsum([len(d) for d in self.domains]).tolist()
        self._arrays: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, index: int) -> torch.Tensor:
        d = bisect.bisect_right(self.ends, index)
        if not 0 <= index < len(self) or d >= len(self.domains):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        domain = self.domains[d]
        local = index - (self.ends[d - 1] if d else 0)
        if isinstance(domain, ArrayRows):
            return self._array_image(domain, local)
        return self._file_image(domain, local)

    def _file_image(self, domain: ImageFiles, i: int) -> torch.Tensor:
        from PIL import Image

        path = os.path.join(domain.root, domain.files[i])
        with Image.open(path) as image:
            image = image.convert("RGB" if self.channels == 3 else "L")
        if self.transform is not None:
            return self._checked(self.transform(image), path)
        return _to_tensor(np.array(image))  # a copy: PIL's own buffer is read-only

    def _array_image(self, domain: ArrayRows, i: int) -> torch.Tensor:
        array = self._arrays.get(domain.path)
        if array is None:
            array = self._arrays[domain.path] = np.load(domain.path, mmap_mode="r")
        rgb = np.array(array[domain.rows[i]])  # this row only, out of the map
        pixels = rgb if self.channels == 3 else _luma(rgb)
        if self.transform is None:
            return _to_tensor(pixels)
        from PIL import Image

        where = f"{domain.path} row {domain.rows[i]}"
        return self._checked(self.transform(Image.fromarray(pixels)), where)

    def _checked(self, x: Any, where: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"the transform gave a {type(x).__name__} for {where}, not a tensor: end it with "
                "a ToTensor / PILToTensor + ToDtype step"
            )
        return x

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = {}  # a memmap pickles as its whole data: each process maps its own
        return state


def _to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """``uint8`` ``(H, W, C)`` or ``(H, W)`` -> ``float32`` ``(C, H, W)`` in ``[0, 1]``."""
    x = torch.from_numpy(np.ascontiguousarray(pixels))
    x = x.unsqueeze(-1) if x.ndim == 2 else x
    return x.permute(2, 0, 1).float().div_(255.0).contiguous()


def _luma(rgb: np.ndarray) -> np.ndarray:
    """PIL's ``convert("L")`` on a ``uint8`` ``(H, W, 3)`` array (the same integer formula)."""
    weighted = rgb.astype(np.uint32) @ np.array([19595, 38470, 7471], dtype=np.uint32)
    return ((weighted + 0x8000) >> 16).astype(np.uint8)


def _stack(images: list[torch.Tensor]) -> torch.Tensor:
    shapes = {tuple(x.shape) for x in images}
    if len(shapes) > 1:
        raise ValueError(
            f"images of different shapes in one batch ({sorted(shapes)[:3]}): give a transform "
            "that resizes them to the model's input (e.g. torchvision weights' transforms() or "
            "qtta_plugins.data.disk.timm_transform(model))"
        )
    return torch.stack(images)


# --------------------------------------------------------------------------------------------
# the stream
# --------------------------------------------------------------------------------------------


class DiskStream:
    """Iterable of :class:`~qtta_plugins.data.Batch` over domains on disk (see the module doc).

    Domains, rounds, orders, ``mixed`` and ``reset_on_shift`` are those of
    :class:`~qtta_plugins.data.ContinualStream`, with the same :meth:`permutation` for the same
    labels and seed; ``Batch.y`` comes from the labels, ``Batch.x`` from the DataLoader.

    Attributes:
        sets: the domains (:class:`~qtta_plugins.data.layouts.ImageFiles` or
            :class:`~qtta_plugins.data.layouts.ArrayRows`: labels and where the images are).
        domains: domain names. dataset: the :class:`DiskDataset` over all of them.
        batch_size, rounds, order, dirichlet_delta, seed, channels, mixed, reset_on_shift,
        transform, num_workers: as given (``num_workers=None``: :func:`default_num_workers`).
    """

    def __init__(
        self,
        sets: Sequence[DiskDomain],
        domains: Sequence[str],
        *,
        batch_size: int = 50,
        rounds: int = 1,
        order: str = "iid",
        dirichlet_delta: float = 0.1,
        seed: int = 0,
        channels: int = 3,
        mixed: bool = False,
        reset_on_shift: bool = False,
        transform: Transform | None = None,
        num_workers: int | None = None,
    ) -> None:
        sets, names = list(sets), [str(d) for d in domains]
        if not sets or len(names) != len(sets):
            raise ValueError(f"got {len(sets)} domains on disk but {len(names)} domain names")
        check_stream_args(
            batch_size=batch_size,
            rounds=rounds,
            order=order,
            dirichlet_delta=dirichlet_delta,
            seed=seed,
            channels=channels,
            mixed=mixed,
            reset_on_shift=reset_on_shift,
        )
        _check_loading(transform, num_workers)
        self.sets: list[DiskDomain] = sets
        self.domains: list[str] = names
        self.batch_size, self.rounds, self.order = int(batch_size), int(rounds), order
        self.dirichlet_delta, self.seed, self.channels = float(dirichlet_delta), int(seed), channels
        self.mixed, self.reset_on_shift = mixed, reset_on_shift
        self.transform = transform
        self.num_workers = default_num_workers() if num_workers is None else int(num_workers)
        self.dataset = DiskDataset(sets, transform, channels)
        self._labels = np.concatenate([d.labels for d in sets])
        self._starts = np.concatenate([[0], np.cumsum([len(d) for d in sets])[:-1]])

    def __len__(self) -> int:
        sizes = [len(d) for d in self.sets]
        return count_batches(
            sizes, rounds=self.rounds, batch_size=self.batch_size, mixed=self.mixed
        )

    def permutation(self, round_index: int, domain_index: int | None) -> np.ndarray:
        """The sample order of ``(round_index, domain_index)`` (``None``: the pool of all domains,
        indices into their concatenation), from the labels alone: as
        :meth:`ContinualStream.permutation <qtta_plugins.data.ContinualStream.permutation>`."""
        labels = self._labels if domain_index is None else self.sets[domain_index].labels
        return sample_order(
            labels,
            order=self.order,
            dirichlet_delta=self.dirichlet_delta,
            seed=self.seed,
            round_index=round_index,
            domain_index=domain_index,
            n_domains=len(self.sets),
        )

    def plan(self) -> Iterator[tuple[int, int | None, np.ndarray]]:
        """``(round, domain index or None, indices into the dataset)`` of each batch, in order."""
        batches = batch_plan(
            self.permutation,
            len(self.sets),
            rounds=self.rounds,
            batch_size=self.batch_size,
            mixed=self.mixed,
        )
        for r, d, rows in batches:
            yield r, d, rows if d is None else rows + self._starts[d]

    def __iter__(self) -> Iterator[Batch]:
        loader = DataLoader(
            self.dataset,
            batch_sampler=_PlanSampler(self),
            num_workers=self.num_workers,
            collate_fn=_stack,
        )
        which = np.repeat(np.arange(len(self.sets)), [len(d) for d in self.sets])
        # the plan is deterministic: walked once for the loader's sampler, once here for the rest
        for (r, d, index), x in zip(self.plan(), loader, strict=True):
            y = torch.from_numpy(self._labels[index])
            if d is None:
                names = tuple(self.domains[k] for k in which[index])
                yield Batch(x=x, y=y, domain=MIXED, round=r, sample_domains=names)
            else:
                yield Batch(x=x, y=y, domain=self.domains[d], round=r)

    def __repr__(self) -> str:
        extra = (", mixed=True" if self.mixed else "") + (
            ", reset_on_shift=True" if self.reset_on_shift else ""
        )
        return (
            f"DiskStream(domains={self.domains}, batch_size={self.batch_size}, "
            f"rounds={self.rounds}, order={self.order!r}{extra}, batches={len(self)})"
        )


class _PlanSampler:
    """The DataLoader's batch sampler: the dataset indices of each batch, in stream order."""

    def __init__(self, stream: DiskStream) -> None:
        self.stream = stream

    def __iter__(self) -> Iterator[list[int]]:
        for _, _, index in self.stream.plan():
            yield index.tolist()

    def __len__(self) -> int:
        return len(self.stream)


def _check_loading(transform: Any, num_workers: Any) -> None:
    if transform is not None and not callable(transform):
        raise ValueError(f"transform must be a callable on a PIL image, got {transform!r}")
    if num_workers is not None and (
        isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0
    ):
        raise ValueError(f"num_workers must be an int >= 0 or None, got {num_workers!r}")


# --------------------------------------------------------------------------------------------
# make_stream's disk sources
# --------------------------------------------------------------------------------------------


def disk_stream(
    setting: str,
    source: str,
    *,
    root: str | os.PathLike[str] | None = None,
    severity: int | None = None,
    corruptions: Sequence[str] | None = None,
    batch_size: int = 50,
    rounds: int = 1,
    order: str = "iid",
    dirichlet_delta: float = 0.1,
    seed: int = 0,
    channels: int | None = None,
    per_domain: int | None = None,
    n_test: int | None = None,
    transform: Transform | None = None,
    num_workers: int | None = None,
    image_list: str | os.PathLike[str] | None = None,
    class_order: Sequence[str] | str | os.PathLike[str] | None = None,
) -> DiskStream:
    """The ``setting`` stream (see :func:`~qtta_plugins.data.make_stream`) of the disk ``source``.

    Sources and what ``root`` holds:

    * ``"cifar10-c"`` / ``"cifar100-c"``: RobustBench's ``<root>/CIFAR-10-C/<corruption>.npy``
      (``CIFAR-100-C``), the five severities stacked, and ``labels.npy``;
      ``"fashion-mnist-c"`` (and ``"digits-c"``, ``"mnist-c"``): the same layout, as written by
      :func:`~qtta_plugins.data.cifar_c.write_cifar_c_layout` (``root`` defaults to where it
      writes the full set);
    * ``"imagenet-c"``: ``<root>/ImageNet-C/<corruption>/<severity>/<wnid>/*.JPEG``;
      ``image_list``: only the images it lists (RobustBench's 5,000-image subset);
      ``class_order``: the wnids in the order of the model's head (default: sorted);
    * ``"folder"``: ``<root>/<domain>/<class>/<image>``; ``corruptions`` names the domains
      (default: every sub-folder, sorted); ``class_order`` as above (default: class names sorted);
    * ``"image-list"``: ``image_list``'s lines ``<domain>/<path> <label>`` under ``root``;
      ``corruptions`` names the domains (default: all, sorted).

    The corrupted sources take ``severity`` (default 5) and every setting; ``corruptions`` are file
    or folder names (default: the 15 of :data:`~qtta_plugins.data.CORRUPTIONS`; CIFAR-10-C's four
    extra ones work too). ``"folder"`` and ``"image-list"`` have no severities: ``"gradual"`` and
    ``severity`` are errors there. ``per_domain``: a seeded, class-stratified subset of each
    domain (from its labels). ``channels``: 3 (RGB, default) or 1 (gray). ``num_workers``: the
    DataLoader's (default :func:`default_num_workers`).

    Every file and folder is checked, and the labels read, before any image is decoded.

    Raises:
        FileNotFoundError: a file or folder of the layout is missing (named, with the layout).
        ValueError: an argument the source or setting does not take, or a malformed file.
    """
    if setting not in SETTINGS:
        raise ValueError(f"unknown stream setting {setting!r}; settings: {', '.join(SETTINGS)}")
    mixed, reset = setting == "mixed", setting == "reset"
    channels = 3 if channels is None else channels
    check_stream_args(
        batch_size=batch_size,
        rounds=rounds,
        order=order,
        dirichlet_delta=dirichlet_delta,
        seed=seed,
        channels=channels,
        mixed=mixed,
        reset_on_shift=reset,
    )
    _check_loading(transform, num_workers)
    if source not in DISK_SOURCES:
        raise ValueError(f"unknown disk source {source!r}; sources: {', '.join(DISK_SOURCES)}")
    if n_test is not None:
        raise ValueError(
            "n_test splits the sources in memory; a disk source streams its files: use "
            "per_domain for a shorter stream"
        )
    if image_list is not None and source not in ("imagenet-c", "image-list"):
        raise ValueError(
            f"image_list: only for the imagenet-c and image-list sources, not {source!r}"
        )
    if class_order is not None and source not in ("imagenet-c", "folder"):
        raise ValueError(
            f"class_order: only for the imagenet-c and folder sources ({source!r} stores labels)"
        )
    names = None if corruptions is None else _names(corruptions)
    if root is None and source not in WRITTEN_SOURCES:
        raise ValueError(f"the {source} source reads a data set on disk: pass root=<folder>")
    if source in WRITTEN_SOURCES:
        root = default_cifar_c_root() if root is None else root
        folder = Path(root).expanduser() / CIFAR_C_FOLDERS[source]
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder} is not a folder: write it once with qtta_plugins.data."
                f"write_cifar_c_layout({source[:-2]!r}, root={str(root)!r}) (the CIFAR-10-C layout)"
            )
    if source in SEVERITY_SOURCES:
        pairs = _severity_pairs(setting, severity, names or list(CORRUPTIONS))
        unique = list(dict.fromkeys(pairs))
        if source == "imagenet-c":
            found = imagenet_c_domains(root, unique, image_list=image_list, class_order=class_order)
        else:
            found = cifar_c_domains(root, source, unique)
        by_pair = dict(zip(unique, found, strict=True))
        sets: list[DiskDomain] = [by_pair[p] for p in pairs]
        domains = [f"{c}-{s}" for c, s in pairs] if setting == "gradual" else [c for c, _ in pairs]
    else:
        if setting == "gradual" or severity is not None:
            raise ValueError(
                f"the {source} source's domains have no severities: the "
                f"{'gradual setting' if setting == 'gradual' else 'severity argument'} needs a "
                f"corrupted source ({', '.join(SEVERITY_SOURCES)})"
            )
        if source == "folder":
            domains, sets = folder_domains(root, names, class_order=class_order)
        elif image_list is None:
            raise ValueError("the image-list source needs image_list=<file of '<path> <label>'>")
        else:
            domains, sets = image_list_domains(root, image_list, names)
    if per_domain is not None:
        sets = _cut(sets, per_domain, seed)
    return DiskStream(
        sets,
        domains,
        batch_size=batch_size,
        rounds=rounds,
        order=order,
        dirichlet_delta=dirichlet_delta,
        seed=seed,
        channels=channels,
        mixed=mixed,
        reset_on_shift=reset,
        transform=transform,
        num_workers=num_workers,
    )


def _names(corruptions: Sequence[str] | str) -> list[str]:
    names = [corruptions] if isinstance(corruptions, str) else [str(c) for c in corruptions]
    if not names:
        raise ValueError("corruptions must not be empty")
    bad = [c for c in names if not c or c in (".", "..") or "/" in c or os.sep in c]
    if bad:
        raise ValueError(f"corruptions / domains are folder or file names, got {bad}")
    return names


def _severity_pairs(
    setting: str, severity: int | None, corruptions: list[str]
) -> list[tuple[str, int]]:
    if setting == "gradual":
        if severity is not None:
            raise ValueError("the gradual setting walks the severities: do not pass severity")
        return [(c, s) for c in corruptions for s in GRADUAL_SEVERITIES]
    severity = 5 if severity is None else severity
    _check_severity(severity)
    return [(c, int(severity)) for c in corruptions]


def _cut(sets: list[DiskDomain], per_domain: int, seed: int) -> list[DiskDomain]:
    """The seeded stratified ``per_domain`` samples of each domain, chosen on its labels (the same
    ones in every domain with the same labels, as the sources in memory do)."""
    _check_positive_int("per_domain", per_domain)
    smallest = min(len(d) for d in sets)
    if per_domain > smallest:
        raise ValueError(f"per_domain must be an int in [1, {smallest}], got {per_domain!r}")
    cut: dict[int, DiskDomain] = {}  # a domain a gradual stream revisits is cut once
    for d in sets:
        if id(d) not in cut and per_domain < len(d):
            cut[id(d)] = d.subset(_stratified_subset(d.labels, int(per_domain), seed)[1])
    return [cut.get(id(d), d) for d in sets]


__all__ = [
    "DISK_SOURCES",
    "SEVERITY_SOURCES",
    "WRITTEN_SOURCES",
    "DiskDataset",
    "DiskStream",
    "default_num_workers",
    "disk_stream",
    "timm_transform",
]

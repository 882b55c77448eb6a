"""Continual test-time-adaptation streams: the corrupted sets one domain after another, in an
i.i.d. or a class-imbalanced (Dirichlet) order, over one or more rounds."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .corruption import (
    CORRUPTIONS,
    _check_corruption,
    _check_seed,
    _check_severity,
    corrupt_set,
)
from .sources import ImageSet, _load_test, _stratified_subset

ORDERS: tuple[str, ...] = ("iid", "dirichlet")
"""Within-domain sample orders accepted by :class:`ContinualStream`."""


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

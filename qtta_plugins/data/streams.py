"""Test-time-adaptation streams: the corrupted sets one domain after another, in an i.i.d. or a
class-imbalanced (Dirichlet) order, over one or more rounds; and the named stream settings of the
continual-TTA literature (:data:`SETTINGS`, :func:`make_stream`) built on the same machinery.

Over 500 lines: the six settings of :func:`make_stream` share one sample order and one validation, and each setting's docstring is part of the contract.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .corruption import (
    CORRUPTIONS,
    _check_corruption,
    _check_seed,
    _check_severity,
    corrupt_set,
)
from .sources import SOURCES, ImageSet, _load_test, _stratified_subset

if TYPE_CHECKING:
    from .disk import DiskStream

ORDERS: tuple[str, ...] = ("iid", "dirichlet")
"""Within-domain sample orders accepted by :class:`ContinualStream`."""

SETTINGS: tuple[str, ...] = ("continual", "reset", "gradual", "mixed", "dirichlet", "long")
"""Stream settings accepted by :func:`make_stream` (see there for what each one is)."""

GRADUAL_SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5, 4, 3, 2, 1)

#: A domain name that in-memory streams accept beside the corruptions: the test images
#: uncorrupted (``corruptions=["clean"]`` with method ``source`` measures clean accuracy).
CLEAN = "clean"
"""The severity ladder of the ``"gradual"`` setting, walked for every corruption in turn."""

LONG_ROUNDS = 10
"""Rounds of the ``"long"`` setting unless ``rounds=`` says otherwise (ZOA's 10-round protocol:
1500 batches of 50 on digits, minutes on two cores)."""

MIXED = "mixed"
"""``Batch.domain`` of a mixed-domains batch (its samples' own domains are ``sample_domains``)."""


@dataclass(frozen=True, eq=False)
class Batch:
    """One test-time batch of a :class:`ContinualStream`.

    Attributes:
        x: images ``(B, C, S, S)`` (``C`` is the stream's ``channels``: 1, or 3 for RGB models).
        y: labels ``(B,)`` (for evaluation only; a TTA method must not use them).
        domain: name of the domain (e.g. the corruption) the batch comes from; ``"mixed"`` for a
            batch of a mixed-domains stream.
        round: 0-based index of the pass over all domains.
        sample_domains: the domain of each sample, where the batch mixes domains (``None``
            otherwise: every sample is from ``domain``).
    """

    x: torch.Tensor
    y: torch.Tensor
    domain: str
    round: int
    sample_domains: tuple[str, ...] | None = None


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


def sample_order(
    labels: np.ndarray,
    *,
    order: str,
    dirichlet_delta: float,
    seed: int,
    round_index: int,
    domain_index: int | None,
    n_domains: int,
) -> np.ndarray:
    """The order of a domain's samples in one round, from their labels alone (no image is read).

    ``order`` is ``"iid"`` (a seeded permutation) or ``"dirichlet"`` (the label-Dirichlet order,
    see :class:`ContinualStream`). The generator is seeded from ``(seed, round_index,
    domain_index)``; ``domain_index=None`` orders the pool of all ``n_domains`` domains (the mixed
    setting) under a 4-word key that is never one domain's. Every stream, in memory
    (:class:`ContinualStream`) or on disk (:class:`~qtta_plugins.data.disk.DiskStream`), orders its
    samples here, so the same labels and seed give the same order whatever holds the images.
    """
    if domain_index is None:
        rng = np.random.default_rng([seed, round_index, n_domains, 1])
    else:
        rng = np.random.default_rng([seed, round_index, domain_index])
    if order == "dirichlet":
        return _dirichlet_order(labels, dirichlet_delta, rng)
    return rng.permutation(len(labels))


def batch_plan(
    permutation: Callable[[int, int | None], np.ndarray],
    n_domains: int,
    *,
    rounds: int,
    batch_size: int,
    mixed: bool,
) -> Iterator[tuple[int, int | None, np.ndarray]]:
    """A stream's batches as ``(round, domain index, sample indices)``, in stream order.

    Each round visits the domains in order (``mixed``: one pool, domain index ``None``), orders
    each by ``permutation(round, domain index)`` and cuts it into ``batch_size`` slices (a
    domain's last one may be shorter). The indices are into the domain (``mixed``: into the
    concatenation of all domains).
    """
    for r in range(rounds):
        for d in [None] if mixed else range(n_domains):
            perm = permutation(r, d)
            for start in range(0, len(perm), batch_size):
                yield r, d, perm[start : start + batch_size]


def count_batches(sizes: Sequence[int], *, rounds: int, batch_size: int, mixed: bool) -> int:
    """How many batches :func:`batch_plan` yields for domains of ``sizes`` samples."""
    if mixed:
        per_round = math.ceil(sum(sizes) / batch_size)
    else:
        per_round = sum(math.ceil(n / batch_size) for n in sizes)
    return rounds * per_round


def check_stream_args(
    *,
    batch_size: Any,
    rounds: Any,
    order: Any,
    dirichlet_delta: Any,
    seed: Any,
    channels: Any,
    mixed: Any,
    reset_on_shift: Any,
) -> None:
    """Raise ``ValueError`` naming the first stream argument that is not valid."""
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("rounds", rounds)
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; valid orders: {', '.join(ORDERS)}")
    if not (isinstance(dirichlet_delta, (int, float)) and dirichlet_delta > 0):
        raise ValueError(f"dirichlet_delta must be > 0, got {dirichlet_delta!r}")
    _check_seed(seed)
    if isinstance(channels, bool) or channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    for flag, value in (("mixed", mixed), ("reset_on_shift", reset_on_shift)):
        if not isinstance(value, bool):
            raise ValueError(f"{flag} must be True or False, got {value!r}")


class ContinualStream:
    """Iterable of :class:`Batch` over a sequence of domains, repeated for ``rounds`` rounds.

    Domains are visited in the given order (unless ``mixed``); each round visits all of them.  Within
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

    ``mixed=True`` pools the samples of all domains in each round and orders the pool as above
    (a permutation seeded from ``(seed, round)``): every batch then draws from several domains,
    its ``domain`` is ``"mixed"`` and its ``sample_domains`` name each sample's own.

    ``reset_on_shift=True`` is a policy the stream carries for the adaptation that runs on it:
    :func:`qtta_plugins.adapt` (and :meth:`~qtta_plugins.Adaptation.run`) put the model and the
    method back at their start whenever the batch's domain changes (the reset-each-shift setting).
    The batches themselves are the same.

    Attributes:
        sets: the per-domain :class:`ImageSet` objects.
        domains: domain names (``Batch.domain``; with ``mixed``, ``Batch.sample_domains``).
        batch_size, rounds, order, dirichlet_delta, seed, channels, mixed, reset_on_shift: as given.
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
        mixed: bool = False,
        reset_on_shift: bool = False,
    ) -> None:
        sets = list(sets)
        if not sets:
            raise ValueError("a ContinualStream needs at least one domain")
        names = [s.name for s in sets] if domains is None else [str(d) for d in domains]
        if len(names) != len(sets):
            raise ValueError(f"got {len(sets)} image sets but {len(names)} domain names")
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
        self.sets: list[ImageSet] = sets
        self.domains: list[str] = names
        self.batch_size = int(batch_size)
        self.rounds = int(rounds)
        self.order = order
        self.dirichlet_delta = float(dirichlet_delta)
        self.seed = int(seed)
        self.channels = int(channels)
        self.mixed = mixed
        self.reset_on_shift = reset_on_shift

    def __len__(self) -> int:
        sizes = [len(s) for s in self.sets]
        return count_batches(
            sizes, rounds=self.rounds, batch_size=self.batch_size, mixed=self.mixed
        )

    def permutation(self, round_index: int, domain_index: int | None) -> np.ndarray:
        """The within-domain sample order used for ``(round_index, domain_index)``; with
        ``domain_index=None``, the order of the pool of all domains' samples (``mixed``: indices
        into the concatenation of :attr:`sets`). See :func:`sample_order`."""
        if domain_index is None:
            labels = torch.cat([s.y for s in self.sets]).detach().cpu().numpy()
        else:
            labels = self.sets[domain_index].y.detach().cpu().numpy()
        return sample_order(
            labels,
            order=self.order,
            dirichlet_delta=self.dirichlet_delta,
            seed=self.seed,
            round_index=round_index,
            domain_index=domain_index,
            n_domains=len(self.sets),
        )

    def __iter__(self) -> Iterator[Batch]:
        if self.mixed:
            x_all = torch.cat([s.x for s in self.sets])
            y_all = torch.cat([s.y for s in self.sets])
            which = np.concatenate([np.full(len(s), d) for d, s in enumerate(self.sets)])
        plan = batch_plan(
            self.permutation,
            len(self.sets),
            rounds=self.rounds,
            batch_size=self.batch_size,
            mixed=self.mixed,
        )
        for r, d, rows in plan:
            idx = torch.from_numpy(rows)
            if d is None:
                yield Batch(
                    x=to_channels(x_all[idx], self.channels),
                    y=y_all[idx],
                    domain=MIXED,
                    round=r,
                    sample_domains=tuple(self.domains[k] for k in which[rows]),
                )
            else:
                images = self.sets[d]
                x = to_channels(images.x[idx], self.channels)
                yield Batch(x=x, y=images.y[idx], domain=self.domains[d], round=r)

    def __repr__(self) -> str:
        extra = (", mixed=True" if self.mixed else "") + (
            ", reset_on_shift=True" if self.reset_on_shift else ""
        )
        return (
            f"ContinualStream(domains={self.domains}, batch_size={self.batch_size}, "
            f"rounds={self.rounds}, order={self.order!r}{extra}, batches={len(self)})"
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
    _check_severity(severity)  # make_stream reads None as its default; here it is an error
    return make_stream(
        "continual",
        source,
        severity=severity,
        corruptions=corruptions,
        batch_size=batch_size,
        rounds=rounds,
        order=order,
        dirichlet_delta=dirichlet_delta,
        n_test=n_test,
        size=size,
        root=root,
        seed=seed,
        progress=progress,
        channels=channels,
        per_domain=per_domain,
    )


def _corrupted_sets(
    source: str,
    domains: Sequence[tuple[str, int]],
    *,
    n_test: int | None,
    size: int,
    root: str | None,
    seed: int,
    progress: bool | None,
    per_domain: int | None,
    split_seed: int | None = None,
) -> list[ImageSet]:
    """The test split of ``source`` under each ``(corruption, severity)`` of ``domains`` (a pair
    that comes back is corrupted once), cut to the same ``per_domain`` images in every domain.
    The split is drawn by ``split_seed`` when given, else by ``seed``."""
    test = _load_test(source, root, size, n_test, seed if split_seed is None else split_seed)
    if per_domain is not None and (
        isinstance(per_domain, bool)
        or not isinstance(per_domain, (int, np.integer))
        or not 1 <= per_domain <= len(test)
    ):
        raise ValueError(f"per_domain must be an int in [1, {len(test)}], got {per_domain!r}")
    done: dict[tuple[str, int], ImageSet] = {}
    for pair in domains:
        if pair in done:
            continue
        if pair[0] == CLEAN:  # the uncorrupted test images: a clean-accuracy row on one code path
            done[pair] = ImageSet(test.x, test.y, f"{test.name}/{CLEAN}")
        else:
            done[pair] = corrupt_set(test, pair[0], pair[1], seed=seed, progress=progress)
    sets = [done[pair] for pair in domains]
    if per_domain is not None and per_domain < len(test):
        _, keep = _stratified_subset(test.y.numpy(), int(per_domain), seed)
        index = torch.from_numpy(keep)
        cut = {
            pair: ImageSet(s.x[index], s.y[index], f"{s.name}-{per_domain}")
            for pair, s in done.items()
        }
        sets = [cut[pair] for pair in domains]
    return sets


def make_stream(
    setting: str = "continual",
    source: str = "digits",
    *,
    severity: int | None = None,
    corruptions: Sequence[str] | None = None,
    batch_size: int = 50,
    rounds: int | None = None,
    order: str | None = None,
    dirichlet_delta: float = 0.1,
    n_test: int | None = None,
    size: int = 32,
    root: str | os.PathLike[str] | None = None,
    seed: int = 0,
    progress: bool | None = None,
    channels: int | None = None,
    per_domain: int | None = None,
    transform: Callable[[Any], torch.Tensor] | None = None,
    num_workers: int | None = None,
    image_list: str | os.PathLike[str] | None = None,
    class_order: Sequence[str] | str | os.PathLike[str] | None = None,
    split_seed: int | None = None,
) -> ContinualStream | DiskStream:
    """The stream of a named test-time-adaptation setting (one of :data:`SETTINGS`).

    The settings of the continual-TTA benchmarks (the five of Marsden and Döbler's
    test-time-adaptation library, and the long streams of the collapse studies), all over the
    corrupted test split of ``source`` and built on :func:`continual_stream`'s machinery:

    * ``"continual"``: the corruptions one after another at ``severity`` (default 5), no reset;
      exactly :func:`continual_stream` (CoTTA, Wang et al., CVPR 2022).
    * ``"reset"``: the same batches, carrying ``reset_on_shift=True``: the core puts the model and
      the method back at their start at every domain boundary, so each domain is adapted from the
      source model (the reset-each-shift setting).
    * ``"gradual"``: for every corruption in turn, the severities 1, 2, 3, 4, 5, 4, 3, 2, 1
      (:data:`GRADUAL_SEVERITIES`), so the shift grows and shrinks slowly and the next corruption
      starts again at severity 1 (the gradual setting of CoTTA and of RMT, Döbler et al., CVPR
      2023). The domains are named ``"<corruption>-<severity>"`` (``"fog-3"``); ``severity`` is not
      taken. Nine domains per corruption: nine times the batches of ``"continual"``.
    * ``"mixed"``: all corruptions' samples pooled and shuffled in each round: every batch mixes
      domains (``Batch.domain == "mixed"``, ``Batch.sample_domains`` per sample).
    * ``"dirichlet"``: ``"continual"`` with the class-imbalanced label-Dirichlet order within each
      domain (RoTTA, Yuan et al., CVPR 2023; ``dirichlet_delta``, default 0.1).
    * ``"long"``: ``"continual"`` repeated for ``rounds`` rounds (default :data:`LONG_ROUNDS`), the
      long streams on which continual methods collapse (RDumb, Press et al., NeurIPS 2023; CCC).

    ``order`` (``"iid"`` or ``"dirichlet"``) is the within-domain order of the other settings
    (``"gradual"`` with ``order="dirichlet"`` is the library's gradual-correlated setting); the
    ``"dirichlet"`` setting takes only ``"dirichlet"``. ``rounds`` defaults to 1, and to
    :data:`LONG_ROUNDS` for ``"long"`` (which needs at least 2). The other arguments are those of
    :func:`continual_stream` (``corruptions``: all of :data:`CORRUPTIONS` unless given, and for
    the in-memory sources :data:`CLEAN` too, the uncorrupted test images; ``channels``: 1 unless
    given). Streams are deterministic under ``seed``.

    Sources on disk (:data:`~qtta_plugins.data.disk.DISK_SOURCES`: ``"cifar10-c"``,
    ``"cifar100-c"``, ``"imagenet-c"``, ``"fashion-mnist-c"``, ``"folder"``, ``"image-list"``)
    read the data set under ``root`` in its own layout and give a
    :class:`~qtta_plugins.data.disk.DiskStream`: the same settings, the same sample order for the
    same labels and seed, images decoded batch by batch by a DataLoader. ``transform``,
    ``num_workers``, ``image_list`` and ``class_order`` apply to them only (see
    :func:`~qtta_plugins.data.disk.disk_stream`, where each layout is described); ``size``,
    ``n_test``, ``progress`` and ``split_seed`` (the test split drawn by it instead of ``seed``:
    one split for every seed) to the sources in memory only (a disk source's images keep their
    size unless ``transform`` resizes them).

    Raises:
        ValueError: an unknown ``setting`` (the message lists :data:`SETTINGS`) or ``source``, an
            argument the setting or the source does not take, or any :func:`continual_stream`
            error; before anything is corrupted or read.
        FileNotFoundError: a disk source's file or folder is missing (the message names it and
            the layout expected).
    """
    if not isinstance(setting, str) or setting not in SETTINGS:
        raise ValueError(f"unknown stream setting {setting!r}; settings: {', '.join(SETTINGS)}")
    from .disk import DISK_SOURCES, disk_stream  # here: the disk module builds on this one

    if not isinstance(source, str) or source not in (*SOURCES, *DISK_SOURCES):
        raise ValueError(
            f"unknown source {source!r}; in memory: {', '.join(SOURCES)}; on disk: "
            f"{', '.join(DISK_SOURCES)}"
        )
    if setting == "gradual" and severity is not None:
        raise ValueError(
            "the gradual setting walks the severities "
            f"{', '.join(map(str, GRADUAL_SEVERITIES))} for each corruption: do not pass severity"
        )
    if order is None:
        order = "dirichlet" if setting == "dirichlet" else "iid"
    elif setting == "dirichlet" and order != "dirichlet":
        raise ValueError(
            f"the dirichlet setting is the label-Dirichlet order; got order={order!r} (leave it "
            "out, or use setting 'continual' for another order)"
        )
    if rounds is None:
        rounds = LONG_ROUNDS if setting == "long" else 1
    _check_positive_int("rounds", rounds)
    if setting == "long" and rounds < 2:
        raise ValueError(f"the long setting is several rounds of the stream; got rounds={rounds}")
    if source in DISK_SOURCES and split_seed is not None:
        raise ValueError(
            f"split_seed: only for the sources in memory; {source!r} is on disk, its split is fixed"
        )
    if source in DISK_SOURCES:
        return disk_stream(
            setting,
            source,
            root=root,
            severity=severity,
            corruptions=corruptions,
            batch_size=batch_size,
            rounds=rounds,
            order=order,
            dirichlet_delta=dirichlet_delta,
            seed=seed,
            channels=channels,
            per_domain=per_domain,
            n_test=n_test,
            transform=transform,
            num_workers=num_workers,
            image_list=image_list,
            class_order=class_order,
        )
    disk_only = [
        name
        for name, value in (
            ("transform", transform),
            ("num_workers", num_workers),
            ("image_list", image_list),
            ("class_order", class_order),
        )
        if value is not None
    ]
    if split_seed is not None:
        _check_seed(split_seed)
    if disk_only:
        raise ValueError(
            f"{', '.join(disk_only)}: only for the sources on disk ({', '.join(DISK_SOURCES)}); "
            f"{source!r} is in memory"
        )
    severity = 5 if severity is None else severity
    channels = 1 if channels is None else channels
    corruptions = CORRUPTIONS if corruptions is None else corruptions
    if isinstance(corruptions, str):
        corruptions = [corruptions]
    corruptions = list(corruptions)
    if not corruptions:
        raise ValueError("corruptions must not be empty")
    for c in corruptions:
        if c != CLEAN:
            _check_corruption(c)
    _check_severity(severity)
    _check_positive_int("batch_size", batch_size)
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; valid orders: {', '.join(ORDERS)}")
    _check_seed(seed)
    if not (isinstance(dirichlet_delta, (int, float)) and dirichlet_delta > 0):
        raise ValueError(f"dirichlet_delta must be > 0, got {dirichlet_delta!r}")
    if isinstance(channels, bool) or channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if setting == "gradual":
        pairs = [(c, s) for c in corruptions for s in GRADUAL_SEVERITIES]
        names = [f"{c}-{s}" for c, s in pairs]
    else:
        pairs = [(c, int(severity)) for c in corruptions]
        names = corruptions
    sets = _corrupted_sets(
        source,
        pairs,
        n_test=n_test,
        size=size,
        root=root,
        seed=seed,
        progress=progress,
        per_domain=per_domain,
        split_seed=split_seed,
    )
    return ContinualStream(
        sets,
        domains=names,
        batch_size=batch_size,
        rounds=rounds,
        order=order,
        dirichlet_delta=dirichlet_delta,
        seed=seed,
        channels=channels,
        mixed=setting == "mixed",
        reset_on_shift=setting == "reset",
    )

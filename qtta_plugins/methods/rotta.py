"""``rotta``: RoTTA (Yuan et al., "Robust Test-Time Adaptation in Dynamic Scenarios", CVPR 2023).

Built for streams whose label distribution drifts and whose batches are correlated (one class at a
time, small batches), where test-batch statistics and per-batch updates go wrong. Three parts:

* **Robust batch normalisation (RBN)**: batch norms normalise with global statistics, an EMA
  (``rbn_decay`` 0.95 kept on the old statistics, the paper's ``alpha = 0.05`` on each batch's)
  of the batch statistics seen during the updates, instead of each test batch's own. Built here (:class:`RobustBatchNorm`) on the view's norms and
  their inputs (:meth:`~qtta_plugins.view.QuantView.norm_input_module`), so it serves every backend;
  the statistics live in the norms' running buffers.
* **Category-balanced sampling with timeliness and uncertainty (CSTU)**: a memory of
  ``memory_capacity`` (64) test samples, each kept with its predicted class, its age (how many
  samples arrived since) and its uncertainty (the entropy of the teacher's prediction). The quota
  of a class is ``capacity / K`` (at most ``ceil(capacity / K)`` items). A sample predicted as
  class ``c`` enters if ``c`` is under its quota and the memory has room; otherwise it must
  displace an item (of ``c`` itself when ``c`` is at its quota, else of a class holding the most
  items) whose score is higher than its own, the highest-scoring such item; the score is
  ``lambda_t * sigmoid(age / capacity) + lambda_u * entropy / log K`` (old and uncertain items
  go first, a new sample scores ``lambda_t / 2 + lambda_u * entropy / log K``). A sample that
  displaces nothing is dropped. Every item ages by one per arriving sample. So no class can flood
  the memory, whatever the order of the stream.
* **Teacher-student with timeliness reweighting**: the teacher (an EMA of the student, weight
  ``teacher_decay`` 0.999 on the old teacher, the paper's ``nu = 0.001`` on the student) predicts the stream. Every ``update_frequency`` (64) samples
  the student takes one step on the memory: the cross-entropy from its logits on strongly
  augmented items (:func:`qtta_plugins.methods.cotta.augment`) to the teacher's soft labels on
  the items themselves, each item weighted by ``w(a) = exp(-a / C) / (1 + exp(-a / C))``
  (``a`` its age, ``C`` the capacity): ``w`` falls from 1/2 at age 0 towards 0, so items from a
  domain the stream has left count less. Then the teacher moves towards the student. RBN
  statistics move during the update only (the teacher's on the items, the student's on their
  augmented copies); predicting the stream leaves them alone.

The norm affines adapt (Adam, lr 1e-3), as in the paper. Our choices:

* The teacher is the run's model (``run.model``): it predicts, so what a user exports is what
  made the predictions. The student is a view of its copy (:meth:`~qtta_plugins.view.QuantView.copy`).
* The number of classes ``K`` is read from the first batch's logits.
* A step falls due at the sample it counts, inside a batch: the memory then holds the samples up
  to that one (the reference code updates at the same point).
* Switches (``RoTTAConfig``): ``rbn=False`` uses test-batch statistics; ``balanced_memory=False``
  a first-in first-out memory of the same size; ``mean_teacher=False`` makes the teacher the
  student as of its last step; ``timeliness=False`` weighs items alike; ``strong_augment=False``
  shows the student the items as they are.

Randomness (augmentations) comes from the method's own generator seeded with ``config.seed``.

Over 500 lines: one method read top to bottom, its config (with where each default comes from), RBN,
the CSTU memory and the teacher-student update, each next to the part of the paper it follows.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import (
    UPDATED_TO_KEPT,
    AdaptConfig,
    Renamed,
    check_flags,
    check_int,
    check_nonnegative,
    check_optimizer,
    check_unit,
)
from ..hookspecs import hookimpl
from ..view import NormLayer, QuantView
from .base import (
    MethodInfo,
    TestTimeMethod,
    check_count,
    check_generator_state,
    check_named_tensors,
    refuse_forward_only,
)
from .cotta import (
    _import_v2,
    augment,
    ema_update,
    make_optimizer,
    paired,
    soft_cross_entropy,
)

__all__ = ["BalancedMemory", "RoTTA", "RoTTAConfig", "timeliness_weight"]


@dataclass
class RoTTAConfig(AdaptConfig):
    """RoTTA (Yuan et al., CVPR 2023): robust test-time adaptation in dynamic scenarios
    (see the module docstring).

    Parts, each switchable off: ``rbn`` (robust batch normalisation: global statistics, an EMA
    with weight ``rbn_decay`` on the old global statistics, ``1 - rbn_decay`` on each batch's;
    off: test-batch statistics), ``balanced_memory``
    (the category-balanced memory CSTU of ``memory_capacity`` samples, scored by age
    ``lambda_t`` and uncertainty ``lambda_u``; off: a first-in first-out memory of the same size),
    ``mean_teacher`` (the teacher is an EMA of the student with weight ``teacher_decay`` on the
    old teacher, ``1 - teacher_decay`` on the student; off: the teacher is the student as of the
    last step), ``timeliness`` (the loss weighs each
    memory item by its age; off: uniformly), ``strong_augment`` (the student sees augmented
    memory items; off: the items as they are). The student takes one step every
    ``update_frequency`` test samples, on the memory. ``optimizer`` / ``lr`` / ``momentum`` (SGD
    only) / ``weight_decay``: Adam at 1e-3, the paper's setting; the norm affines adapt.

    The paper's ``alpha = 0.05`` (RBN) and ``nu = 0.001`` (teacher) are the fractions *updated*:
    ``rbn_decay = 0.95`` and ``teacher_decay = 0.999`` are the same EMAs, written as every config
    writes an EMA (the weight kept). The old options ``rbn_momentum`` / ``ema_nu`` held the
    paper's values and are converted (``1 - value``) when given.
    """

    renamed_options: ClassVar[dict[str, Renamed]] = {
        "rbn_momentum": Renamed(
            "rbn_decay", UPDATED_TO_KEPT, "it held the fraction updated: rbn_decay = 1 - value"
        ),
        "ema_nu": Renamed(
            "teacher_decay",
            UPDATED_TO_KEPT,
            "it held the fraction updated: teacher_decay = 1 - value",
        ),
    }

    method: str = "rotta"
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    rbn: bool = True
    rbn_decay: float = 0.95
    balanced_memory: bool = True
    memory_capacity: int = 64
    lambda_t: float = 1.0
    lambda_u: float = 1.0
    update_frequency: int = 64
    mean_teacher: bool = True
    teacher_decay: float = 0.999
    timeliness: bool = True
    strong_augment: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_optimizer(self)
        check_flags(self, "rbn", "balanced_memory", "mean_teacher", "timeliness", "strong_augment")
        check_unit(self, "rbn_decay", low_open=False, high_open=True)
        check_int(self, "memory_capacity", 1)
        check_int(self, "update_frequency", 1)
        check_unit(self, "teacher_decay", low_open=False, high_open=False)
        check_nonnegative(self, "lambda_t", "lambda_u")


def timeliness_weight(ages: torch.Tensor, capacity: int) -> torch.Tensor:
    """RoTTA's timeliness reweighting ``exp(-a / C) / (1 + exp(-a / C))`` of items aged ``ages``
    in a memory of capacity ``C``: 1/2 for a new item, decreasing with age."""
    return torch.sigmoid(-ages.float() / capacity)


# --- robust batch normalisation -------------------------------------------------------------
class _RobustNormHook:
    """The forward pre-hook :class:`RobustBatchNorm` puts in front of one batch norm. It holds
    its owner by a weak reference, so a deep copy of the model does not copy the owner (and
    :meth:`QuantView.copy` drops it from copies)."""

    drop_on_copy = True  # a copied hook would still update the original model's statistics

    def __init__(self, owner: RobustBatchNorm, norm: NormLayer) -> None:
        self.owner = weakref.ref(owner)
        self.norm = norm

    def __call__(self, module: nn.Module, args: tuple[object, ...]) -> tuple[object, ...] | None:
        owner = self.owner()
        if owner is None or not owner.updating or not args:
            return None
        x = args[0]
        if not isinstance(x, torch.Tensor) or x.ndim < 2:
            return None
        return (owner._fold(self.norm, x), *args[1:])


class RobustBatchNorm:
    """Robust batch normalisation (RBN; Yuan et al., "Robust Test-Time Adaptation in Dynamic
    Scenarios", CVPR 2023) on a view's batch norms with running statistics.

    Each such norm normalises with *global* statistics ``(mu, var)`` that follow an exponential
    moving average of the batch statistics it sees while :attr:`updating` is on::

        mu  <- (1 - momentum) * mu  + momentum * mean_batch(x)
        var <- (1 - momentum) * var + momentum * var_batch(x)     (biased variance)

    and stay as they are otherwise (prediction). A small batch, or a batch of one class, then moves
    the normalisation only a little, where test-batch statistics would follow it entirely.

    How it is served on every backend: the global statistics *are* the norm's own running
    buffers, and the norms run on them (``"source"`` norm mode). While updating, a forward
    pre-hook on :meth:`QuantView.norm_input_module` (the module whose input is what the norm
    normalises) folds the batch statistics into the buffers in place and hands the norm
    ``x' = x.detach() + (g - g.detach())`` with ``g = (x - mu) * sqrt(rv + eps) / sqrt(var + eps) + rm``,
    where ``mu`` / ``var`` are the new statistics *as functions of the batch* and ``rm`` / ``rv``
    the buffers holding their values. ``x'`` equals ``x`` exactly, so the norm computes
    ``(x - mu) / sqrt(var + eps) * weight + bias``; its gradient is that of RBN, which reaches the
    batch statistics with weight ``momentum``. Keeping the statistics in the running buffers keeps
    the model its backend's own: a deep copy, a snapshot, the core's rollback and the backend's
    export carry them (torchao's ``convert_pt2e`` folds them into the conv like any running
    statistics).

    ``momentum``: the paper's ``alpha`` (0.05). Norms without running statistics (LayerNorm,
    GroupNorm) are left alone.
    """

    def __init__(self, view: QuantView, momentum: float) -> None:
        if isinstance(momentum, bool) or not 0 < float(momentum) <= 1:
            raise ValueError(f"RBN momentum must be in (0, 1], got {momentum!r}")
        self.momentum = float(momentum)
        self.norms = [n for n in view.norms() if n.has_statistics and n.running_var is not None]
        #: whether forwards fold their batch statistics into the global ones
        self.updating = False
        view.set_norm_mode("source")
        self._handles = []
        for norm in self.norms:
            module = view.norm_input_module(norm)
            for key, hook in list(module._forward_pre_hooks.items()):
                if isinstance(hook, _RobustNormHook):  # one RBN per norm: a new one replaces it
                    del module._forward_pre_hooks[key]
            self._handles.append(module.register_forward_pre_hook(_RobustNormHook(self, norm)))

    def statistics(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The global ``(mean, var)`` of each norm, by name (the live buffers)."""
        return {n.name: (n.running_mean, n.running_var) for n in self.norms}  # type: ignore[misc]

    def remove(self) -> None:
        """Take the hooks off (the statistics stay in the running buffers)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextmanager
    def folding(self) -> Iterator[None]:
        """Forwards inside the block fold their batch statistics into the global ones."""
        self.updating = True
        try:
            yield
        finally:
            self.updating = False

    def _fold(self, norm: NormLayer, x: torch.Tensor) -> torch.Tensor:
        rm, rv = norm.running_mean, norm.running_var
        assert rm is not None and rv is not None
        eps = 1e-5 if norm.eps is None else norm.eps
        dims = [d for d in range(x.ndim) if d != 1]
        batch_var, batch_mean = torch.var_mean(x, dim=dims, unbiased=False)
        a = self.momentum
        mean = (1 - a) * rm.detach().to(x.dtype) + a * batch_mean
        var = (1 - a) * rv.detach().to(x.dtype) + a * batch_var
        with torch.no_grad():
            rm.copy_(mean)
            rv.copy_(var)
        shape = [1] * x.ndim
        shape[1] = -1
        ratio = (rv.to(x.dtype) + eps).sqrt() / (var + eps).sqrt()
        g = (x - mean.reshape(shape)) * ratio.reshape(shape) + rm.to(x.dtype).reshape(shape)
        return x.detach() + (g - g.detach())  # the value of x exactly, RBN's gradient


@dataclass
class _Item:
    x: torch.Tensor
    cls: int
    age: int
    uncertainty: float


class BalancedMemory:
    """CSTU, RoTTA's category-balanced memory (or, ``balanced=False``, a first-in first-out one
    of the same capacity): see :mod:`qtta_plugins.methods.rotta` for the rule."""

    def __init__(
        self,
        capacity: int,
        num_classes: int,
        lambda_t: float = 1.0,
        lambda_u: float = 1.0,
        balanced: bool = True,
    ) -> None:
        if capacity < 1 or num_classes < 1:
            raise ValueError("a memory needs a capacity and a number of classes of at least 1")
        self.capacity = capacity
        self.num_classes = num_classes
        self.lambda_t = lambda_t
        self.lambda_u = lambda_u
        self.balanced = balanced
        self.quota = capacity / num_classes
        self.clear()

    def clear(self) -> None:
        #: per class, oldest first (balanced); or one list, oldest first (FIFO)
        self.classes: list[list[_Item]] = [[] for _ in range(self.num_classes)]
        self.queue: list[_Item] = []

    # --- reading ---------------------------------------------------------------------------------
    def items(self) -> list[_Item]:
        """Every item: class by class, oldest first (balanced); oldest first (FIFO)."""
        if not self.balanced:
            return list(self.queue)
        return [item for items in self.classes for item in items]

    def __len__(self) -> int:
        return len(self.queue) if not self.balanced else sum(map(len, self.classes))

    def class_counts(self) -> list[int]:
        counts = [0] * self.num_classes
        for item in self.items():
            counts[item.cls] += 1
        return counts

    def score(self, age: float, uncertainty: float) -> float:
        """Eviction score: ``lambda_t * sigmoid(age / C) + lambda_u * uncertainty / log K``."""
        norm = math.log(self.num_classes) if self.num_classes > 1 else 1.0
        return self.lambda_t / (1 + math.exp(-age / self.capacity)) + (
            self.lambda_u * uncertainty / norm
        )

    # --- writing ---------------------------------------------------------------------------------
    def add(self, x: torch.Tensor, cls: int, uncertainty: float) -> bool:
        """Offer one sample predicted as ``cls``; return whether it was kept. Every item ages."""
        if not 0 <= cls < self.num_classes:
            raise ValueError(f"class {cls} is outside 0..{self.num_classes - 1}")
        item = _Item(x.detach().clone(), int(cls), 0, float(uncertainty))
        if not self.balanced:
            self.queue.append(item)
            del self.queue[: max(0, len(self.queue) - self.capacity)]
            kept = True
        else:
            kept = self._make_room(item)
            if kept:
                self.classes[item.cls].append(item)
        for other in self.items():
            other.age += 1
        return kept

    def _make_room(self, item: _Item) -> bool:
        new_score = self.score(0, item.uncertainty)
        if len(self.classes[item.cls]) >= self.quota:
            return self._evict([item.cls], new_score)
        if len(self) < self.capacity:
            return True
        counts = [len(items) for items in self.classes]
        most = max(counts)
        return self._evict([c for c, n in enumerate(counts) if n == most], new_score)

    def _evict(self, classes: list[int], new_score: float) -> bool:
        """Remove the highest-scoring item of ``classes`` if it scores above ``new_score``."""
        best: tuple[float, int, int] | None = None
        for c in classes:
            for i, other in enumerate(self.classes[c]):
                s = self.score(other.age, other.uncertainty)
                if best is None or s >= best[0]:  # ties: the later item goes
                    best = (s, c, i)
        if best is None:
            return True
        if best[0] <= new_score:
            return False
        del self.classes[best[1]][best[2]]
        return True

    # --- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        items = self.items()
        return {
            "num_classes": self.num_classes,
            "x": torch.stack([i.x for i in items]) if items else torch.empty(0),
            "cls": torch.tensor([i.cls for i in items], dtype=torch.long),
            "age": torch.tensor([i.age for i in items], dtype=torch.long),
            "uncertainty": torch.tensor([i.uncertainty for i in items], dtype=torch.float64),
        }

    @staticmethod
    def check_state(state: object, capacity: int) -> None:
        """Raise ``ValueError`` unless ``state`` is a memory state of at most ``capacity`` items."""
        keys = {"num_classes", "x", "cls", "age", "uncertainty"}
        if not isinstance(state, dict) or set(state) != keys:
            raise ValueError(f"a RoTTA memory state is a dict with {sorted(keys)}")
        k = state["num_classes"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError("RoTTA memory state: num_classes must be a positive int")
        n = len(state["cls"]) if isinstance(state["cls"], torch.Tensor) else -1
        tensors_ok = all(
            isinstance(state[key], torch.Tensor) and state[key].ndim == 1 and len(state[key]) == n
            for key in ("cls", "age", "uncertainty")
        ) and isinstance(state["x"], torch.Tensor)
        if not tensors_ok or (n and len(state["x"]) != n) or n > capacity:
            raise ValueError(
                f"RoTTA memory state: x, cls, age and uncertainty must hold the same number of "
                f"items, at most the capacity {capacity}"
            )
        if n and ((state["cls"] < 0) | (state["cls"] >= k)).any():
            raise ValueError("RoTTA memory state: a class index is out of range")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state, self.capacity)
        if state["num_classes"] != self.num_classes:
            raise ValueError(
                f"RoTTA memory state has {state['num_classes']} classes, this memory "
                f"{self.num_classes}"
            )
        self.clear()
        for x, c, a, u in zip(
            state["x"],
            state["cls"].tolist(),
            state["age"].tolist(),
            state["uncertainty"].tolist(),
            strict=False,
        ):
            item = _Item(x.clone(), int(c), int(a), float(u))
            (self.classes[item.cls] if self.balanced else self.queue).append(item)


class RoTTA(TestTimeMethod):
    """RoTTA on a view: the view's model is the teacher, :attr:`student` a view of its copy.

    State (:meth:`state_dict`): the student's norm affines and RBN statistics, its optimizer,
    the memory, the sample counter and the random generator; the teacher's tensors (its affines
    and RBN statistics) are the run's model, which the core snapshots. :attr:`updates` counts the
    student's steps.
    """

    needs_backward = True

    def __init__(self, view: QuantView, config: RoTTAConfig) -> None:
        super().__init__(view, config)
        refuse_forward_only(view, "rotta")
        self.params = view.norm_parameters()
        if not self.params:
            raise ValueError(
                f"method 'rotta' found no norm affine parameters in this {view.backend} model"
            )
        if config.strong_augment:
            _import_v2()
        view.freeze()
        view.set_norm_mode("source" if config.rbn else "batch")
        self.student = view.copy()  # before any RBN hook goes on the teacher
        self.names, self.student_params = paired(
            self.params, view.model, self.student.model, "rotta"
        )
        for p in self.student_params:
            p.requires_grad_(True)
        self.rbn: RobustBatchNorm | None = None
        self.student_rbn: RobustBatchNorm | None = None
        stats: list[torch.Tensor] = []
        if config.rbn:
            self.rbn = RobustBatchNorm(view, 1 - config.rbn_decay)
            self.student_rbn = RobustBatchNorm(self.student, 1 - config.rbn_decay)
            stats = [t for pair in self.rbn.statistics().values() for t in pair]
        self.stat_names, self.student_stats = paired(stats, view.model, self.student.model, "rotta")
        self._initial = [t.detach().clone() for t in [*self.student_params, *self.student_stats]]
        self.optimizer = make_optimizer(self.student_params, config)  # type: ignore[arg-type]
        self.generator = torch.Generator().manual_seed(config.seed)
        self.memory: BalancedMemory | None = None
        self.seen = 0
        self.updates = 0

    # --- one batch -------------------------------------------------------------------------------
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = self.view.model(x)
        probs = logits.float().softmax(1)
        labels = probs.argmax(1).tolist()
        entropy = (-(probs * (probs + 1e-6).log()).sum(1)).tolist()
        if self.memory is None:
            self.memory = self._new_memory(logits.shape[1])
        for i in range(x.shape[0]):
            self.memory.add(x[i], labels[i], entropy[i])
            self.seen += 1
            if self.seen % self.config.update_frequency == 0:
                self._update()
        return logits

    def _new_memory(self, num_classes: int) -> BalancedMemory:
        c = self.config
        return BalancedMemory(
            c.memory_capacity, num_classes, c.lambda_t, c.lambda_u, c.balanced_memory
        )

    def _update(self) -> None:
        """One student step on the memory, then the teacher's EMA."""
        assert self.memory is not None
        items = self.memory.items()
        if not items:
            return
        c = self.config
        x = torch.stack([i.x for i in items])
        ages = torch.tensor([i.age for i in items], device=x.device)
        with ExitStack() as folding:
            for rbn in (self.rbn, self.student_rbn):
                if rbn is not None:
                    folding.enter_context(rbn.folding())
            with torch.no_grad():
                target = self.view.model(x).float().softmax(1)
            seen = augment(x, self.generator) if c.strong_augment else x
            with torch.enable_grad():
                logits = self.student.model(seen)
                per_item = soft_cross_entropy(logits.float(), target)
                if c.timeliness:
                    per_item = per_item * timeliness_weight(ages, c.memory_capacity)
                loss = per_item.mean()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if any(not torch.isfinite(p).all() for p in self.student_params):
            raise FloatingPointError("the RoTTA student became non-finite on this batch")
        ema_update(self.params, self.student_params, c.teacher_decay if c.mean_teacher else 0.0)
        self.updates += 1

    # --- state -----------------------------------------------------------------------------------
    def adapted_parameters(self) -> list[nn.Parameter]:
        """The teacher's (the run's model's) affines; its RBN statistics are model buffers."""
        return self.params

    def state_dict(self) -> dict[str, Any]:
        student = dict(zip(self.names, self.student_params, strict=True))
        student.update(zip(self.stat_names, self.student_stats, strict=True))
        return {
            "optimizer": self.optimizer.state_dict(),
            "student": {k: v.detach() for k, v in student.items()},
            "memory": None if self.memory is None else self.memory.state_dict(),
            "seen": self.seen,
            "updates": self.updates,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys = {"optimizer", "student", "memory", "seen", "updates", "generator"}
        if not isinstance(state, dict) or set(state) != keys:
            raise ValueError(f"a RoTTA state is a dict with {sorted(keys)} (RoTTA.state_dict)")
        # everything is checked before anything is loaded: a bad state changes nothing
        names = [*self.names, *self.stat_names]
        check_named_tensors(
            state["student"], names, [*self.student_params, *self.student_stats], "RoTTA state"
        )
        check_generator_state(state["generator"], self.generator)
        for key in ("seen", "updates"):
            check_count(state[key], key, "RoTTA")
        memory = None
        if state["memory"] is not None:
            BalancedMemory.check_state(state["memory"], self.config.memory_capacity)
            memory = self._new_memory(state["memory"]["num_classes"])
            # the stored images on the model's device (a state saved on another device included)
            device = self.student_params[0].device
            memory.load_state_dict({**state["memory"], "x": state["memory"]["x"].to(device)})
        self.optimizer.load_state_dict(state["optimizer"])
        with torch.no_grad():
            for name, t in zip(names, [*self.student_params, *self.student_stats], strict=True):
                t.copy_(state["student"][name])
        self.memory = memory
        self.seen, self.updates = state["seen"], state["updates"]
        self.generator.set_state(state["generator"].clone())

    def reset(self) -> None:
        self.optimizer.state.clear()
        with torch.no_grad():
            for t, initial in zip(
                [*self.student_params, *self.student_stats], self._initial, strict=True
            ):
                t.copy_(initial)
        self.memory = None
        self.seen = self.updates = 0
        self.generator.manual_seed(self.config.seed)


@hookimpl
def qtta_methods() -> list[MethodInfo]:
    return [
        MethodInfo(
            "rotta",
            "adapt",
            "RoTTA: robust BN, category-balanced memory, timeliness-weighted teacher-student",
            True,
            RoTTAConfig,
        )
    ]


@hookimpl
def qtta_adapt(view: QuantView, config: AdaptConfig) -> TestTimeMethod | None:
    if config.method != "rotta":
        return None
    if not isinstance(config, RoTTAConfig):
        config = RoTTAConfig(seed=config.seed)
    return RoTTA(view, config)

"""A collapse guard for any method: ``adapt(model, stream, method, guard=True)``.

Continual methods can collapse: on some streams their self-training drives every prediction into
one or two classes (RoTTA on a stream whose first domain leaves the source near chance, CoTTA
drifting over ten rounds, Tent at too large a step). Nothing in the method notices: SAR's recovery
watches its own loss, and RDumb's periodic reset (``reset_every``) restarts whether or not anything
went wrong. The guard watches what every method produces, its predictions, and restarts the run
(model and method back at their start, as ``reset_every`` does) when they collapse.

The rule. Over the last ``window`` predictions (samples, not batches) the guard measures the
*diversity* of the predicted classes: the entropy of their histogram over the largest it could be,
``H(counts) / log(min(K, window))`` with ``K`` the number of classes (1: every class equally often;
0: one class only). It keeps the best diversity any full window reached since the run's start (or
its last restart) and calls the run collapsed when the current window's falls below ``drop`` times
that best. Relative, not absolute, for two reasons measured on the streams in docs/guard.md:

* a source model can already be degenerate on a hard domain (noise at severity 5 leaves the digits
  CNN predicting two or three classes). An absolute floor would restart a method that is busy
  improving on it, and a restart to that source cannot help; measured against the run's own best,
  a run that never was diverse is never "collapsed";
* a run collapses *from* somewhere: the diversity it had is the reference its predictions fell from.

A restart happens before the next batch (the batch that showed the collapse is already predicted);
``run.restarts`` lists it with the other restarts and ``run.guard_restarts`` lists the guard's own.
After a restart the guard starts over: no verdict until a full window has been seen again.

What it cannot see: a collapse onto a class distribution that stays diverse (a permutation of the
labels), and a stream whose label distribution itself narrows sharply (a label-shifted stream that
moves from all classes to one or two, e.g. a Dirichlet order with a small concentration, within
one window) looks like a collapse to it. docs/guard.md counts its false restarts on healthy and on
label-shifted streams.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class GuardConfig:
    """The collapse guard's rule (see the module docstring), validated when built.

    ``window``: the predictions (samples) whose diversity is measured, >= 2. ``drop``: the run is
    collapsed when the current window's diversity is below ``drop`` times the best a full window
    reached since the start, in (0, 1). Defaults chosen on the dev streams of docs/guard.md."""

    window: int = 256
    drop: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 2:
            raise ValueError(
                f"GuardConfig.window must be a number of predictions >= 2, got {self.window!r}"
            )
        if (
            isinstance(self.drop, bool)
            or not isinstance(self.drop, int | float)
            or not 0 < self.drop < 1
        ):
            raise ValueError(f"GuardConfig.drop must be a number in (0, 1), got {self.drop!r}")


def as_guard(guard: Any) -> GuardConfig | None:
    """``adapt``'s ``guard`` option as a config: ``None`` / ``False`` (off), ``True`` (the
    defaults), a dict of :class:`GuardConfig` fields, or a ``GuardConfig``. Anything else is a
    ``ValueError`` naming it."""
    if guard is None or guard is False:
        return None
    if guard is True:
        return GuardConfig()
    if isinstance(guard, GuardConfig):
        return guard
    if isinstance(guard, dict):
        unknown = set(guard) - {"window", "drop"}
        if unknown:
            raise ValueError(
                f"unknown guard option(s) {sorted(unknown)}; GuardConfig has window and drop"
            )
        return GuardConfig(**guard)
    raise ValueError(
        f"guard must be True, False, None, a dict or a qtta_plugins.GuardConfig, got {guard!r}"
    )


def diversity(predictions: torch.Tensor, num_classes: int) -> float:
    """The entropy of the predicted classes' histogram over its largest possible value
    ``log(min(num_classes, len(predictions)))``: 1 when the classes are as spread as they can be,
    0 when one class takes every prediction."""
    n = int(predictions.numel())
    most = math.log(min(num_classes, n)) if n > 1 and num_classes > 1 else 0.0
    if most == 0.0:
        return 1.0
    counts = torch.bincount(predictions.long().flatten(), minlength=num_classes).double()
    p = counts[counts > 0] / n
    return float(-(p * p.log()).sum()) / most


class CollapseGuard:
    """The guard's state for one run: the last ``window`` predictions since the start or the last
    restart, the best diversity a full window reached, and whether a restart is due."""

    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self.recent = torch.empty(0, dtype=torch.long)
        self.best: float | None = None
        self.due = False

    def observe(self, predictions: torch.Tensor, num_classes: int) -> bool:
        """Take one batch's predictions; True when they show a collapse (a restart is then due)."""
        window = self.config.window
        self.recent = torch.cat([self.recent, predictions.detach().cpu().long().flatten()])[
            -window:
        ]
        if self.recent.numel() < window:
            return False
        now = diversity(self.recent, num_classes)
        if self.best is None or now > self.best:
            self.best = now
        if now < self.config.drop * self.best:
            self.due = True
        return self.due

    def restart(self) -> None:
        """Start over after a restart of the run (or its reset)."""
        self.recent = torch.empty(0, dtype=torch.long)
        self.best = None
        self.due = False

    def state_dict(self) -> dict[str, Any]:
        return {
            "recent": self.recent.clone(),
            "best": self.best,
            "due": self.due,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent = state["recent"].clone().long()
        self.best = state["best"]
        self.due = bool(state["due"])

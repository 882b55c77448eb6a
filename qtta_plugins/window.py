"""Small batches through a sliding window: ``adapt(model, stream, method, window=N)``.

A device that sees one frame at a time gives a method batches of one image, and a method that
normalises with the test batch's statistics (BN-adapt, Tent, EATA, SAR, CoTTA) or compares them
with the source's (ZOA, FOA) has nothing to work with: the core refuses such batches
(:class:`~qtta_plugins.errors.SmallBatchError`). :class:`Windowed` wraps any method instead, in the
way of the single-sample setting of Döbler's test-time-adaptation library (``TEST.WINDOW_LENGTH``):

* the window keeps the last ``N`` inputs (oldest first);
* each new sample is predicted at once, as the method would predict it without adapting
  (:meth:`~qtta_plugins.methods.base.TestTimeMethod.predict`): where the model normalises with
  batch statistics the whole window is forwarded, so the batch norms see ``N`` samples, and the
  newest rows of the output are kept; elsewhere (layer norms, source statistics, RoTTA's robust
  statistics) the sample alone is forwarded, as that costs ``N`` times less;
* the method adapts on the whole window (its ``forward_and_adapt``) once the window is full and
  has turned over, every ``N`` samples, or every ``k`` with ``update_every=k``; on such a step the
  prediction is the method's own, made before its update.

Two choices differ from the peer library. The window is kept in stream order rather than as a ring
(the order matters to methods with a memory, such as RoTTA's, and costs one copy of ``N`` inputs per
step). And until it holds as many samples as the method needs (its ``min_batch_size``), which at the
start of a stream or after a reset is one sample, the prediction uses the source (running)
statistics rather than the statistics of that one sample: one image's own statistics normalise its
content away, which is what this module is here to avoid.

With the default ``update_every=N`` every sample reaches the method's update exactly once; with
``k < N`` a sample is adapted on ``N / k`` times, as overlapping windows do.

What the batch norms normalise with is ``WindowConfig.statistics`` (models with batch norms in
batch-statistics mode only): ``"window"`` as above; ``"global"``, RoTTA's robust batch norm
(:class:`~qtta_plugins.methods.rotta.RobustBatchNorm`): global statistics that each update moves
by ``1 - decay`` of the way to the window's, through one forward of the window of their own before
the method's update, with each sample forwarded alone on them; ``"source"``, the source statistics,
never moved, each sample alone, the method's update (an entropy step for Tent) the only
adaptation. ``docs/edge.md`` compares the three on a dev stream and gives what each costs.

The window's inputs and counter are part of the method's state, so the core's rollback on a failed
step, ``reset``, ``state_dict`` / ``save`` / ``load`` carry them like any method state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import check_unit
from .methods.base import TestTimeMethod, normalises_with_batch_statistics

#: how a windowed run's batch norms normalise (``WindowConfig.statistics``)
STATISTICS = ("window", "global", "source")
#: ``statistics`` where a window leaves it ``None`` on a model whose batch norms use batch
#: statistics (layer-norm models forward each sample alone whatever it says). Chosen on two dev
#: streams (benchmarks/configs/edge_statistics*.yaml, docs/edge.md): on long domains (ResNet-18,
#: 1,000 images each) global statistics beat the window's by about 2 points for norm, Tent and
#: ZOA, but on short, strongly shifted ones (the digits CNN, 200 images each) they have barely
#: moved when the domain ends and stay near the source's error, where the window's adapt from the
#: first window on. The window's statistics are the default for that robustness; "global" is the
#: choice for long domains, and costs less per sample (one image forwarded, not the window)
DEFAULT_STATISTICS = "window"


@dataclass(frozen=True)
class WindowConfig:
    """A sliding window of the last ``length`` inputs; the method adapts on it every
    ``update_every`` samples once it is full (``None``: every ``length``, when it has turned
    over).

    ``statistics``: what the batch norms of a model that normalises with batch statistics use
    (the module docstring compares them):

    * ``"window"``: the statistics of the window, so each sample's prediction forwards the whole
      window (``length`` images per sample);
    * ``"global"``: global statistics after RoTTA's robust batch norm, an EMA (weight ``decay``
      kept) that each update moves with the window's statistics; a sample is forwarded alone;
    * ``"source"``: the source (running) statistics, never moved; the method's update (Tent's
      entropy step, ...) is the only adaptation; a sample is forwarded alone;
    * ``None`` (the default): the family's default, :data:`DEFAULT_STATISTICS`.

    Models without batch norms with running statistics (layer norms), and methods that keep their
    own statistics (``source``, ``rotta``), forward the sample alone whatever this says.
    Validated when built, each error naming the field."""

    length: int
    update_every: int | None = None
    statistics: str | None = None
    decay: float = 0.95

    def __post_init__(self) -> None:
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < 1:
            raise ValueError(
                f"window must be a number of samples >= 1 (the inputs the window keeps), got "
                f"{self.length!r}"
            )
        k = self.update_every
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(
                f"update_every must be a number of samples >= 1 (or None: each time the window "
                f"has turned over), got {k!r}"
            )
        if self.statistics is not None and self.statistics not in STATISTICS:
            raise ValueError(
                f"window statistics must be one of {', '.join(map(repr, STATISTICS))} (or None: "
                f"the norm family's default), got {self.statistics!r}"
            )
        # the weight the global statistics keep at each update, as every EMA here is written
        check_unit(self, "decay", low_open=False, high_open=True)

    @property
    def every(self) -> int:
        """Samples between two updates."""
        return self.length if self.update_every is None else self.update_every


def as_window(window: int | dict[str, Any] | WindowConfig | None) -> WindowConfig | None:
    """``window`` as a :class:`WindowConfig` (an int is its length, a dict its fields); ``None``
    stays ``None``. Raises ``ValueError`` naming the problem."""
    if window is None or isinstance(window, WindowConfig):
        return window
    if isinstance(window, dict):
        try:
            return WindowConfig(**window)
        except TypeError as err:  # an unknown field
            raise ValueError(f"window: {err}") from None
    return WindowConfig(window)  # type: ignore[arg-type]  # WindowConfig names what is wrong


def declared_samples(stream: Any) -> int | None:
    """How many samples ``stream`` says it holds before it is read, or ``None`` when it does not
    say: a list or tuple of batches (already in memory) by their sizes; a stream object with a
    length in batches and a ``batch_size`` (:class:`~qtta_plugins.data.ContinualStream`) at most
    that many batches of that size. Nothing is iterated."""
    if isinstance(stream, Sequence) and not isinstance(stream, str | bytes):
        total = 0
        for item in stream:
            x = item[0] if isinstance(item, tuple | list) and item else getattr(item, "x", item)
            if not isinstance(x, torch.Tensor) or x.ndim == 0:
                return None  # the step will say what is wrong with it
            total += x.shape[0]
        return total
    size = getattr(stream, "batch_size", None)
    if hasattr(stream, "__len__") and isinstance(size, int) and not isinstance(size, bool):
        return len(stream) * size
    return None


def check_window_fits(window: WindowConfig | None, stream: Any) -> None:
    """Raise ``ValueError`` when ``window`` is longer than the samples ``stream`` declares: such a
    window never fills, so the method would never adapt."""
    if window is None or stream is None:
        return
    total = declared_samples(stream)
    if total is not None and window.length > total:
        raise ValueError(
            f"window={window.length} is longer than the stream, which holds {total} samples: "
            "the window would never fill and the method never adapt; choose a window of at most "
            f"{total} samples"
        )


class Windowed(TestTimeMethod):
    """A method adapting on a sliding window of the last ``window.length`` inputs (module
    docstring). ``inner`` is the wrapped method; ``buffer`` the window (``None`` when empty);
    ``since_update`` the samples seen since the last update (or the start); ``updates`` the
    method's updates on the window so far."""

    def __init__(self, inner: TestTimeMethod, window: WindowConfig) -> None:
        super().__init__(inner.view, inner.config)
        need = inner.min_batch_size()
        if window.length < need:
            raise ValueError(
                f"window={window.length} is shorter than the {need} samples method "
                f"{inner.config.method!r} needs to adapt on this model; use window={max(need, 16)} "
                "or more"
            )
        self.inner = inner
        self.window = window
        self.needs_backward = inner.needs_backward
        self.buffer: torch.Tensor | None = None
        self.since_update = 0
        self.updates = 0
        #: what the batch norms use ("window", "global", "source"); None where the choice does not
        #: arise (no batch norm in batch-statistics mode: layer norms, source, RoTTA)
        self.statistics: str | None = None
        self.rbn: Any = None
        if normalises_with_batch_statistics(self.view):
            self.statistics = window.statistics or DEFAULT_STATISTICS
            if self.statistics == "global":
                # RoTTA's robust batch norm, borrowed: global statistics in the norms' running
                # buffers (so the core's snapshot, rollback and reset carry them), moved only
                # while `updating`; it puts the norms in "source" mode
                from .methods.rotta import RobustBatchNorm

                self.rbn = RobustBatchNorm(self.view, 1 - window.decay)
            elif self.statistics == "source":
                self.view.set_norm_mode("source")

    def min_batch_size(self) -> int:
        return 1  # the window makes up the batch

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        n, length = x.shape[0], self.window.length
        # a batch at least as long as the window is a window of its own
        window = x if self.buffer is None else torch.cat([self.buffer.to(x.device), x])
        window = window[-max(length, n) :]
        since = self.since_update + n
        if n >= length and self.statistics in ("global", "source"):
            # a batch at least as long as the window is a window of its own: the method as it runs
            # without one, on the batch's statistics (the global ones are left as they are)
            self.view.set_norm_mode("batch")
            try:
                logits = self.inner.forward_and_adapt(x)
            finally:
                self.view.set_norm_mode("source")
            updates, since = self.updates + 1, 0
        elif window.shape[0] >= length and since >= self.window.every:
            if self.rbn is not None:
                self._fold_statistics(window)
            logits = self.inner.forward_and_adapt(window)[-n:]
            updates, since = self.updates + 1, 0
        else:
            logits = self._predict(window, x)
            updates = self.updates
        # the state moves on only once the step has succeeded (the core rolls back the rest)
        self.buffer = window[-length:].detach()
        self.since_update, self.updates = since, updates
        return logits

    @torch.no_grad()
    def _fold_statistics(self, window: torch.Tensor) -> None:
        """Move the global statistics toward the window's (``statistics="global"``): one forward
        of the window, before the method's update, which then normalises with the moved ones.
        A forward of its own, rather than the method's, so that a method forwarding several times
        per update (SAR, CoTTA, ZOA, FOA) moves them once."""
        with self.rbn.folding():
            self.view.model(window)

    def _predict(self, window: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The newest ``len(x)`` samples' logits without an update."""
        if not normalises_with_batch_statistics(self.view):
            return self.inner.predict(x)  # the sample's prediction does not depend on the others
        if window.shape[0] >= self.inner.min_batch_size():
            return self.inner.predict(window)[-x.shape[0] :]
        # too few samples for statistics yet: the source statistics predict (module docstring)
        self.view.set_norm_mode("source")
        try:
            return self.inner.predict(x)
        finally:
            self.view.set_norm_mode("batch")

    # --- state -----------------------------------------------------------------------------------
    def adapted_parameters(self) -> list[nn.Parameter]:
        return self.inner.adapted_parameters()

    def state_dict(self) -> dict[str, Any]:
        return {
            "inner": self.inner.state_dict(),
            "window": {
                "length": self.window.length,
                "update_every": self.window.update_every,
                "statistics": self.statistics,
                "buffer": self.buffer,
                "since_update": self.since_update,
                "updates": self.updates,
            },
        }

    def _copy_state(self) -> dict[str, Any]:
        # the buffer is replaced at each step, never written in place: sharing it is a copy, and
        # the core copies the state before every step
        state = self.state_dict()
        return {"inner": self.inner._copy_state(), "window": dict(state["window"])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # every check before anything loads: a bad state changes nothing
        if not isinstance(state, dict) or set(state) != {"inner", "window"}:
            raise ValueError(
                "this is not a windowed method's state (saved without window=?): it must hold "
                "'inner' and 'window'"
            )
        w = state["window"]
        if not isinstance(w, dict):
            raise ValueError("a window state is a dict")
        # a state from before `statistics` existed normalised with the window's statistics
        saved_statistics = w.get("statistics", "window" if self.statistics else None)
        saved = (w.get("length"), w.get("update_every"), saved_statistics)
        if saved != (self.window.length, self.window.update_every, self.statistics):
            raise ValueError(
                f"the state was saved with window={saved[0]}, update_every={saved[1]}, "
                f"statistics={saved[2]!r}; this run has window={self.window.length}, "
                f"update_every={self.window.update_every}, statistics={self.statistics!r}"
            )
        buffer = w.get("buffer")
        if buffer is not None and (
            not isinstance(buffer, torch.Tensor) or not 1 <= buffer.shape[0] <= self.window.length
        ):
            raise ValueError(
                f"a window state's buffer must be None or a tensor of 1 to {self.window.length} "
                "samples"
            )
        for name in ("since_update", "updates"):
            value = w.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"a window state's {name} must be an int >= 0, got {value!r}")
        self.inner.load_state_dict(state["inner"])  # checks its own state before loading it
        self.buffer = buffer
        self.since_update, self.updates = w["since_update"], w["updates"]

    def reset(self) -> None:
        self.inner.reset()
        self.buffer = None
        self.since_update = 0
        self.updates = 0

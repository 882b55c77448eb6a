"""What a test-time adaptation method is, for the core that drives it.

A method is a small class in the shape of Tent's reference code: ``__init__`` configures the model
through its :class:`~qtta_plugins.view.QuantView` and collects the parameters it adapts, and
:meth:`TestTimeMethod.forward_and_adapt` returns the prediction for one batch and then updates.
Everything around that (input checks, rollback on error, reset, save / load, the stream loop) is the
core's, in :mod:`qtta_plugins.adaptation`.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..config import AdaptConfig
from ..view import QuantView


@dataclass(frozen=True)
class MethodInfo:
    """A method a plugin provides (returned by the ``qtta_methods`` hook)."""

    name: str
    hook: Literal["adapt", "reconstruct", "select_subnet"]
    summary: str
    needs_backward: bool = False
    config_cls: type = AdaptConfig


class TestTimeMethod(ABC):
    """One online test-time adaptation method bound to one model view."""

    __test__ = False  # not a pytest test class, despite the name

    #: whether ``forward_and_adapt`` needs autograd through the model
    needs_backward: bool = False

    def __init__(self, view: QuantView, config: AdaptConfig) -> None:
        self.view = view
        self.config = config

    @abstractmethod
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits for ``x`` (the prediction is made before this batch's update), then adapt."""

    def min_batch_size(self) -> int:
        """The fewest samples a batch may hold for this method to adapt on it correctly; the core
        refuses a smaller batch before the model sees it (``SmallBatchError``), and a sliding
        window (``adapt(..., window=N)``) must be at least this long.

        Default: 2 where the model normalises with the test batch's statistics (a batch norm in
        norm mode ``"batch"``): one image gives each channel its own statistics only, which
        normalises the image's content away (measured on the digits BN CNN, W8A8: every such
        method falls to chance at batch 1 and keeps most of its gain at batch 2). Else 1.
        Methods whose loss compares batch statistics (ZOA, FOA) say 2 on any model."""
        return 2 if normalises_with_batch_statistics(self.view) else 1

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The logits the method gives ``x`` without adapting: the model as the method left it
        (a sliding window predicts with this between its updates). Override where the method's
        prediction is more than the model's forward."""
        return self.view.model(x)

    def adapted_parameters(self) -> list[nn.Parameter]:
        """The parameters this method changes (the core backs them up around each step)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """The method's own state beyond the model's tensors (optimizer moments, EMAs, banks...)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but was given {sorted(state)}")

    def reset(self) -> None:
        """Forget the method's own state (the core restores the model's tensors)."""
        return None

    def _copy_state(self) -> dict[str, Any]:
        return copy.deepcopy(self.state_dict())


def normalises_with_batch_statistics(view: QuantView) -> bool:
    """Whether ``view``'s model normalises with the statistics of the batch it is given: a batch
    norm with running statistics, in norm mode ``"batch"``."""
    return view.norm_mode == "batch" and any(n.has_statistics for n in view.norms())


def refuse_forward_only(view: QuantView, method: str) -> None:
    """Raise for a method that needs gradients on a model that has none (an integer graph)."""
    if not view.can_backprop:
        raise ValueError(
            f"method {method!r} needs gradients, and this {view.backend} model cannot backpropagate "
            "(an integer-kernel model?); use the forward-only method 'zoa' or 'norm'"
        )


# --- checks a method's load_state_dict runs before it loads anything (a bad state changes nothing)
def check_state_keys(state: object, keys: Iterable[str], what: str) -> None:
    """Raise ``ValueError`` unless ``state`` is a dict holding every one of ``keys``."""
    if not isinstance(state, dict):
        raise ValueError(f"a {what} state is a dict, not a {type(state).__name__}")
    missing = sorted(k for k in keys if k not in state)
    if missing:
        raise ValueError(f"this is not a {what} state: it lacks {missing}")


def check_count(value: object, name: str, what: str) -> None:
    """Raise ``ValueError`` unless ``value`` is an int >= 0 (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} state: {name} must be an int >= 0, got {value!r}")


def check_named_tensors(
    saved: object, names: Sequence[str], current: Sequence[torch.Tensor], what: str
) -> None:
    """Raise ``ValueError`` unless ``saved`` maps exactly ``names`` to tensors of the shapes of
    ``current``."""
    if not isinstance(saved, dict) or set(saved) != set(names):
        raise ValueError(f"{what} does not match this model: it must name {len(names)} tensors")
    for name, t in zip(names, current, strict=True):
        value = saved[name]
        if not isinstance(value, torch.Tensor) or value.shape != t.shape:
            raise ValueError(f"{what} does not match this model: {name!r} has the wrong shape")


def check_generator_state(state: object, generator: torch.Generator) -> None:
    """Raise ``ValueError`` unless ``state`` is a state of ``generator``'s kind."""
    if (
        not isinstance(state, torch.Tensor)
        or state.dtype != torch.uint8
        or state.shape != generator.get_state().shape
    ):
        raise ValueError("the random generator state must be a torch.Generator state (uint8)")

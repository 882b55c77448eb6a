"""TTAQ's adaptive balanced loss (ABL) as a part any entropy-based method can use.

Tent uses it (``TentConfig(abl=True)``, or ``abl=ABLConfig(tau_f=..., tau_g=..., decay=...)``); EATA and CoTTA take it the same way, as TTAQ applies ABL
inside generic test-time methods. The formulation, with the reasons for its signs, is in
:mod:`qtta_plugins.methods.tent` and ``docs/abl.md``. In short, with ``pi`` the EMA of the stream's
soft class frequencies and ``g`` the EMA of each class's share of the loss gradient on the logits,
the self-training loss is taken on ``z~ = z - tau_f log(pi) - tau_g log(g / mean g)``.

:class:`BalancedLoss` holds the two statistics and is used in three calls per batch::

    adjusted, grads = abl.adjust(logits)      # before the loss; K is learnt from the first batch
    loss = some_entropy(adjusted) ...; loss.backward()  # the backward fills ``grads``
    abl.update(logits.detach(), grads[0])     # once per batch, after its first step
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..config import ABLConfig

#: floor of ``pi`` and ``g / mean g`` before the log: an unseen class gets a large but finite shift
ABL_EPS = 1e-6


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy of the softmax of ``logits``."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def abl_adjusted_logits(
    logits: torch.Tensor,
    class_freq: torch.Tensor,
    grad_mag: torch.Tensor,
    tau_f: float,
    tau_g: float,
) -> torch.Tensor:
    """ABL's adjusted logits ``z - tau_f * log(pi) - tau_g * log(g / mean g)``.

    ``logits``: ``(N, K)``; ``class_freq`` (``pi``) and ``grad_mag`` (``g``): ``(K,)``, positive.
    ``pi`` and ``g / mean g`` are floored at :data:`ABL_EPS` so a class with no mass yet gets a
    finite shift.
    """
    g = grad_mag / grad_mag.mean()
    shift = tau_f * class_freq.clamp_min(ABL_EPS).log() + tau_g * g.clamp_min(ABL_EPS).log()
    return logits - shift.to(logits.dtype)


class BalancedLoss:
    """ABL's statistics and the logit adjustment they give.

    ``class_freq`` (``pi``, shape ``(K,)``, sums to 1) and ``grad_mag`` (``g``, shape ``(K,)``,
    mean 1) are ``None`` until the first batch tells ``K``. Tensors are replaced, never updated in
    place, so a shallow copy of :meth:`state_dict` is a snapshot.
    """

    def __init__(self, tau_f: float, tau_g: float, decay: float) -> None:
        self.tau_f = tau_f
        self.tau_g = tau_g
        self.decay = decay  # the EMAs' weight on the old value
        self.reset()

    @classmethod
    def from_config(cls, config: ABLConfig | None) -> BalancedLoss | None:
        """The loss for a method config's ``abl`` (``None``: ABL off, no loss)."""
        if config is None:
            return None
        return cls(config.tau_f, config.tau_g, config.decay)

    def reset(self) -> None:
        self.class_freq: torch.Tensor | None = None
        self.grad_mag: torch.Tensor | None = None

    def adjust(self, logits: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The adjusted logits, and a list the backward through them fills with ``dL/dz~``."""
        if self.class_freq is None or self.grad_mag is None:
            k = logits.shape[1]
            self.class_freq = torch.full((k,), 1.0 / k, device=logits.device)
            self.grad_mag = torch.ones(k, device=logits.device)
        elif self.class_freq.device != logits.device:
            # statistics loaded from a state saved on another device follow the model's outputs
            self.class_freq = self.class_freq.to(logits.device)
            self.grad_mag = self.grad_mag.to(logits.device)
        adjusted = abl_adjusted_logits(
            logits, self.class_freq, self.grad_mag, self.tau_f, self.tau_g
        )
        grads: list[torch.Tensor] = []
        if adjusted.requires_grad:
            # the gradient on the logits comes with the backward the step runs anyway
            adjusted.register_hook(lambda grad: grads.append(grad.detach()))
        return adjusted, grads

    @torch.no_grad()
    def update(self, logits: torch.Tensor, logit_grad: torch.Tensor | None) -> None:
        """Fold one batch into the EMAs: its soft class frequencies and its gradient push."""
        assert self.class_freq is not None and self.grad_mag is not None, "adjust() comes first"
        m = self.decay
        freq = logits.float().softmax(1).mean(0)
        self.class_freq = m * self.class_freq + (1 - m) * freq
        if logit_grad is None:
            return
        push = logit_grad.float().abs().sum(0)
        total = push.mean()
        if total > 0:  # a batch the loss does not push at all says nothing about the classes
            self.grad_mag = m * self.grad_mag + (1 - m) * push / total

    def state_dict(self) -> dict[str, Any]:
        return {"class_freq": self.class_freq, "grad_mag": self.grad_mag}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        freq, grad = state["class_freq"], state["grad_mag"]
        if (freq is None) != (grad is None) or (freq is not None and freq.shape != grad.shape):
            raise ValueError("ABL state: class_freq and grad_mag must both be set, same shape")
        self.class_freq = None if freq is None else freq.detach().clone()
        self.grad_mag = None if grad is None else grad.detach().clone()


class ExposesBalancedLoss:
    """ABL's statistics as attributes of the method (``method.class_freq``, ``method.grad_mag``),
    for a method that keeps its :class:`BalancedLoss` (or ``None``) in ``self.abl``."""

    abl: BalancedLoss | None

    @property
    def class_freq(self) -> torch.Tensor | None:
        return self.abl.class_freq if self.abl is not None else None

    @property
    def grad_mag(self) -> torch.Tensor | None:
        return self.abl.grad_mag if self.abl is not None else None


def check_abl_state(state: dict[str, Any], abl: BalancedLoss | None, what: str) -> None:
    """Raise ``ValueError`` unless ``state`` carries ABL statistics exactly when the method runs
    with ABL (``abl`` not ``None``), and they are valid; loads nothing."""
    if (abl is not None) != ("abl" in state):
        raise ValueError(
            f"this {what} state was saved "
            + ("without" if abl is not None else "with")
            + " ABL, and this adaptation runs "
            + ("with" if abl is not None else "without")
            + f" it ({what}Config.abl must match)"
        )
    if abl is not None:
        BalancedLoss(abl.tau_f, abl.tau_g, abl.decay).load_state_dict(state["abl"])

"""``sar``: SAR (Niu et al., ICLR 2023, "Towards Stable Test-Time Adaptation in Dynamic Wild World").

Tent's entropy minimisation made stable where it collapses (small or single-class batches, mixed
shifts, long streams): it learns only from reliable samples, steps towards flat minima of the
entropy, and puts the model back when it has collapsed anyway. Configure and collect as Tent does:
batch norms use test-batch statistics, the norm layers' affine parameters adapt under SGD,
gradients pass the fake quantizers straight through. Per batch ``x`` (``K`` classes,
``E0 = e_margin * ln K``):

1. pass 1 at ``theta``: its logits are the prediction; the reliable samples are those with entropy
   ``E_i < E0`` (large-gradient, high-entropy samples are what destabilises the norm parameters);
   ``L1`` = their mean entropy; backward;
2. sharpness-aware step (SAM, Foret et al. 2021): move to ``theta + rho * g / ||g||`` (``g`` the
   gradient of ``L1``, ``||.||`` over all adapted parameters), the nearby point where the entropy
   rises fastest; pass 2 there on the same batch; among pass 1's reliable samples keep those still
   below ``E0`` at the perturbed point (the perturbation can push some over); ``L2`` = their mean
   entropy; backward; go back to ``theta`` exactly and take the SGD step with ``L2``'s gradient.
   Minimising the loss at the worst nearby point prefers flat minima, where a noisy gradient does
   less harm;
3. model recovery: ``ema <- m * ema + (1 - m) * L2`` (starting at the first ``L2``); when
   ``ema < reset_constant`` the model has collapsed to confident (one-hot) predictions, and the
   adapted parameters go back to their values when the method was built and the optimizer
   forgets its momentum (``resets`` counts how often).

A batch with no reliable sample in pass 1, or none left in pass 2, makes no step and leaves the EMA
as it was (the reference code backpropagates an empty mean there, a NaN it then skips for the EMA
but not for the momentum step). With ``sam=False`` step 2 is a plain SGD step with ``L1``'s
gradient, one pass per batch, and the EMA tracks ``L1``.

After a reset the EMA starts again from the next batch's loss. The authors' code keeps the
collapsed run's EMA through the reset, so it resets again on every batch until the EMA has risen
back over the threshold; we forget it with the model it described.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import (
    AdaptConfig,
    Renamed,
    check_flags,
    check_lr,
    check_nonnegative,
    check_positive,
    check_unit,
)
from ..hookspecs import hookimpl
from ..view import QuantView
from .abl import softmax_entropy
from .base import MethodInfo, TestTimeMethod, check_count, check_state_keys
from .tent import collect_norm_affines, default_lr, train_norm_affines

__all__ = ["SAR", "SARConfig"]


@dataclass
class SARConfig(AdaptConfig):
    """SAR (Niu et al., ICLR 2023, "Towards Stable Test-Time Adaptation in Dynamic Wild World"):
    reliable, sharpness-aware entropy minimisation on the norm affine parameters, with a model
    recovery reset (see the module docstring).

    Every part switches off for ablations: ``reliable_filter`` (keep samples whose entropy is below
    ``E0 = e_margin * ln K``, in both passes), ``sam`` (the sharpness-aware step; off, one plain
    SGD step on the reliable entropy), ``recovery`` (reset the parameters and the optimizer to
    their initial state when the EMA of the second pass's loss falls below ``reset_constant``).

    Defaults and where they come from:

    * ``lr``, ``momentum``: SGD as SAR uses, at Tent's defaults (``lr=None``: by the model's norm
      family, :data:`~qtta_plugins.config.DEFAULT_LR`: 1e-2 with batch norms, 1e-3 with layer norms only; momentum 0.9),
      so the two are compared at one step size; the paper's 2.5e-4 is for ImageNet ResNet-50
      (batch 64).
    * ``e_margin = 0.4``: the paper's ``E0 = 0.4 ln K``, relative to ``ln K``.
    * ``rho = 0.05``: the paper's SAM radius (SAM's default).
    * ``reset_constant = 0.2``: the paper's ``e_m``, an entropy in nats, kept as is (public
      reimplementations keep 0.2 whatever the number of classes). Measured on the digits CNN
      (torchao W4A4): the reliable samples' mean entropy is about 0.32 nats on clean images, and
      the loss EMA stayed above 0.36 along a whole digits-C stream (15 domains, seed 1), so 0.2
      flags what it flags on ImageNet, predictions gone to one-hot, and not a confident model.
    * ``loss_decay = 0.9``: the paper's EMA weight on the old value of that loss.
    """

    renamed_options: ClassVar[dict[str, Renamed]] = {
        "ema_momentum": Renamed("loss_decay", how="the same value: the weight kept"),
    }

    method: str = "sar"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    reliable_filter: bool = True
    e_margin: float = 0.4
    sam: bool = True
    rho: float = 0.05
    recovery: bool = True
    reset_constant: float = 0.2
    loss_decay: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        check_lr(self)
        check_positive(self, "e_margin", "rho", "reset_constant")
        check_unit(self, "momentum", low_open=False, high_open=True)
        check_unit(self, "loss_decay", low_open=False, high_open=True)
        check_nonnegative(self, "weight_decay")
        check_flags(self, "reliable_filter", "sam", "recovery")


class SAR(TestTimeMethod):
    """SAR. State (all in :meth:`state_dict`): the optimizer, ``ema`` (the moving average of the
    second pass's loss, ``None`` until the first update or after a reset) and ``resets`` (model
    recoveries so far). ``initial`` holds the adapted parameters' values at construction, what a
    recovery restores."""

    needs_backward = True

    def __init__(self, view: QuantView, config: SARConfig) -> None:
        super().__init__(view, config)
        self.params = collect_norm_affines(view, "sar")
        train_norm_affines(view, self.params)
        self.optimizer = torch.optim.SGD(
            self.params,
            lr=config.lr if config.lr is not None else default_lr(view),
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
        self.initial = [p.detach().clone() for p in self.params]
        self._init_state()

    def _init_state(self) -> None:
        self.ema: float | None = None
        self.resets = 0

    # --- one batch ---------------------------------------------------------------------------
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        self.optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            logits = self.view.model(x)
            e0 = c.e_margin * math.log(logits.shape[1])
            entropy = softmax_entropy(logits)
            reliable = self._reliable(entropy, e0)
            if not reliable.any():
                return logits.detach()
            loss = entropy[reliable].mean()
            loss.backward()
        tracked = float(loss.detach())
        if c.sam:
            second = self._sharpness_aware_gradient(x, reliable, e0)
            if second is None:
                self.optimizer.zero_grad(set_to_none=True)
                return logits.detach()
            tracked = second
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if c.recovery:
            m = c.loss_decay
            self.ema = tracked if self.ema is None else m * self.ema + (1 - m) * tracked
            if self.ema < c.reset_constant:
                self.recover()
        return logits.detach()

    def _reliable(self, entropy: torch.Tensor, e0: float) -> torch.Tensor:
        if self.config.reliable_filter:
            return entropy.detach() < e0
        return torch.ones(entropy.shape[0], dtype=torch.bool, device=entropy.device)

    def _sharpness_aware_gradient(
        self, x: torch.Tensor, reliable: torch.Tensor, e0: float
    ) -> float | None:
        """Replace the gradients of pass 1 by those of pass 2 at ``theta + rho * g / ||g||``, the
        parameters back at ``theta`` exactly; pass 2's loss, or ``None`` (no gradient) when no
        reliable sample is left there."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:  # pass 1's loss did not reach the adapted parameters
            return None
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.params]
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in grads])
            )
            scale = self.config.rho / (norm + 1e-12)
            for p in self.params:
                if p.grad is not None:
                    p.add_(p.grad * scale)
        self.optimizer.zero_grad(set_to_none=True)
        try:
            with torch.enable_grad():
                entropy = softmax_entropy(self.view.model(x))[reliable]
                keep = self._reliable(entropy, e0)
                if not keep.any():
                    return None
                loss = entropy[keep].mean()
                loss.backward()
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved, strict=True):
                    p.copy_(s)
        return float(loss.detach())

    @torch.no_grad()
    def recover(self) -> None:
        """SAR's model recovery: the adapted parameters back to their initial values, the
        optimizer's momentum and the loss EMA forgotten; counted in ``resets``."""
        for p, p0 in zip(self.params, self.initial, strict=True):
            p.copy_(p0)
        self.optimizer.state.clear()
        self.ema = None
        self.resets += 1

    # --- state -------------------------------------------------------------------------------
    def adapted_parameters(self) -> list[nn.Parameter]:
        return self.params

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "ema": self.ema, "resets": self.resets}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # everything is checked before anything is loaded: a bad state changes nothing
        check_state_keys(state, ("optimizer", "ema", "resets"), "SAR")
        ema, resets = state["ema"], state["resets"]
        if ema is not None and (
            isinstance(ema, bool) or not isinstance(ema, int | float) or not math.isfinite(ema)
        ):
            raise ValueError(f"SAR state: ema must be None or a finite number, got {ema!r}")
        check_count(resets, "resets", "SAR")
        self.optimizer.load_state_dict(state["optimizer"])  # checks the groups before it loads
        self.ema = None if ema is None else float(ema)
        self.resets = resets

    def reset(self) -> None:
        self.optimizer.state.clear()
        self._init_state()


@hookimpl
def qtta_methods() -> list[MethodInfo]:
    return [
        MethodInfo(
            "sar",
            "adapt",
            "SAR: reliable, sharpness-aware entropy minimisation with model recovery",
            True,
            SARConfig,
        )
    ]


@hookimpl
def qtta_adapt(view: QuantView, config: AdaptConfig) -> TestTimeMethod | None:
    if config.method != "sar":
        return None
    if not isinstance(config, SARConfig):
        config = SARConfig(seed=config.seed)
    return SAR(view, config)

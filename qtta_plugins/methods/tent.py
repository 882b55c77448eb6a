"""``tent``: Tent (Wang et al., ICLR 2021), fully test-time adaptation by entropy minimisation.

Configure: batch norms use test-batch statistics; only the norm layers' affine parameters adapt
(batch norms, and LayerNorm / GroupNorm in models that have no batch norm). Collect: those parameters,
under SGD with momentum. Forward and adapt: predict, take the mean prediction entropy, one step.
Gradients pass the fake quantizers straight through, so the quantized model adapts as it will run.

ABL (``TentConfig(abl=True)``): the adaptive balanced loss of TTAQ (Xiao et al., arXiv 2412.09899),
our formulation (the paper's method section was not available). Two statistics of the stream, EMAs
with weight ``m = ABLConfig.decay`` on the old value, updated once per batch after its first step:

* ``pi_c``, the class frequency of the stream's predictions: the mean *soft* prediction
  ``softmax(z)`` of the raw logits over the batch, starting from uniform ``1/K``. Soft, not argmax
  counts: it is the posterior average that prior estimation under label shift uses (Saerens et al.
  2002), a class that is never the argmax keeps a small positive mass instead of a count of zero (whose
  log would be ``-inf``), and one ambiguous sample does not move it by a whole count.
* ``g_c``, how hard the loss pushes each class: ``sum_i |dL/dz~_ic|`` over the batch, read by a tensor
  hook on the adjusted logits during the backward the step does anyway (no second forward), divided
  by its mean over classes so each batch adds a vector of mean 1 (the statistic does not depend on the
  batch size or on the loss scale); starts at ones.

The entropy is taken on the adjusted logits (``abl_adjusted_logits``)::

    z~_c = z_c - tau_f * log(pi_c) - tau_g * log(g_c / mean_c g)

and the batch is predicted with the raw logits ``z``; the statistics are constants in the loss.

Signs. Logit adjustment (Menon et al., ICLR 2021) *adds* ``tau log pi`` inside a supervised loss, which
is equivalent to subtracting it at prediction time: with a fixed true label ``y`` the shift shrinks the
residual ``1 - p~_y`` of frequent labels, so the model needs less margin for them. Entropy
minimisation has no fixed label: its target is the model's own adjusted prediction, and
``-dH/dz~_c = p~_c (log p~_c + H)`` raises every class whose adjusted probability is above the
typical level. Adding ``+tau log pi`` there would move the self-labels *towards* the frequent classes
and push them harder (on a batch that is 80% one class, with ``pi`` = 0.7 for that class, the summed
push on its logit doubles); subtracting it is the prediction-time form of logit adjustment applied to
the self-labels, and the push on the frequent class falls to about zero. So both terms enter with a
minus sign: classes predicted often (``pi_c > 1/K``) or already pushed hard (``g_c > mean g``) are
made less likely inside the loss, rare and under-pushed ones more likely. ``tau_f = tau_g = 0``
gives Tent's loss exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import (
    ABL_RENAMES,
    DEFAULT_LR,
    ABLConfig,
    AdaptConfig,
    Renamed,
    check_abl_option,
    check_lr,
)
from ..hookspecs import hookimpl
from ..view import QuantView
from .abl import (
    ABL_EPS,
    BalancedLoss,
    ExposesBalancedLoss,
    abl_adjusted_logits,
    check_abl_state,
    softmax_entropy,
)
from .base import MethodInfo, TestTimeMethod, refuse_forward_only

__all__ = [
    "ABL_EPS",
    "Tent",
    "TentConfig",
    "abl_adjusted_logits",
    "collect_norm_affines",
    "default_tent_lr",
    "softmax_entropy",
    "tent_parameters",
    "train_norm_affines",
]


@dataclass
class TentConfig(AdaptConfig):
    """Tent (Wang et al., ICLR 2021): entropy minimisation on the norm layers' affine parameters.

    Batch norms use test-batch statistics. ``lr`` and ``momentum`` are for SGD, as in the reference
    implementation; ``steps`` gradient steps per batch; the prediction is the pre-update output.
    ``lr=None`` (the default) picks by what Tent adapts: 1e-2 for batch norms (chosen on the
    digits-C dev stream), 1e-3 for a model with layer / group norms only (chosen on held-out seeds
    of the ViT's stream; ``docs/zoa.md``); :data:`DEFAULT_LR` holds both (EATA and SAR share it).

    ``abl=True`` (or an :class:`ABLConfig`) adds TTAQ's adaptive balanced loss (ABL, Xiao et al.
    2024; our formulation, see the module docstring and ``docs/abl.md``): the entropy
    is taken on the logits ``z~_c = z_c - tau_f * log(pi_c) - tau_g * log(g_c / mean_c g)``, with
    ``pi`` an EMA (weight ``ABLConfig.decay`` kept) of the predicted class frequencies and ``g`` an
    EMA of each class's share of the loss gradient on the logits. Note the minus signs: a class the
    stream predicts often, or that the loss already pushes hard, is made *less* likely inside the
    loss, so entropy minimisation stops feeding it (the prediction itself always uses the raw
    logits). Off by default (``abl=None``), so Tent's results are unchanged. ``tau_f = 1`` is
    Menon et al.'s Bayes-consistent logit-adjustment weight; ``tau_g`` is smaller because ``g``
    is a noisier signal that largely tracks ``pi`` (the dominant class also collects the largest
    gradients), so a full weight would count the same imbalance twice.
    """

    renamed_options: ClassVar[dict[str, Renamed]] = ABL_RENAMES
    embedded_options: ClassVar[dict[str, type]] = {"abl": ABLConfig}

    method: str = "tent"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    steps: int = 1  # optimizer steps per test batch
    #: ABL: an ABLConfig, True (its defaults), a dict of its fields, or None / False (off)
    abl: ABLConfig | bool | dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_lr(self)
        if not 0 <= self.momentum < 1:
            raise ValueError(f"TentConfig.momentum must be in [0, 1), got {self.momentum!r}")
        if self.steps < 1:
            raise ValueError(f"TentConfig.steps must be >= 1, got {self.steps!r}")
        check_abl_option(self)


def tent_parameters(view: QuantView) -> list[nn.Parameter]:
    """Affine parameters of the batch norms, or of all norms when the model has no batch norm."""
    norms = view.norms()
    chosen = [n for n in norms if n.kind == "batch"] or norms
    params: dict[int, nn.Parameter] = {}
    for norm in chosen:
        for p in norm.affine():
            params.setdefault(id(p), p)
    return list(params.values())


def default_lr(view: QuantView) -> float:
    """The SGD learning rate of Tent, EATA and SAR when their config leaves it out: batch norms' if
    the model has any (those are what they adapt then), else layer norms'
    (:data:`~qtta_plugins.config.DEFAULT_LR`)."""
    has_batch_norm = any(n.kind == "batch" for n in view.norms())
    return DEFAULT_LR["batch" if has_batch_norm else "layer"]


default_tent_lr = default_lr  # the name before EATA and SAR shared it


def collect_norm_affines(view: QuantView, method: str) -> list[nn.Parameter]:
    """What Tent-style methods adapt (:func:`tent_parameters`), after checking the model can
    backpropagate and has some; errors name ``method``."""
    refuse_forward_only(view, method)
    params = tent_parameters(view)
    if not params:
        raise ValueError(
            f"method {method!r} found no norm affine parameters in this {view.backend} model"
        )
    return params


def train_norm_affines(view: QuantView, params: list[nn.Parameter]) -> None:
    """Tent's configuration: only ``params`` require grad; batch norms use test-batch statistics."""
    view.freeze()
    for p in params:
        p.requires_grad_(True)
    view.set_norm_mode("batch")


class Tent(ExposesBalancedLoss, TestTimeMethod):
    """Tent, with ABL when ``config.abl``.

    ABL's statistics are ``class_freq`` (``pi``, shape ``(K,)``, sums to 1) and ``grad_mag``
    (``g``, shape ``(K,)``, mean 1); both are ``None`` until the first batch tells ``K``, and both
    are part of :meth:`state_dict`, so the core's rollback, reset and save / load cover them.
    """

    needs_backward = True

    def __init__(self, view: QuantView, config: TentConfig) -> None:
        super().__init__(view, config)
        self.params = collect_norm_affines(view, "tent")
        train_norm_affines(view, self.params)
        lr = config.lr if config.lr is not None else default_lr(view)
        self.optimizer = torch.optim.SGD(
            self.params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
        self._abl_init()

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        prediction = None
        for _ in range(self.config.steps):
            with torch.enable_grad():
                logits = self.view.model(x)
                if self.abl is not None:
                    loss, logit_grad = self._abl_loss(logits)
                else:
                    loss = softmax_entropy(logits).mean()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
            self.optimizer.step()
            if prediction is None:
                prediction = logits.detach()
                if self.abl is not None:
                    # once per batch, from its first step: each batch counts once whatever ``steps``
                    self._abl_update(prediction, logit_grad[0])
        self.optimizer.zero_grad(set_to_none=True)
        return prediction

    # --- ABL (qtta_plugins.methods.abl) ----------------------------------------------------------

    def _abl_loss(self, logits: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Mean entropy of the adjusted logits, and a list the backward fills with dL/dz~."""
        assert self.abl is not None
        adjusted, grads = self.abl.adjust(logits)
        return softmax_entropy(adjusted).mean(), grads

    def _abl_update(self, logits: torch.Tensor, logit_grad: torch.Tensor) -> None:
        assert self.abl is not None
        self.abl.update(logits, logit_grad)

    # --- state -----------------------------------------------------------------------------------
    def adapted_parameters(self) -> list[nn.Parameter]:
        return self.params

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"optimizer": self.optimizer.state_dict()}
        if self.abl is not None:
            state["abl"] = self.abl.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_abl_state(
            state, self.abl, "Tent"
        )  # before anything loads: a bad state changes nothing
        self.optimizer.load_state_dict(state["optimizer"])
        if self.abl is not None:
            self.abl.load_state_dict(state["abl"])

    def reset(self) -> None:
        self.optimizer.state.clear()
        if self.abl is not None:
            self.abl.reset()

    def _abl_init(self) -> None:
        # the number of classes is known at the first batch: until then, no statistics
        c = self.config
        self.abl = BalancedLoss.from_config(c.abl)


@hookimpl
def qtta_methods() -> list[MethodInfo]:
    return [
        MethodInfo(
            "tent", "adapt", "entropy minimisation on norm affine params (SGD)", True, TentConfig
        )
    ]


@hookimpl
def qtta_adapt(view: QuantView, config: AdaptConfig) -> TestTimeMethod | None:
    if config.method != "tent":
        return None
    if not isinstance(config, TentConfig):
        config = TentConfig(seed=config.seed)
    return Tent(view, config)

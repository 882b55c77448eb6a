"""``eata``: EATA (Niu et al., ICML 2022, "Efficient Test-Time Model Adaptation without Forgetting").

Tent's entropy minimisation, made cheaper and safer by choosing which samples it learns from and by
holding the parameters near the source. Configure and collect as Tent does: batch norms use
test-batch statistics, the norm layers' affine parameters adapt under SGD, gradients pass the fake
quantizers straight through. Per batch ``x`` with logits ``z`` (``K`` classes), entropies
``E_i = H(softmax(z_i))`` and ``E0 = e_margin * ln K``:

1. reliable samples: ``E_i < E0``. A high-entropy prediction is as likely wrong as right, and its
   gradient is large and noisy; learning from it is what makes entropy minimisation drift;
2. non-redundant samples, among the reliable ones: ``|cos(p_i, m)| < d_margin``, with ``p_i`` the
   sample's softmax and ``m`` an EMA (weight ``probs_decay`` on the old value) of the mean
   softmax of the samples selected so far. A sample that looks like what the model already learnt
   from adds cost, little information, and a push towards the classes it has seen most. The EMA
   starts at the first batch's selected samples (the first batch has only the first filter) and
   moves only with selected samples;
3. loss: the mean over the selected samples of ``exp(E0 - E_i) * E_i`` (the weight, a constant in
   the gradient, favours confident samples), plus the anti-forgetting term
   ``fisher_alpha * sum_j F_j (theta_j - theta0_j)^2``, with ``theta0`` the parameters when the
   method was built and ``F`` their diagonal Fisher information on clean source images;
4. one SGD step if any sample was selected; none otherwise, as EATA does: a batch with nothing to
   learn from does not move the model, neither by the Fisher term's pull nor by the momentum. The
   prediction is the batch's pre-update output.

The Fisher is EATA's estimate: the model's own predictions on the source images are the labels
(the images need none), and ``F`` is the mean over source batches of the squared gradient of the
batch's mean cross-entropy. It is measured once, at construction, on the quantized model prepared
for adaptation (batch norms on batch statistics), so it describes the model as it will adapt. The
source images are ``EATAConfig.source_data`` or the sample :func:`qtta_plugins.quantize` keeps
with ``keep_calibration_sample=True``, as for ``zoa`` / ``foa``.

Selection and weights use the raw logits. With ``abl=True`` (TTAQ's adaptive balanced loss, see
:mod:`qtta_plugins.methods.tent` and :mod:`qtta_plugins.methods.abl`) the selected samples'
entropies in the loss are taken on the adjusted logits instead, the prediction stays the raw
logits, and the statistics are updated once per batch; ABL's weights at zero give EATA's loss.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import (
    ABL_RENAMES,
    ABLConfig,
    AdaptConfig,
    Renamed,
    check_abl_option,
    check_flags,
    check_int,
    check_lr,
    check_nonnegative,
    check_positive,
    check_unit,
)
from ..features import source_batches
from ..hookspecs import hookimpl
from ..view import QuantView
from .abl import BalancedLoss, ExposesBalancedLoss, check_abl_state, softmax_entropy
from .base import MethodInfo, TestTimeMethod, check_count, check_state_keys
from .tent import collect_norm_affines, default_lr, train_norm_affines

__all__ = ["EATA", "EATAConfig", "diagonal_fisher", "eata_loss", "eata_selection"]


@dataclass
class EATAConfig(AdaptConfig):
    """EATA (Niu et al., ICML 2022, "Efficient Test-Time Model Adaptation without Forgetting"):
    Tent's entropy minimisation on the norm affine parameters, on selected samples, re-weighted,
    with a Fisher-weighted pull back to the source parameters (see the module docstring).

    Every part switches off for ablations: ``reliable_filter`` (keep samples whose entropy is below
    ``E0 = e_margin * ln K``), ``redundancy_filter`` (drop samples whose softmax has cosine
    similarity ``>= d_margin`` with an EMA of the selected samples' mean softmax), ``reweight``
    (weight ``exp(E0 - E)`` per sample), ``fisher`` (the anti-forgetting term
    ``fisher_alpha * sum_i F_i (theta_i - theta0_i)^2``).

    Defaults and where they come from:

    * ``lr``, ``momentum``: SGD as EATA uses, at Tent's defaults (``lr=None``: by the model's norm
      family, :data:`~qtta_plugins.config.DEFAULT_LR`: 1e-2 with batch norms, 1e-3 with layer norms only; momentum 0.9),
      so the two are compared at one step size; the paper's 2.5e-4 is for ImageNet ResNet-50.
    * ``e_margin = 0.4``: the paper's ``E0 = 0.4 ln K``; relative to ``ln K``, so it carries over
      to any number of classes.
    * ``d_margin = 0.4``: the paper's 0.05 is for ImageNet (K = 1000), where the cosine between a
      confident softmax and a spread-out mean is about ``1/sqrt(K)`` = 0.03; with K = 10 that
      cosine is about 0.3, so 0.05 would drop almost every sample. 0.4 is what the TTA benchmark
      library (mariodoebler/test-time-adaptation) runs EATA with on CIFAR-10-C (K = 10, as our
      digits and Fashion-MNIST streams).
    * ``probs_decay = 0.9``: the paper's EMA weight on the old mean softmax.
    * ``fisher_alpha = 2000``: the paper's. The term's pull per SGD step is ``2 lr alpha F`` of
      the distance to ``theta0``: at most about 0.05 on the digits CNN (torchao W4A4, diagonal
      Fisher up to 1.3e-3, lr 1e-2), far inside SGD's stable range, so the paper's weight
      carries over to our step size.
    * ``fisher``: ``None`` (default) uses the term when clean source images are at hand
      (``source_data=``, or the sample a model quantized with ``keep_calibration_sample=True``
      keeps) and otherwise runs without it with a warning (that is ETA, the paper's variant
      without the term); ``True`` requires it (an error without images); ``False`` turns it off.
    * ``source_batch_size = 64``: the Fisher is the mean over source batches of the squared
      gradient of the batch's cross-entropy against the model's own predictions, as EATA computes
      it (in batches of 64, the size ``fisher_alpha`` was set for).

    ``abl=True`` (or an :class:`ABLConfig`) takes TTAQ's adaptive balanced loss inside EATA's
    loss, as Tent does (:class:`~qtta_plugins.methods.tent.TentConfig`): the selected samples' entropies are taken on the
    adjusted logits; selection, weights and the prediction use the raw logits.
    """

    renamed_options: ClassVar[dict[str, Renamed]] = {
        "probs_momentum": Renamed("probs_decay", how="the same value: the weight kept"),
        **ABL_RENAMES,
    }
    embedded_options: ClassVar[dict[str, type]] = {"abl": ABLConfig}

    method: str = "eata"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    reliable_filter: bool = True
    e_margin: float = 0.4
    redundancy_filter: bool = True
    d_margin: float = 0.4
    probs_decay: float = 0.9
    reweight: bool = True
    fisher: bool | None = None
    fisher_alpha: float = 2000.0
    source_batch_size: int = 64
    #: clean source inputs for the Fisher (a tensor, or an iterable of tensors / (x, y) pairs);
    #: default: the calibration sample a model quantized with keep_calibration_sample=True keeps
    source_data: Any = None
    #: ABL: an ABLConfig, True (its defaults), a dict of its fields, or None / False (off)
    abl: ABLConfig | bool | dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_lr(self)
        check_positive(self, "e_margin", "d_margin", "fisher_alpha")
        check_unit(self, "momentum", low_open=False, high_open=True)
        check_unit(self, "probs_decay", low_open=False, high_open=True)
        check_nonnegative(self, "weight_decay")
        check_flags(self, "reliable_filter", "redundancy_filter", "reweight")
        if self.fisher is not None and not isinstance(self.fisher, bool):
            raise ValueError(
                f"EATAConfig.fisher must be None (on when source images are at hand), True or "
                f"False, got {self.fisher!r}"
            )
        check_int(self, "source_batch_size", 1)
        check_abl_option(self)


@torch.no_grad()
def eata_selection(
    logits: torch.Tensor,
    probs: torch.Tensor | None,
    e0: float,
    d_margin: float,
    *,
    reliable_filter: bool = True,
    redundancy_filter: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """EATA's two filters on a batch's ``logits`` ``(N, K)``: boolean masks ``(reliable,
    selected)``. ``reliable``: entropy below ``e0`` (all samples with ``reliable_filter=False``);
    ``selected``: the reliable samples whose softmax has ``|cosine| < d_margin`` with ``probs``
    (the EMA of the selected samples' mean softmax; no second filter while it is ``None``)."""
    reliable = (
        softmax_entropy(logits) < e0
        if reliable_filter
        else torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    )
    selected = reliable.clone()
    if redundancy_filter and probs is not None:
        cosine = F.cosine_similarity(probs.to(logits.dtype).unsqueeze(0), logits.softmax(1), dim=1)
        selected &= cosine.abs() < d_margin
    return reliable, selected


def eata_loss(
    logits: torch.Tensor,
    selected: torch.Tensor,
    e0: float,
    *,
    reweight: bool = True,
    loss_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over the ``selected`` samples of ``exp(e0 - E_i) * E_i`` (``E_i`` alone with
    ``reweight=False``). The weights come from the entropies of ``logits`` and are constants in
    the gradient; the entropies minimised are those of ``loss_logits`` (ABL's adjusted logits)
    when given, else of ``logits``. ``selected`` must hold at least one sample."""
    source = logits if loss_logits is None else loss_logits
    entropy = softmax_entropy(source[selected])
    if reweight:
        weight = torch.exp(e0 - softmax_entropy(logits[selected].detach()))
        entropy = entropy * weight
    return entropy.mean()


def diagonal_fisher(
    model: nn.Module, params: list[nn.Parameter], batches: list[torch.Tensor]
) -> list[torch.Tensor]:
    """EATA's diagonal Fisher of ``params`` on unlabelled ``batches``: the mean over batches of the
    squared gradient of the batch's mean cross-entropy against the model's own (argmax)
    predictions. ``model``'s buffers are put back afterwards (a batch-statistics forward may count
    itself in ``num_batches_tracked``); its parameters are not changed and their ``.grad`` is not
    touched."""
    device = params[0].device
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    fisher = [torch.zeros_like(p) for p in params]
    try:
        for x in batches:
            with torch.enable_grad():
                logits = model(x.to(device))
                loss = F.cross_entropy(logits, logits.detach().argmax(1))
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            for f, g in zip(fisher, grads, strict=True):
                if g is not None:
                    f += g.detach() ** 2
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    return [f / len(batches) for f in fisher]


class EATA(ExposesBalancedLoss, TestTimeMethod):
    """EATA, with ABL when ``config.abl``.

    State (all in :meth:`state_dict`, so the core's rollback, reset and save / load cover it): the
    optimizer, ``probs`` (the EMA of the selected samples' mean softmax, ``None`` until a sample is
    selected), the counters ``reliable_samples`` and ``selected_samples`` (samples that passed the
    first filter / both, over the run) and ABL's statistics. ``fisher`` and ``theta0`` are measured
    at construction and stay fixed (``fisher`` is ``None`` when the term is off).
    """

    needs_backward = True

    def __init__(self, view: QuantView, config: EATAConfig) -> None:
        super().__init__(view, config)
        self.params = collect_norm_affines(view, "eata")
        batches = source_batches(view, config.source_data, config.source_batch_size)
        if config.fisher is True and not batches:
            raise ValueError(
                "eata: fisher=True needs clean source images for the Fisher information: pass "
                "source_data=clean_batches, or quantize with keep_calibration_sample=True "
                "(fisher=False runs without the anti-forgetting term)"
            )
        train_norm_affines(view, self.params)
        self.optimizer = torch.optim.SGD(
            self.params,
            lr=config.lr if config.lr is not None else default_lr(view),
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
        self.device = self.params[0].device
        self.fisher: list[torch.Tensor] | None = None
        self.theta0: list[torch.Tensor] | None = None
        if config.fisher is not False:
            if batches:
                self.theta0 = [p.detach().clone() for p in self.params]
                self.fisher = diagonal_fisher(view.model, self.params, batches)
            else:
                warnings.warn(
                    "eata: no clean source images (pass source_data=clean_batches, or quantize "
                    "with keep_calibration_sample=True): the Fisher anti-forgetting term is off, "
                    "which is ETA (fisher=False turns it off without this warning)",
                    stacklevel=4,
                )
        self.abl = BalancedLoss.from_config(config.abl)
        self._init_state()

    def _init_state(self) -> None:
        self.probs: torch.Tensor | None = None
        self.reliable_samples = 0
        self.selected_samples = 0

    # --- one batch ---------------------------------------------------------------------------
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        grads: list[torch.Tensor] = []
        with torch.enable_grad():
            logits = self.view.model(x)
            e0 = c.e_margin * math.log(logits.shape[1])
            reliable, selected = eata_selection(
                logits.detach(),
                self.probs,
                e0,
                c.d_margin,
                reliable_filter=c.reliable_filter,
                redundancy_filter=c.redundancy_filter,
            )
            adjusted = None
            if self.abl is not None:
                adjusted, grads = self.abl.adjust(logits)
            update = bool(selected.any())
            if update:
                loss = eata_loss(logits, selected, e0, reweight=c.reweight, loss_logits=adjusted)
                if self.fisher is not None:
                    loss = loss + self.fisher_penalty()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
        if update:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        prediction = logits.detach()
        if self.abl is not None:
            self.abl.update(prediction, grads[0] if grads else None)
        self._update_probs(prediction, selected)
        self.reliable_samples += int(reliable.sum())
        self.selected_samples += int(selected.sum())
        return prediction

    def fisher_penalty(self) -> torch.Tensor:
        """``fisher_alpha * sum_j F_j (theta_j - theta0_j)^2`` at the current parameters."""
        assert self.fisher is not None and self.theta0 is not None
        total = sum(
            (f * (p - p0) ** 2).sum()
            for p, f, p0 in zip(self.params, self.fisher, self.theta0, strict=True)
        )
        return self.config.fisher_alpha * total  # type: ignore[return-value]

    @torch.no_grad()
    def _update_probs(self, logits: torch.Tensor, selected: torch.Tensor) -> None:
        if not selected.any():
            return
        mean = logits[selected].float().softmax(1).mean(0)
        m = self.config.probs_decay
        # replaced, never updated in place: a shallow copy of the state is a snapshot
        self.probs = mean if self.probs is None else m * self.probs + (1 - m) * mean

    # --- state -------------------------------------------------------------------------------
    def adapted_parameters(self) -> list[nn.Parameter]:
        return self.params

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "optimizer": self.optimizer.state_dict(),
            "probs": self.probs,
            "reliable_samples": self.reliable_samples,
            "selected_samples": self.selected_samples,
        }
        if self.abl is not None:
            state["abl"] = self.abl.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # everything is checked before anything is loaded: a bad state changes nothing
        check_state_keys(
            state, ("optimizer", "probs", "reliable_samples", "selected_samples"), "EATA"
        )
        check_abl_state(state, self.abl, "EATA")
        probs = state["probs"]
        if probs is not None and not (
            isinstance(probs, torch.Tensor) and probs.ndim == 1 and probs.is_floating_point()
        ):
            raise ValueError("EATA state: probs must be None or a 1-D float tensor (K,)")
        for key in ("reliable_samples", "selected_samples"):
            check_count(state[key], key, "EATA")
        self.optimizer.load_state_dict(state["optimizer"])  # checks the groups before it loads
        if self.abl is not None:
            self.abl.load_state_dict(state["abl"])
        self.probs = None if probs is None else probs.detach().to(self.device, copy=True)
        self.reliable_samples = state["reliable_samples"]
        self.selected_samples = state["selected_samples"]

    def reset(self) -> None:
        self.optimizer.state.clear()
        if self.abl is not None:
            self.abl.reset()
        self._init_state()


@hookimpl
def qtta_methods() -> list[MethodInfo]:
    return [
        MethodInfo(
            "eata",
            "adapt",
            "EATA: entropy minimisation on reliable, non-redundant samples, Fisher anti-forgetting",
            True,
            EATAConfig,
        )
    ]


@hookimpl
def qtta_adapt(view: QuantView, config: AdaptConfig) -> TestTimeMethod | None:
    if config.method != "eata":
        return None
    if not isinstance(config, EATAConfig):
        config = EATAConfig(seed=config.seed)
    return EATA(view, config)

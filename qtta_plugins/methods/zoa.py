"""``zoa``: forward-only continual test-time adaptation with a domain memory (the paper's
"domain knowledge bank"; called the memory here, as "bank" is RTF-Q's ``SubnetBank``).

Our implementation of ZOA (zeroth-order adaptation for quantized models), from the algorithm of the
authors' public code (docs/design.md), without that code's known faults (see the notes at
the end). Two forward passes per batch, no backward pass and no autograd graph, so it adapts models
that cannot backpropagate - torchao's ``convert_pt2e`` integer graphs included.

Configure: batch norms use test-batch statistics; a subset of norm layers adapts (by default those
between the first and the last block, as the authors leave the first and last stages frozen).
Their affine parameters are *fused*::

    theta = theta_0 + sum_k softmax(s * alpha)_k * delta_k + eps

``theta_0`` the source affine, ``delta_0 = 0`` (the source) and ``delta_1..K`` the memory's stored
domain deltas, ``alpha`` the mixing logits (shared by all layers, ``s = temperature``), ``eps`` the
live residual.

Forward and adapt, per batch ``x``:

1. pass 1 at ``theta``: its logits are the prediction; loss
   ``L = lambda * sum_f [MSE(std_f, std_f^src) + MSE(mean_f, mean_f^src)] + mean entropy`` over the
   pooled features ``f`` (block boundaries), with source statistics measured once by the quantized
   model itself on clean data;
2. the domain-change detector compares pass 1's early feature map with its running statistics; on a
   change, the memory stores the current total delta (see :meth:`ZOA._store`);
3. pass 2 at ``(eps + c * D, alpha + c_alpha * D_alpha)``, ``D`` drawn as ``+-U[0.5, 1]``, gives
   ``L+``; one-sided SPSA: ``g = (L+ - L) / (c * D)``;
4. ``eps`` takes an SGD step with weight decay (which pulls it back to the stored mix); ``alpha`` an
   AdamW step (``torch.optim.AdamW``), once the memory holds a domain.

Doing less work (docs/zoa.md; measured by ``qtta bench benchmarks/configs/zoa_cost.yaml``): pass 2
starts at the first adapted norm from pass 1's values there (``reuse_prefix``,
:mod:`qtta_plugins.prefix`); ``norm_layers="late"`` adapts only the later half of the middle
blocks, so that start moves back; ``skip_converged`` runs pass 1 only once the loss has settled
within a domain (PACE's fallback to one pass), until the detector fires, the loss moves or a
periodic probe updates.

The output shift (from FOA) adds ``mean_src - EMA(mean_batch)`` to the last layer's input; the EMA
restarts at a detected domain change.

Not copied from the public reference code: the CNN shift is a per-channel vector (the code used a
scalar); the memory's similarity is recomputed after every merge (the code kept a stale matrix after a
delete); running statistics (shift EMA, detector) update from pass 1 only (the code updated them in
both passes, counting every batch twice and the perturbed one among them).

Over 500 lines: one method read top to bottom, with every choice the paper leaves open written next to the code that makes it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

from ..config import AdaptConfig, Renamed
from ..features import (
    FeatureRecorder,
    detector_norm,
    feature_layers,
    kept_statistics,
    source_batches,
    source_statistics,
)
from ..hookspecs import hookimpl
from ..view import NormLayer, QuantView
from .base import MethodInfo, TestTimeMethod
from .tent import softmax_entropy


@dataclass
class ZOAConfig(AdaptConfig):
    """ZOA's options. ``None`` picks the authors' default for the model family (CNN with batch
    norms / transformer with layer norms), as the field's comment says.

    Every component can be switched off for ablations: ``memory=False`` (no stored domains, no
    ``alpha``), ``shift=False`` (no output shift), ``detector=False`` (no change detection: the memory
    then stores every ``store_period`` batches), ``align_weight=0`` (entropy only),
    ``entropy=False`` (alignment only), ``batch_stats=False`` (norms keep source statistics).
    """

    renamed_options: ClassVar[dict[str, Renamed]] = {
        "shift_momentum": Renamed("shift_decay", how="the same value: the weight kept"),
        "detector_momentum": Renamed("detector_decay", how="the same value: the weight kept"),
        # "bank" is RTF-Q's (SubnetBank): ZOA's store of domains is its memory
        "bank": Renamed("memory", how="the same value"),
        "bank_size": Renamed("memory_size", how="the same value"),
    }

    method: str = "zoa"
    #: which norms adapt: "late" (default: the later half of the middle blocks, so that pass 2
    #: recomputes only that half, see reuse_prefix), "middle" (the authors': all but those of the
    #: first and last block) or "all". "late" cost no accuracy (docs/zoa.md, 3 seeds x 3 backends)
    norm_layers: str = "late"
    #: where features are read: "blocks" (block boundaries + head input) or "all" layer inputs
    feature_layers: str = "blocks"
    lr: float = 3e-3  # SGD on eps (chosen on the digits-C dev stream; see docs/zoa.md)
    weight_decay: float = 0.4  # on eps: pulls it back towards the stored mix
    c: float = 0.02  # SPSA step for eps (authors: 0.01 CNN / 0.02 ViT; 0.02 won on digits-C)
    c_alpha: float = 0.05  # SPSA step for alpha
    alpha_lr: float = 0.01  # AdamW on alpha
    alpha_weight_decay: float = 0.1
    temperature: float = 10.0  # s in softmax(s * alpha)
    align_weight: float | None = None  # lambda: 1 CNN / 30 transformer; 0 turns alignment off
    entropy: bool = True
    shift: bool = True
    shift_decay: float = 0.9  # the output shift's EMA: weight on the old value
    detector: bool = True
    detector_decay: float = 0.8  # the detector's running statistics: weight on the old value
    detector_threshold: float | None = None  # symmetric KL: 0.05 CNN / 0.1 transformer (see docs)
    min_domain_batches: int = 2  # a domain shorter than this is not stored
    memory: bool = True  # the domain memory (the paper's bank) and alpha
    memory_size: int = 32
    store_period: int = 50  # with detector=False: store every this many batches
    batch_stats: bool = True
    #: pass 2 starts where the adapted parameters are first used, from pass 1's values there
    #: (qtta_plugins.prefix); False recomputes the whole model (same results, for comparison)
    reuse_prefix: bool = True
    #: once the loss has settled within a domain, run pass 1 only (prediction, loss, detector,
    #: shift) until the detector fires, the loss moves, or a periodic probe (PACE's fallback).
    #: On by default: it held accuracy (docs/zoa.md, 3 seeds x 3 backends, rule chosen on a dev stream)
    skip_converged: bool = True
    converge_window: int = 4  # settled: the mean loss of the last window moved less than ...
    converge_tolerance: float = 0.02  # ... this (relative) from the window before, or less than
    converge_z: float = 2.0  # ... this many standard errors of the batch-to-batch loss noise
    probe_period: int = 8  # while settled: a full two-pass update every this many batches
    source_batch_size: int = 64
    #: clean source inputs for the source statistics (tensor or iterable of batches); default: the
    #: statistics qtta_plugins.quantize measured on its calibration data (or the calibration
    #: sample itself, with keep_calibration_sample=True)
    source_data: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.norm_layers not in ("middle", "late", "all"):
            raise ValueError(
                f"ZOAConfig.norm_layers must be 'middle', 'late' or 'all', not {self.norm_layers!r}"
            )
        if self.feature_layers not in ("blocks", "all"):
            raise ValueError(
                f"ZOAConfig.feature_layers must be 'blocks' or 'all', not {self.feature_layers!r}"
            )
        for name in ("lr", "c", "c_alpha", "alpha_lr", "temperature"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"ZOAConfig.{name} must be a positive number, got {value!r}")
        for name in ("detector_threshold",):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(
                    f"ZOAConfig.{name} must be a positive number or None, got {value!r}"
                )
        if self.align_weight is not None and not self.align_weight >= 0:
            raise ValueError(f"ZOAConfig.align_weight must be >= 0, got {self.align_weight!r}")
        for name in ("shift_decay", "detector_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"ZOAConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.converge_window < 1 or self.probe_period < 1:
            raise ValueError("ZOAConfig.converge_window and probe_period must be >= 1")
        if not (math.isfinite(self.converge_tolerance) and self.converge_tolerance > 0):
            raise ValueError(
                "ZOAConfig.converge_tolerance must be a positive number, got "
                f"{self.converge_tolerance!r}"
            )
        if not (math.isfinite(self.converge_z) and self.converge_z >= 0):
            raise ValueError(f"ZOAConfig.converge_z must be >= 0, got {self.converge_z!r}")
        if self.memory_size < 1 or self.store_period < 1 or self.min_domain_batches < 0:
            raise ValueError(
                "ZOAConfig.memory_size and store_period must be >= 1, min_domain_batches >= 0"
            )
        if not (self.entropy or self.align_weight != 0):
            raise ValueError("ZOAConfig: with entropy=False and align_weight=0 there is no loss")


def adapted_norms(view: QuantView, which: str) -> list[NormLayer]:
    """The norm layers ZOA adapts: ``"all"``; ``"middle"`` - those outside the first and last
    block that holds norms (the authors' choice: early and last stages stay frozen); or ``"late"``
    - the later half of those middle blocks, so that the second pass, which starts at the first
    adapted norm, recomputes only the later part of the network. A model with norms in fewer than
    three blocks adapts them all."""
    norms = [n for n in view.norms() if n.affine()]
    if which == "all":
        return norms
    groups = [_block_key(n.name) for n in norms]
    distinct = list(dict.fromkeys(groups))
    if len(distinct) < 3:
        return norms
    middle = distinct[1:-1]
    inner = set(middle[len(middle) // 2 :] if which == "late" else middle)
    return [n for n, g in zip(norms, groups, strict=True) if g in inner]


def _block_key(name: str) -> str:
    """``layer1.bn1`` -> ``layer1``; ``blocks.3.norm1`` -> ``blocks.3`` (as QuantView.blocks groups)."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]


def symmetric_kl(m1: torch.Tensor, v1: torch.Tensor, m2: torch.Tensor, v2: torch.Tensor) -> float:
    """Mean over channels of the symmetric KL divergence (the mean of both directions) between
    two diagonal Gaussians given by means and variances."""
    p = Normal(m1, (v1 + 1e-5).sqrt())
    q = Normal(m2, (v2 + 1e-5).sqrt())
    return float((0.5 * (kl_divergence(p, q) + kl_divergence(q, p))).mean())


class ZOA(TestTimeMethod):
    needs_backward = False

    def __init__(self, view: QuantView, config: ZOAConfig) -> None:
        super().__init__(view, config)
        has_bn = any(n.has_statistics for n in view.norms())
        transformer = not has_bn
        self.c = config.c
        self.align_weight = (
            config.align_weight
            if config.align_weight is not None
            else (30.0 if transformer else 1.0)
        )
        self.threshold = (
            config.detector_threshold
            if config.detector_threshold is not None
            else (0.1 if transformer else 0.05)
        )
        norms = adapted_norms(view, config.norm_layers)
        if not norms:
            raise ValueError(
                f"method 'zoa' found no norm affine parameters to adapt in this {view.backend} model"
                + (
                    " (a convert_pt2e graph: convert with qtta_torchao.export.convert, which keeps a "
                    "per-channel affine in place of each folded batch norm)"
                    if not view.can_backprop
                    else ""
                )
            )
        self.params: list[nn.Parameter] = []
        for norm in norms:
            for p in norm.affine():
                if all(p is not q for q in self.params):
                    self.params.append(p)
        self.norm_names = [n.name for n in norms]
        view.freeze()
        if config.batch_stats and has_bn:
            view.set_norm_mode("batch")
        with torch.no_grad():
            self.theta0 = torch.cat([p.detach().reshape(-1) for p in self.params]).clone()
        self._slices = []
        start = 0
        for p in self.params:
            self._slices.append((start, start + p.numel()))
            start += p.numel()

        layers = feature_layers(view, config.feature_layers)
        # The detector watches what the first norm normalises (a batch norm's statistics would
        # otherwise take the shift out before we see it).
        first = detector_norm(view) if config.detector else None
        detector = view.norm_input_module(first) if first is not None else None
        self.recorder = FeatureRecorder(view, layers, detector)
        self.recorder.shift_decay = config.shift_decay
        batches = source_batches(view, config.source_data, config.source_batch_size)
        if batches:
            found = source_statistics(view, self.recorder, batches)
        else:  # what quantize measured on its calibration data (None: warned why)
            found = kept_statistics(
                view, self.recorder, layers, first, config.source_batch_size, "zoa"
            )
        if found is not None:
            self.source_stats, self.source_detector = found
            if config.shift:
                self.recorder.shift_target = self.source_stats[-1].mean
        else:
            self.source_stats, self.source_detector = None, None
            self.align_weight = 0.0
            if not config.entropy:
                raise ValueError(
                    "zoa: with entropy=False the method needs clean source data: pass "
                    "source_data=clean_batches, or quantize with keep_calibration_sample=True"
                )
        # The method's own tensors live on the model's device; the perturbations are drawn on the
        # CPU (one generator: the same run on any device) and moved there.
        self.device = self.theta0.device
        self.generator = torch.Generator().manual_seed(config.seed)
        # after the recorder: its taps are part of the graph the cache splits
        self.prefix = view.prefix_cache(self.params) if config.reuse_prefix else None
        self._init_state()

    # --- state -------------------------------------------------------------------------------
    def _init_state(self) -> None:
        d, device = self.theta0.numel(), self.device
        self.eps = torch.zeros(d, device=device)
        # K stored domains (the source's zero delta is implicit)
        self.memory_deltas = torch.zeros(0, d, device=device)
        self._set_alpha(torch.zeros(1, device=device))
        self.running_detector: tuple[torch.Tensor, torch.Tensor] | None = (
            tuple(t.clone() for t in self.source_detector) if self.source_detector else None  # type: ignore[assignment]
        )
        self.domain_batches = 0
        self.batches = 0
        self.changes: list[int] = []  # batch indices where a change was detected
        self.recorder.reset_shift()
        # skip_converged: pass-1 losses of this domain (the last two windows), the settled level
        self.recent_losses: list[float] = []
        self.settled_loss: float | None = None
        self.since_update = 0
        self.one_pass_batches = 0  # batches that ran pass 1 only (skip_converged)

    def reset(self) -> None:
        self._init_state()
        self.generator.manual_seed(self.config.seed)

    def state_dict(self) -> dict[str, Any]:
        return {
            "eps": self.eps.clone(),
            "memory_deltas": self.memory_deltas.clone(),
            "alpha": self.alpha.clone(),
            **self._alpha_optimizer_state(),
            "running_detector": None
            if self.running_detector is None
            else tuple(t.clone() for t in self.running_detector),
            "domain_batches": self.domain_batches,
            "batches": self.batches,
            "changes": list(self.changes),
            "recent_losses": list(self.recent_losses),
            "settled_loss": self.settled_loss,
            "since_update": self.since_update,
            "one_pass_batches": self.one_pass_batches,
            **self.recorder.shift_state(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("eps") is None or state["eps"].shape != self.eps.shape:
            raise ValueError("ZOA state does not match this model's adapted parameters")
        here = self.device  # a state saved on another device loads onto this model's

        def on(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(here, copy=True)

        self.eps = on(state["eps"])
        # "bank_deltas": a state saved before the memory's rename (issue 36)
        self.memory_deltas = on(
            state["memory_deltas" if "memory_deltas" in state else "bank_deltas"]
        )
        self._set_alpha(on(state["alpha"]), [on(t) for t in state["alpha_moments"]])
        self._load_alpha_steps(state["alpha_steps"])
        det = state["running_detector"]
        self.running_detector = None if det is None else tuple(on(t) for t in det)  # type: ignore[assignment]
        self.domain_batches = state["domain_batches"]
        self.batches = state["batches"]
        self.changes = list(state["changes"])
        self.recent_losses = list(state.get("recent_losses", []))
        self.settled_loss = state.get("settled_loss")
        self.since_update = state.get("since_update", 0)
        self.one_pass_batches = state.get("one_pass_batches", 0)
        self.recorder.load_shift_state(state)
        self.generator.set_state(state["generator"])
        self._write(self.eps, self.alpha)

    def min_batch_size(self) -> int:
        """2 on any model: its loss aligns the batch's feature means and deviations with the source's (one image has
        no deviation) and its SPSA estimate over one image is as noisy as a loss can be."""
        return max(super().min_batch_size(), 2)

    def adapted_parameters(self) -> list[nn.Parameter]:
        return [*self.params, *self.recorder.tensors()]  # the norms, and the shift's head bias

    @property
    def memory_bytes_per_domain(self) -> int:
        """Bytes one stored domain takes (a float32 delta of every adapted parameter)."""
        return self.theta0.numel() * 4

    # --- the fused parameters ----------------------------------------------------------------
    def _mix(self, alpha: torch.Tensor) -> torch.Tensor:
        if self.memory_deltas.shape[0] == 0:
            return torch.zeros_like(self.theta0)
        weights = torch.softmax(self.config.temperature * alpha, 0)
        return weights[1:] @ self.memory_deltas

    def _write(self, eps: torch.Tensor, alpha: torch.Tensor) -> None:
        theta = self.theta0 + self._mix(alpha) + eps
        with torch.no_grad():
            for p, (a, b) in zip(self.params, self._slices, strict=True):
                p.copy_(theta[a:b].view_as(p))

    # --- one batch ---------------------------------------------------------------------------
    def _loss(self, logits: torch.Tensor) -> float:
        loss = softmax_entropy(logits).mean() if self.config.entropy else logits.new_zeros(())
        if self.align_weight and self.source_stats is not None:
            align = logits.new_zeros(())
            for s, src in zip(self.recorder.collected(), self.source_stats, strict=True):
                align = (
                    align + (s.std - src.std).square().mean() + (s.mean - src.mean).square().mean()
                )
            loss = loss + self.align_weight * align
        return float(loss)

    def _draw(self, n: int) -> torch.Tensor:
        magnitude = torch.rand(n, generator=self.generator) * 0.5 + 0.5
        sign = torch.randint(0, 2, (n,), generator=self.generator) * 2 - 1
        return (magnitude * sign).to(self.device)

    @torch.no_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        # the recording hooks are on the model for this step only (the shift is in the head bias)
        try:
            with self.recorder.attached():
                return self._step(x)
        finally:
            if self.prefix is not None:
                # nothing of this batch is kept past its step, nor any hook of the cache
                self.prefix.release()

    def _step(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        recorder = self.recorder
        # Pass 1: the prediction, the loss at the current parameters, the running statistics.
        recorder.update_ema = True
        recorder.clear()
        logits = self.prefix.run(x) if self.prefix is not None else self.view.model(x)
        loss = self._loss(logits)
        changed = self._detect(x.shape[0])
        self.batches += 1
        self.domain_batches += 1
        if cfg.skip_converged and self._settled(loss, changed):
            self.one_pass_batches += 1
            return logits
        self.since_update = 0

        # Pass 2: one simultaneous perturbation of eps (and alpha once the memory holds a domain).
        use_alpha = cfg.memory and self.memory_deltas.shape[0] > 0
        d_eps = self._draw(self.eps.numel())
        d_alpha = self._draw(self.alpha.numel()) if use_alpha else None
        alpha_plus = self.alpha + cfg.c_alpha * d_alpha if d_alpha is not None else self.alpha
        self._write(self.eps + self.c * d_eps, alpha_plus)
        recorder.update_ema = False
        if self.prefix is not None:
            # features before the adapted layers are not recomputed: they keep pass 1's values
            logits_plus = self.prefix.rerun()
        else:
            recorder.clear()
            logits_plus = self.view.model(x)
        loss_plus = self._loss(logits_plus)
        recorder.update_ema = True

        # One-sided SPSA estimates and the updates.
        diff = loss_plus - loss
        grad_eps = diff / (self.c * d_eps)
        self.eps = self.eps - cfg.lr * (grad_eps + cfg.weight_decay * self.eps)
        if d_alpha is not None:
            self._adamw(diff / (cfg.c_alpha * d_alpha))
        self._write(self.eps, self.alpha)
        return logits

    def _settled(self, loss: float, changed: bool) -> bool:
        """Whether this batch may skip the update (``skip_converged``).

        Settled: the mean pass-1 loss of the last ``converge_window`` batches of this domain is
        within the noise of the window before. While settled, pass 1 still measures the loss on
        every batch: a window mean that leaves the settled level by more than the noise, a
        detected domain change, or ``probe_period`` batches without an update bring the two-pass
        update back.
        """
        cfg = self.config
        w = cfg.converge_window
        if changed:
            self.recent_losses, self.settled_loss = [], None
        self.recent_losses = [*self.recent_losses, loss][-2 * w :]
        current = self.recent_losses[-w:]
        level = sum(current) / len(current)
        if self.settled_loss is not None and not self._within_noise(level, self.settled_loss):
            self.settled_loss = None  # the loss moved: adapt again
            self.recent_losses = self.recent_losses[-1:]
        full = len(self.recent_losses) == 2 * w
        if full and self.settled_loss is None:
            previous = sum(self.recent_losses[:w]) / w
            self.settled_loss = level if self._within_noise(level, previous) else None
        self.since_update += 1
        return self.settled_loss is not None and self.since_update < cfg.probe_period

    def _within_noise(self, mean: float, reference: float) -> bool:
        """Whether a window's mean loss is indistinguishable from ``reference``: closer than
        ``converge_tolerance`` (relative), or than ``converge_z`` standard errors of a difference
        of two window means, the batch-to-batch spread measured on the recent losses. (Different
        images give each batch its own loss: with a relative tolerance alone, that noise keeps a
        settled domain from ever looking settled on a short window.)"""
        cfg = self.config
        losses = self.recent_losses
        spread = statistics.stdev(losses) if len(losses) > 1 else 0.0
        noise = cfg.converge_z * spread * math.sqrt(2 / cfg.converge_window)
        return abs(mean - reference) <= max(cfg.converge_tolerance * abs(reference), noise)

    # --- alpha and its AdamW ---------------------------------------------------------------------
    def _set_alpha(self, alpha: torch.Tensor, moments: list[torch.Tensor] | None = None) -> None:
        """``alpha`` (a new leaf) with a fresh AdamW on it (betas 0.9 / 0.999, decoupled weight
        decay); ``moments``: its first and second moments to go on from (a loaded state). The
        memory grows ``alpha`` by one logit per stored domain, and the moments restart with it."""
        cfg = self.config
        self.alpha = alpha.detach().clone()
        self.alpha_optimizer = torch.optim.AdamW(
            [self.alpha],
            lr=cfg.alpha_lr,
            betas=(0.9, 0.999),
            eps=1e-8,
            weight_decay=cfg.alpha_weight_decay,
            foreach=False,
        )
        if moments is not None:
            m, v = moments
            self.alpha_optimizer.state[self.alpha] = {
                "step": torch.tensor(0.0),
                "exp_avg": m.clone(),
                "exp_avg_sq": v.clone(),
            }

    def _load_alpha_steps(self, steps: int) -> None:
        state = self.alpha_optimizer.state.get(self.alpha)
        if state is not None:
            state["step"] = torch.tensor(float(steps))

    def _alpha_optimizer_state(self) -> dict[str, Any]:
        """The optimizer's moments and step count, as plain tensors and an int (a state file
        stays loadable with ``weights_only``)."""
        state = self.alpha_optimizer.state.get(self.alpha)
        if not state:
            zeros = torch.zeros_like(self.alpha)
            return {"alpha_moments": (zeros, zeros.clone()), "alpha_steps": 0}
        return {
            "alpha_moments": (state["exp_avg"].clone(), state["exp_avg_sq"].clone()),
            "alpha_steps": int(state["step"]),
        }

    def _adamw(self, grad: torch.Tensor) -> None:
        """One AdamW step on alpha with the SPSA estimate ``grad``."""
        self.alpha.grad = grad.to(self.alpha.dtype)
        self.alpha_optimizer.step()
        self.alpha.grad = None

    # --- the domain-change detector and the memory -------------------------------------------
    def _detect(self, batch_size: int) -> bool:
        """Update the detector with pass 1's statistics; True when it saw a domain change."""
        cfg = self.config
        changed = False
        if cfg.detector and self.recorder.detector_stats is not None:
            mean, var = self.recorder.detector_stats
            if self.running_detector is None:
                self.running_detector = (mean.clone(), var.clone())
            else:
                r_mean, r_var = self.running_detector
                changed = symmetric_kl(mean, var, r_mean, r_var) > self.threshold
                if changed:
                    self.running_detector = (mean.clone(), var.clone())
                else:
                    m = cfg.detector_decay
                    self.running_detector = (m * r_mean + (1 - m) * mean, m * r_var + (1 - m) * var)
        elif not cfg.detector:
            changed = self.domain_batches >= cfg.store_period
        if not changed:
            return False
        self.changes.append(self.batches)
        if cfg.memory and self.domain_batches >= cfg.min_domain_batches:
            self._store()
        self.domain_batches = 0
        if cfg.detector and self.recorder.last_feature_mean is not None:
            # The shift's EMA belongs to the old domain: restart it at this batch's mean. (This
            # batch's two passes keep the shift pass 1 applied, so its SPSA difference is sound.)
            self.recorder.feature_ema = self.recorder.last_feature_mean.clone()
        return True

    def _store(self) -> None:
        """Store the current total delta as a domain, make it dominant, let eps absorb the rest.

        The function does not jump: ``mix(alpha') + eps' == mix(alpha) + eps`` by construction.
        Beyond ``memory_size`` domains, the two most cosine-similar are merged into their mean, with
        their mixing weights summed.
        """
        cfg = self.config
        total = self._mix(self.alpha) + self.eps
        if float(total.abs().max()) == 0.0:
            return
        self.memory_deltas = torch.cat([self.memory_deltas, total[None]])
        # Dominant: one unit of logit above the rest is e^temperature times their weight.
        self.alpha = torch.cat([self.alpha, self.alpha.max().reshape(1) + 1.0])
        while self.memory_deltas.shape[0] > cfg.memory_size:
            self._merge_most_similar()
        self._set_alpha(self.alpha)  # the moments restart with the new logit
        self.eps = total - self._mix(self.alpha)

    def _merge_most_similar(self) -> None:
        deltas = self.memory_deltas
        unit = deltas / deltas.norm(dim=1, keepdim=True).clamp_min(1e-12)
        similarity = unit @ unit.T
        similarity.fill_diagonal_(-math.inf)
        flat = int(similarity.argmax())
        i, j = divmod(flat, deltas.shape[0])
        i, j = min(i, j), max(i, j)
        merged = (deltas[i] + deltas[j]) / 2
        s = self.config.temperature
        # alpha indices are shifted by one (alpha[0] is the source).
        a_merged = torch.logsumexp(s * self.alpha[[i + 1, j + 1]], 0) / s
        rows = [deltas[k] for k in range(deltas.shape[0]) if k != j]
        rows[i] = merged  # i < j: removing j leaves i where it was
        self.memory_deltas = torch.stack(rows)
        alpha = self.alpha.clone()
        alpha[i + 1] = a_merged
        self.alpha = torch.cat([alpha[: j + 1], alpha[j + 2 :]])


@hookimpl
def qtta_methods() -> list[MethodInfo]:
    return [
        MethodInfo(
            "zoa",
            "adapt",
            "forward-only: 2 passes (SPSA) on fused norm affines + domain memory",
            config_cls=ZOAConfig,
        )
    ]


@hookimpl
def qtta_adapt(view: QuantView, config: AdaptConfig) -> TestTimeMethod | None:
    if config.method != "zoa":
        return None
    if not isinstance(config, ZOAConfig):
        config = ZOAConfig(seed=config.seed)
    return ZOA(view, config)

"""``cotta``: CoTTA (Wang et al., "Continual Test-Time Domain Adaptation", CVPR 2022).

A student learns from a mean teacher; the teacher predicts. Per batch ``x``:

1. The teacher predicts ``x``. When the source model is unsure of the batch (its mean top-class
   probability is below ``confidence_threshold``: the domain is far from the source), the
   teacher's softmax is averaged over ``n_augmentations`` augmented copies of ``x`` instead
   (:func:`augment`), a steadier pseudo-label where the shift is large. The output is that
   prediction (its log, for an averaged one): CoTTA predicts with the teacher.
2. The student takes one step on the cross-entropy from its own logits on ``x`` to the teacher's
   soft labels.
3. The teacher moves towards the student: ``t <- alpha * t + (1 - alpha) * s`` (``teacher_decay``
   0.999).
4. Stochastic restore: each adapted element of the student goes back to its source value with
   probability ``restore_prob`` (0.01), so knowledge of the source is never lost for good on a
   long stream.

Our choices, where the paper leaves room or our setting differs:

* Which model is the run's. The teacher is the model :func:`qtta_plugins.adapt` returns
  (``run.model``), since it is the one that predicts: what a user exports is what made the
  predictions. The student (and the source copy) are views of deep copies
  (:meth:`~qtta_plugins.view.QuantView.copy`), kept in this method's state.
* What adapts (``params``). The paper updates every parameter. On a quantized model the view
  exposes the norm affines and the float weights and biases of the quantized conv / linear
  layers; ``"all"`` (the default) adapts those, the weights through the fake quantizers'
  straight-through gradient as quantization-aware training does (a weight's quantized value moves
  when its float value crosses a rounding boundary, and restore pulls float values back). The
  quantizers' own scales and zero points stay as calibrated: a scale shared by a whole channel,
  moved by noisy pseudo-labels, would move every weight of the channel at once. ``"norm"``
  adapts only the norm affines, the cheap and stable choice at very low bit-widths.
* Batch norms use test-batch statistics in all three models, as the reference code runs them.
* The confidence gate reads the *source* model, as the paper does (a third copy, one forward
  pass per batch); ``confidence_from="teacher"`` reads the teacher's own un-augmented prediction
  instead and needs no source copy.
* Augmentation averaging averages probabilities (the authors' code averages logits); the
  returned logits are the log of the averaged probabilities, so ``softmax`` of the output is the
  ensemble. ``n_augmentations`` defaults to 4, not 32: each copy is one more teacher pass, and at
  10 classes and 32 px four already smooth the pseudo-labels (raise it on harder data).
* Augmentations (torchvision ``transforms.v2``, one draw per batch as the reference applies
  them): brightness / contrast jitter (and saturation / hue on RGB), gamma, a random affine
  (rotation 15 degrees, translation 1/16, scale 0.9-1.1) on an edge-padded image, a light Gaussian
  blur and noise. No flips: digits and characters are not mirror-symmetric. Images are mapped to
  [0, 1] by the batch's own range first and back after, so normalised inputs work too.
* ABL (``abl=True``, TTAQ's adaptive balanced loss, :mod:`qtta_plugins.methods.abl`): the
  cross-entropy is taken on the adjusted student logits ``z~ = z - tau_f log pi - tau_g log(g /
  mean g)``; ``pi`` follows the stream's predictions (the teacher's outputs), ``g`` the gradient
  on the adjusted logits; both are updated once per batch. ``ABLConfig(tau_f=0, tau_g=0)``
  is CoTTA exactly.

Randomness (restore masks, augmentations) comes from the method's own generator, seeded with
``config.seed`` and kept in its state, so runs repeat and a save / load continues exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import (
    ABL_RENAMES,
    ABLConfig,
    AdaptConfig,
    Renamed,
    check_abl_option,
    check_flags,
    check_int,
    check_optimizer,
    check_unit,
)
from ..hookspecs import hookimpl
from ..view import QuantView
from .abl import BalancedLoss, ExposesBalancedLoss, check_abl_state
from .base import (
    MethodInfo,
    TestTimeMethod,
    check_generator_state,
    check_named_tensors,
    check_state_keys,
    refuse_forward_only,
)

__all__ = ["CoTTA", "CoTTAConfig", "augment", "cotta_parameters", "soft_cross_entropy"]


@dataclass
class CoTTAConfig(AdaptConfig):
    """CoTTA (Wang et al., CVPR 2022): continual test-time adaptation with a mean teacher,
    augmentation-averaged pseudo-labels and stochastic restore (see the module docstring).

    ``params``: ``"all"`` (the paper's choice, as far as the view exposes the model: norm affines
    and the float weights and biases of the quantized conv / linear layers, learnt through the fake
    quantizers' straight-through gradient) or ``"norm"`` (norm affines only). ``optimizer`` /
    ``lr`` / ``momentum`` (SGD only) / ``weight_decay``: the student's optimizer (Adam at 1e-3,
    the reference setting for CIFAR-10-C).

    Parts, each switchable off: ``mean_teacher`` (the teacher is an EMA of the student with weight
    ``teacher_decay`` on its old value; off: the teacher is the student as of the last step),
    ``augment`` (when the mean confidence of the ``confidence_from`` model, ``"source"`` as in the
    paper or ``"teacher"``, on the batch is below ``confidence_threshold``, the pseudo-labels are
    the teacher's softmax averaged over ``n_augmentations`` augmented copies), ``restore``
    (stochastic restore: after each step each adapted element goes back to its source value with
    probability ``restore_prob``). ``n_augmentations`` is 4 by default, not the paper's 32: each
    copy costs one teacher forward pass, and on 10-class 32 px inputs four already average out
    most of the augmentation noise.

    ``abl=True`` (or an :class:`ABLConfig`) adds TTAQ's adaptive balanced loss to the student's
    loss (as in :class:`~qtta_plugins.methods.tent.TentConfig`): the cross-entropy to the teacher's soft labels is taken on
    the adjusted student logits; the prediction is unchanged.
    """

    renamed_options: ClassVar[dict[str, Renamed]] = {
        "ema_alpha": Renamed("teacher_decay", how="the same value: the weight kept"),
        **ABL_RENAMES,
    }
    embedded_options: ClassVar[dict[str, type]] = {"abl": ABLConfig}

    method: str = "cotta"
    params: str = "all"
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    mean_teacher: bool = True
    teacher_decay: float = 0.999
    augment: bool = True
    n_augmentations: int = 4
    confidence_threshold: float = 0.92
    confidence_from: str = "source"
    restore: bool = True
    restore_prob: float = 0.01
    #: ABL: an ABLConfig, True (its defaults), a dict of its fields, or None / False (off)
    abl: ABLConfig | bool | dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.params not in ("all", "norm"):
            raise ValueError(f"CoTTAConfig.params must be 'all' or 'norm', got {self.params!r}")
        check_optimizer(self)
        check_flags(self, "mean_teacher", "augment", "restore")
        check_unit(self, "teacher_decay", low_open=False, high_open=True)
        check_int(self, "n_augmentations", 1)
        check_unit(self, "confidence_threshold", low_open=False, high_open=False)
        if self.confidence_from not in ("source", "teacher"):
            raise ValueError(
                "CoTTAConfig.confidence_from must be 'source' or 'teacher', got "
                f"{self.confidence_from!r}"
            )
        check_unit(self, "restore_prob", low_open=False, high_open=False)
        check_abl_option(self)


# --- parts shared with rotta ---------------------------------------------------------------------
def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy from ``logits`` to the probability rows ``target``."""
    return -(target * logits.log_softmax(1)).sum(1)


def _import_v2() -> Any:
    from ..models.zoo import import_torchvision

    import_torchvision()  # raises naming the 'vision' extra when torchvision is missing
    from torchvision.transforms import v2

    return v2


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random augmentation of the batch ``x`` (``(N, C, H, W)``), the same draw for every
    image of the batch, from ``generator`` (the process's random state is left alone).

    CoTTA's augmentation family at small-image scale: brightness 0.6-1.4, contrast 0.7-1.3 (and
    saturation 0.5-1.5, hue +-0.06 on 3-channel images), gamma 0.7-1.3, a random affine (15
    degrees, translation 1/16, scale 0.9-1.1, bilinear) on an edge-padded copy cropped back, a
    Gaussian blur (kernel 5, sigma 0.001-0.5) and Gaussian noise (std 0.005). ``x`` is mapped to
    [0, 1] by its own minimum and maximum, augmented, and mapped back.
    """
    if x.ndim != 4:
        raise ValueError(
            f"augmentations need image batches (N, C, H, W), got shape {tuple(x.shape)}"
        )
    v2 = _import_v2()
    lo, hi = x.amin(), x.amax()
    span = hi - lo
    if span <= 0:
        return x.clone()
    u = (x - lo) / span
    c, h, w = x.shape[1:]
    steps: list[Any] = [
        v2.ColorJitter(
            brightness=(0.6, 1.4),
            contrast=(0.7, 1.3),
            saturation=(0.5, 1.5) if c == 3 else None,
            hue=(-0.06, 0.06) if c == 3 else None,
        ),
        v2.Pad([w // 2, h // 2], padding_mode="edge"),
        v2.RandomAffine(
            degrees=15,
            translate=(1 / 16, 1 / 16),
            scale=(0.9, 1.1),
            interpolation=v2.InterpolationMode.BILINEAR,
        ),
        v2.CenterCrop((h, w)),
    ]
    if min(h, w) >= 5:
        steps.append(v2.GaussianBlur(5, sigma=(0.001, 0.5)))
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    gamma = 0.7 + 0.6 * float(torch.rand((), generator=generator))
    noise = torch.randn(u.shape, generator=generator).to(u.device, u.dtype) * 0.005
    with torch.random.fork_rng(devices=[]):
        # torchvision draws its parameters from the default CPU generator: seeded from ours,
        # inside a fork, so the process's random state is as before
        torch.random.default_generator.manual_seed(seed)
        u = v2.Compose(steps)(u.clamp(0, 1) ** gamma)
    u = (u + noise).clamp(0, 1)
    return u * span + lo


def cotta_parameters(view: QuantView, which: str) -> list[nn.Parameter]:
    """What CoTTA adapts on ``view``: ``"norm"``, the norm affines; ``"all"``, those and the float
    weights and biases of the quantized conv / linear layers (each parameter once)."""
    found: dict[int, nn.Parameter] = {}
    for p in view.norm_parameters():
        found.setdefault(id(p), p)
    if which == "all":
        for layer in view.layers():
            for t in (layer.weight, view.layer_bias(layer)):
                if isinstance(t, nn.Parameter) and t.numel() and t.is_floating_point():
                    found.setdefault(id(t), t)
    return list(found.values())


def tensor_names(model: nn.Module) -> dict[int, str]:
    """Each parameter's and buffer's name in ``model`` (``state_dict`` names), by identity."""
    names = {id(t): n for n, t in model.named_buffers()}
    names.update({id(p): n for n, p in model.named_parameters()})
    return names


def paired(
    tensors: Sequence[torch.Tensor], model: nn.Module, copy: nn.Module, what: str
) -> tuple[list[str], list[torch.Tensor]]:
    """The names of ``tensors`` in ``model`` and the same-named tensors of its deep ``copy``."""
    names = tensor_names(model)
    in_copy = dict(copy.named_parameters())
    in_copy.update(dict(copy.named_buffers()))
    keys, found = [], []
    for t in tensors:
        name = names.get(id(t))
        if name is None or name not in in_copy or in_copy[name].shape != t.shape:
            raise ValueError(
                f"{what}: a tensor of shape {tuple(t.shape)} is not a named parameter or buffer "
                "of the model, so its copy cannot be found"
            )
        keys.append(name)
        found.append(in_copy[name])
    return keys, found


def make_optimizer(params: list[nn.Parameter], config: Any) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(
            params, lr=config.lr, betas=(0.9, 0.999), weight_decay=config.weight_decay
        )
    return torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )


@torch.no_grad()
def ema_update(
    teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], keep: float
) -> None:
    """``t <- keep * t + (1 - keep) * s`` for each pair (``keep = 0``: the teacher is the student)."""
    for t, s in zip(teacher, student, strict=True):
        t.mul_(keep).add_(s.detach().to(t.dtype), alpha=1 - keep)


# --- CoTTA --------------------------------------------------------------------------------------
class CoTTA(ExposesBalancedLoss, TestTimeMethod):
    """CoTTA on a view: the view's model is the teacher, :attr:`student` a view of its copy.

    State (:meth:`state_dict`): the student's adapted tensors, its optimizer, the random
    generator and ABL's statistics; the teacher's tensors are the run's model, which the core
    snapshots. :attr:`augmented` tells whether the last batch took augmentation averaging.
    """

    needs_backward = True

    def __init__(self, view: QuantView, config: CoTTAConfig) -> None:
        super().__init__(view, config)
        refuse_forward_only(view, "cotta")
        self.params = cotta_parameters(view, config.params)
        if not self.params:
            raise ValueError(
                f"method 'cotta' found nothing to adapt in this {view.backend} model "
                f"(params={config.params!r}: no norm affine parameters"
                + (" and no float layer weights" if config.params == "all" else "")
                + ")"
            )
        if config.augment:
            _import_v2()  # fail now, not at the first unsure batch, when torchvision is missing
        view.set_norm_mode("batch")
        view.freeze()
        self.student = view.copy()
        self.names, self.student_params = paired(
            self.params, view.model, self.student.model, "cotta"
        )
        for p in self.student_params:
            p.requires_grad_(True)
        self.source = [p.detach().clone() for p in self.params]
        needs_source = config.augment and config.confidence_from == "source"
        self.anchor = view.copy() if needs_source else None
        self.optimizer = make_optimizer(self.student_params, config)  # type: ignore[arg-type]
        self.generator = torch.Generator().manual_seed(config.seed)
        self.abl = BalancedLoss.from_config(config.abl)
        self.augmented = False

    # --- one batch -------------------------------------------------------------------------------
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        output, target = self._pseudo_labels(x)
        with torch.enable_grad():
            logits = self.student.model(x)
            if self.abl is not None:
                adjusted, grads = self.abl.adjust(logits)
                loss = soft_cross_entropy(adjusted, target).mean()
            else:
                loss = soft_cross_entropy(logits, target).mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.abl is not None:
            self.abl.update(output, grads[0] if grads else None)
        if any(not torch.isfinite(p).all() for p in self.student_params):
            raise FloatingPointError("the CoTTA student became non-finite on this batch")
        ema_update(self.params, self.student_params, c.teacher_decay if c.mean_teacher else 0.0)
        if c.restore:
            self.stochastic_restore(c.restore_prob)
        return output

    @torch.no_grad()
    def _pseudo_labels(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The output (the teacher's logits, or the log of its augmentation-averaged
        probabilities) and the soft labels the student learns."""
        c = self.config
        teacher = self.view.model(x)
        self.augmented = False
        if c.augment:
            gate = teacher if self.anchor is None else self.anchor.model(x)
            confidence = float(gate.softmax(1).amax(1).mean())
            if confidence < c.confidence_threshold:
                probs = torch.zeros_like(teacher, dtype=torch.float32)
                for _ in range(c.n_augmentations):
                    probs += self.view.model(augment(x, self.generator)).float().softmax(1)
                probs /= c.n_augmentations
                self.augmented = True
                tiny = torch.finfo(torch.float32).tiny
                return probs.clamp_min(tiny).log().to(teacher.dtype), probs.to(teacher.dtype)
        return teacher, teacher.softmax(1)

    @torch.no_grad()
    def stochastic_restore(self, prob: float) -> None:
        """Put each adapted element of the student back to its source value with probability
        ``prob``, independently (masks from the method's generator)."""
        for p, source in zip(self.student_params, self.source, strict=True):
            mask = torch.rand(p.shape, generator=self.generator).to(p.device) < prob
            p.copy_(torch.where(mask, source.to(p.dtype), p))

    # --- state -----------------------------------------------------------------------------------
    def adapted_parameters(self) -> list[nn.Parameter]:
        """The teacher's (the run's model's) tensors this method changes."""
        return self.params

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "optimizer": self.optimizer.state_dict(),
            "student": {
                n: p.detach() for n, p in zip(self.names, self.student_params, strict=True)
            },
            "generator": self.generator.get_state(),
        }
        if self.abl is not None:
            state["abl"] = self.abl.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # everything is checked before anything is loaded: a bad state changes nothing
        check_state_keys(state, ("optimizer", "student", "generator"), "CoTTA")
        check_abl_state(state, self.abl, "CoTTA")
        check_named_tensors(state["student"], self.names, self.student_params, "CoTTA state")
        check_generator_state(state["generator"], self.generator)
        self.optimizer.load_state_dict(state["optimizer"])
        with torch.no_grad():
            for name, p in zip(self.names, self.student_params, strict=True):
                p.copy_(state["student"][name])
        self.generator.set_state(state["generator"].clone())
        if self.abl is not None:
            self.abl.load_state_dict(state["abl"])

    def reset(self) -> None:
        self.optimizer.state.clear()
        with torch.no_grad():
            for p, source in zip(self.student_params, self.source, strict=True):
                p.copy_(source)
        self.generator.manual_seed(self.config.seed)
        if self.abl is not None:
            self.abl.reset()
        self.augmented = False


@hookimpl
def qtta_methods() -> list[MethodInfo]:
    return [
        MethodInfo(
            "cotta",
            "adapt",
            "CoTTA: mean teacher, augmentation-averaged pseudo-labels, stochastic restore",
            True,
            CoTTAConfig,
        )
    ]


@hookimpl
def qtta_adapt(view: QuantView, config: AdaptConfig) -> TestTimeMethod | None:
    if config.method != "cotta":
        return None
    if not isinstance(config, CoTTAConfig):
        config = CoTTAConfig(seed=config.seed)
    return CoTTA(view, config)

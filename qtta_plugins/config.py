"""Configuration objects: one dataclass per choice, validated when it is built.

``quantize(model, QuantConfig(backend="torchao", weight_bits=4, act_bits=4))`` and
``adapt(model, stream, TentConfig(lr=1e-3))`` read the same way torchao's ``quantize_`` does. Method
plugins subclass :class:`AdaptConfig` (or :class:`ReconstructConfig`) for their own options.

Over 500 lines: one dataclass per choice, each with the provenance of its defaults in its docstring (the core's ``QuantConfig`` / ``ReconstructConfig`` / ``AdaptConfig`` and the seven baselines' configs; the three papers' configs live with their methods).
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

# --------------------------------------------------------------------------------------------
# One name per idea (issue 36). The option names every config here, and every method plugin's,
# follows:
#
# * ``momentum`` is the optimizer's (SGD's) and nothing else.
# * An exponential moving average's weight is the weight KEPT on the old value, and its option
#   ends in ``_decay``: ``ema <- decay * ema + (1 - decay) * new``. ``decay`` is what
#   ``torch.optim.swa_utils.get_ema_multi_avg_fn(decay)`` and timm's ``ModelEmaV2(decay=...)``
#   call that weight, and it reads the right way round (a larger decay forgets more slowly),
#   where "momentum" means the kept weight in SGD and the *updated* one in torch's BatchNorm.
#   So: ``teacher_decay`` (CoTTA's and RoTTA's mean teacher), ``rbn_decay`` (RoTTA's robust
#   batch norm), ``probs_decay`` (EATA), ``loss_decay`` (SAR), ``shift_decay`` and
#   ``detector_decay`` (ZOA, FOA), ``ABLConfig.decay``.
# * ``steps``: optimizer steps per test batch (Tent); ``train_steps``: training steps in total
#   (RTF-Q's bank); ``iters``: reconstruction iterations per block (TTAQ, BRECQ, QDrop).
#
# The names before that rename are still accepted where a config is built (the constructor, so
# also ``adapt(..., **options)`` and the harness's method rows): :class:`OptionsMeta` converts
# each once, value included where the old one was the fraction updated (RoTTA's ``ema_nu``,
# ``rbn_momentum``), and warns with a DeprecationWarning naming the new option.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Renamed:
    """An option's name before a rename: ``new`` is its name now (``"abl.tau_f"``: the field
    ``tau_f`` of the embedded config ``abl``), ``convert`` maps an old value to the new one
    (``None``: the same value), ``how`` says what the conversion is, for the warning."""

    new: str
    convert: Callable[[Any], Any] | None = None
    how: str = ""


def _kept_from_updated(value: Any) -> Any:
    """An EMA's updated fraction -> the fraction kept (anything but a number passes through, for
    the new field's check to name)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    return 1 - value


#: the conversion for an old option that held the fraction an EMA *updates*
UPDATED_TO_KEPT = _kept_from_updated


def upgrade_options(cls: type, options: dict[str, Any], *, warn: bool = True) -> dict[str, Any]:
    """``options`` for ``cls(**options)`` with the old names ``cls.renamed_options`` lists turned
    into the new ones (values converted), each with a DeprecationWarning naming the new option
    (``warn=False``: silently, for a stored record). Old and new name together raise
    ``TypeError``. An embedded option (``"abl.tau_f"``) is folded into the value of its field
    (see :func:`_fold_embedded`)."""
    renames: dict[str, Renamed] = getattr(cls, "renamed_options", {})
    if not renames or not any(name in options for name in renames):
        return options
    out = dict(options)
    embedded: dict[str, dict[str, Any]] = {}
    for old, rule in renames.items():
        if old not in out:
            continue
        value = out.pop(old)
        top, _, sub = rule.new.partition(".")
        given = options.get(top)
        if (not sub and rule.new in options) or (sub and isinstance(given, dict) and sub in given):
            raise TypeError(
                f"{cls.__name__} got both {old!r} and its new name {rule.new!r}: pass only "
                f"{rule.new!r}"
            )
        new_value = rule.convert(value) if rule.convert is not None else value
        if warn:
            how = f" ({rule.how})" if rule.how else ""
            spelled = f"{top}={{{sub!r}: {new_value!r}}}" if sub else f"{rule.new}={new_value!r}"
            warnings.warn(
                f"{cls.__name__}: option {old!r} was renamed {rule.new!r}{how}; pass {spelled}",
                DeprecationWarning,
                stacklevel=3,
            )
        if sub:
            embedded.setdefault(top, {})[sub] = new_value
        else:
            out[rule.new] = new_value
    for top, values in embedded.items():
        out[top] = _fold_embedded(cls, top, out.get(top, _field_default(cls, top)), values)
    return out


def _field_default(cls: type, name: str) -> Any:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default
    return None


def _fold_embedded(cls: type, field: str, base: Any, values: dict[str, Any]) -> Any:
    """The value of the embedded config ``field`` once the old flat options ``values`` are in it.

    ``base`` is what was passed for it (or its default). Switched on (``True``, a dict or a config
    object): the values join it. Off (``False`` / ``None``): it stays off, as the flat options
    did nothing without the switch before the rename; they are still checked."""
    embedded_type = cls.embedded_options[field]  # type: ignore[attr-defined]
    if isinstance(base, embedded_type):
        return dataclasses.replace(base, **values)
    if isinstance(base, dict):
        return {**base, **values}
    embedded_type(**values)  # the values are checked (and name the new field) even when off
    return dict(values) if base is True else base


class OptionsMeta(type):
    """The metaclass of the option dataclasses (:class:`AdaptConfig`, :class:`ReconstructConfig`,
    ``RTFQConfig``): a keyword argument whose name the class lists in ``renamed_options`` is
    converted by :func:`upgrade_options` before the dataclass's own ``__init__`` sees it, so every
    subclass, a plugin's included, accepts its old names the same way."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return super().__call__(*args, **upgrade_options(cls, kwargs))


_BITS_RE = re.compile(r"^w(\d+)a(\d+)$", re.IGNORECASE)


def parse_bits(bits: str | int | tuple[int, int]) -> tuple[int, int]:
    """``"w4a4"`` / ``4`` / ``(4, 8)`` -> ``(weight_bits, act_bits)``."""
    if isinstance(bits, bool):
        raise TypeError(f"bits must be 'wXaY', an int or a (w, a) pair, not {bits!r}")
    if isinstance(bits, int):
        return bits, bits
    if isinstance(bits, str):
        match = _BITS_RE.match(bits.strip())
        if not match:
            raise ValueError(f"bits {bits!r} is not of the form 'w<N>a<M>' (for example 'w4a4')")
        return int(match.group(1)), int(match.group(2))
    if isinstance(bits, tuple | list) and len(bits) == 2:
        return int(bits[0]), int(bits[1])
    raise TypeError(f"bits must be 'wXaY', an int or a (w, a) pair, not {bits!r}")


@dataclass
class QuantConfig:
    """How to quantize a float model.

    Weights are quantized per output channel, symmetric; activations per tensor, affine (pt2e route)
    or per token, dynamic (torchao's Linear-only QAT route, which has no static per-tensor mode).

    ``first_last_bits``: bit-width kept for the first layer's input and weights and the last layer,
    as the low-bit PTQ literature does (BRECQ, QDrop, TTAQ all keep them at 8 bit). ``None`` quantizes
    them like every other layer.

    ``keep_calibration_sample``: keep up to 512 calibration images on the returned model (outside
    its state dict; they travel with every copy of it). Off by default: the model keeps only the
    statistics measured on them that the methods need (:class:`~qtta_plugins.view.SourceStatistics`:
    per-layer feature means and deviations, adapter measurements). Turn it on for a model you will
    convert or change before adapting it with ``zoa`` / ``foa`` (statistics describe only the model
    they were measured on), or pass those methods ``source_data=`` instead.
    """

    backend: str = "torchao"
    weight_bits: int = 8
    act_bits: int = 8
    first_last_bits: int | None = 8
    calib_batches: int = 8
    keep_calibration_sample: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.backend, str) or not self.backend:
            raise ValueError("QuantConfig.backend must be a non-empty backend name, e.g. 'torchao'")
        for field in ("weight_bits", "act_bits"):
            value = getattr(self, field)
            if not isinstance(value, int) or not 2 <= value <= 8:
                raise ValueError(f"QuantConfig.{field} must be an int in 2..8, got {value!r}")
        if self.first_last_bits is not None and not 2 <= self.first_last_bits <= 8:
            raise ValueError(
                f"QuantConfig.first_last_bits must be 2..8 or None, got {self.first_last_bits!r}"
            )
        if self.calib_batches < 1:
            raise ValueError(f"QuantConfig.calib_batches must be >= 1, got {self.calib_batches}")
        if not isinstance(self.keep_calibration_sample, bool):
            raise ValueError(
                "QuantConfig.keep_calibration_sample must be True or False, got "
                f"{self.keep_calibration_sample!r}"
            )

    @property
    def tag(self) -> str:
        return f"W{self.weight_bits}A{self.act_bits}"


@dataclass
class ABLConfig:
    """TTAQ's adaptive balanced loss (ABL, Xiao et al. 2024; our formulation in
    :mod:`qtta_plugins.methods.abl` and ``docs/abl.md``), for the methods that offer it (Tent,
    EATA, CoTTA: their config's ``abl``).

    The loss is taken on the logits ``z~_c = z_c - tau_f * log(pi_c) - tau_g * log(g_c / mean g)``,
    ``pi`` an EMA of the predicted class frequencies and ``g`` an EMA of each class's share of the
    loss gradient on the logits, both with weight ``decay`` on the old value. ``tau_f = 1`` is
    Menon et al.'s Bayes-consistent logit-adjustment weight; ``tau_g`` is smaller because ``g``
    is a noisier signal that largely tracks ``pi``, so a full weight would count the same
    imbalance twice. 0 turns a term off.

    A method config takes it as ``abl=ABLConfig(...)``, ``abl=True`` (these defaults), a dict of
    these fields (``abl={"tau_f": 0.5}``, as a harness config writes it), or ``False`` / ``None``
    (off). The flat names before issue 36 (``abl_tau_f``, ``abl_tau_g``, ``abl_momentum``) are
    still accepted, with a DeprecationWarning.
    """

    tau_f: float = 1.0
    tau_g: float = 0.25
    decay: float = 0.9

    def __post_init__(self) -> None:
        for field in ("tau_f", "tau_g"):
            value = getattr(self, field)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (math.isfinite(value) and value >= 0)
            ):
                raise ValueError(
                    f"ABLConfig.{field} must be a finite number >= 0 (0 turns that term off), "
                    f"got {value!r}"
                )
        decay = self.decay
        if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 <= decay < 1:
            raise ValueError(
                f"ABLConfig.decay must be in [0, 1) (the weight of the old statistics in the "
                f"EMA), got {decay!r}"
            )


#: the flat ABL options before issue 36, in the configs that offer ABL
_ABL_RENAMES = {
    "abl_tau_f": Renamed("abl.tau_f"),
    "abl_tau_g": Renamed("abl.tau_g"),
    "abl_momentum": Renamed("abl.decay", how="the same value: the weight kept"),
}


def check_abl_option(config: Any) -> None:
    """Turn ``config.abl`` into an :class:`ABLConfig` or ``None`` (ABL off): ``True`` is the
    defaults, a dict its fields; raise ``ValueError`` naming the option otherwise."""
    name = type(config).__name__
    value = config.abl
    if value is None or value is False:
        config.abl = None
    elif value is True:
        config.abl = ABLConfig()
    elif isinstance(value, dict):
        unknown = sorted(set(value) - {f.name for f in dataclasses.fields(ABLConfig)})
        if unknown:
            raise ValueError(
                f"{name}.abl: {unknown[0]!r} is not a field of ABLConfig (tau_f, tau_g, decay)"
            )
        try:
            config.abl = ABLConfig(**value)
        except ValueError as err:
            raise ValueError(f"{name}.abl: {err}") from None
    elif not isinstance(value, ABLConfig):
        raise ValueError(
            f"{name}.abl must be an ABLConfig, True (its defaults), a dict of its fields, or "
            f"False / None (off), got {value!r}"
        )


@dataclass
class AdaptConfig(metaclass=OptionsMeta):
    """Base of every test-time adaptation method's configuration.

    ``method`` names the method plugin; ``seed`` makes the run deterministic: methods draw from
    their own generators seeded with it (the process's global RNGs are left alone). A method plugin that is
    handed a bare ``AdaptConfig`` (the user passed only a name) builds its own defaults from it.

    ``renamed_options``: a subclass's option names from before a rename (old name ->
    :class:`Renamed`), still accepted when the config is built (see :class:`OptionsMeta`);
    ``embedded_options``: its fields that hold a config of their own (``abl``: :class:`ABLConfig`).
    """

    renamed_options: ClassVar[dict[str, Renamed]] = {}
    embedded_options: ClassVar[dict[str, type]] = {}

    method: str = "tent"
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise ValueError("AdaptConfig.method must be a non-empty method name")


@dataclass
class SourceConfig(AdaptConfig):
    """No adaptation: the quantized model as it is, norms on their source (running) statistics."""

    method: str = "source"


@dataclass
class NormConfig(AdaptConfig):
    """BN-adapt (Schneider et al. 2020): batch norms use the test batch's statistics; nothing is learned."""

    method: str = "norm"


#: The SGD learning rate of the gradient methods that adapt norm affines (Tent, EATA, SAR) when
#: their config's ``lr`` is None, by the kind of norm they adapt: batch norms' where the model has
#: any, else layer / group norms' (chosen for Tent: 1e-2 on the digits-C dev stream, 1e-3 on
#: held-out seeds of the ViT's stream, docs/zoa.md; EATA and SAR take the same SGD step on the same
#: parameters with entropy losses, and 1e-2 lost to source on the LayerNorm ViT)
DEFAULT_LR = {"batch": 1e-2, "layer": 1e-3}
TENT_DEFAULT_LR = DEFAULT_LR  # the name before EATA and SAR shared it


@dataclass
class TentConfig(AdaptConfig):
    """Tent (Wang et al., ICLR 2021): entropy minimisation on the norm layers' affine parameters.

    Batch norms use test-batch statistics. ``lr`` and ``momentum`` are for SGD, as in the reference
    implementation; ``steps`` gradient steps per batch; the prediction is the pre-update output.
    ``lr=None`` (the default) picks by what Tent adapts: 1e-2 for batch norms (chosen on the
    digits-C dev stream), 1e-3 for a model with layer / group norms only (chosen on held-out seeds
    of the ViT's stream; ``docs/zoa.md``); :data:`DEFAULT_LR` holds both (EATA and SAR share it).

    ``abl=True`` (or an :class:`ABLConfig`) adds TTAQ's adaptive balanced loss (ABL, Xiao et al.
    2024; our formulation, see :mod:`qtta_plugins.methods.tent` and ``docs/abl.md``): the entropy
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

    renamed_options: ClassVar[dict[str, Renamed]] = _ABL_RENAMES
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
        _check_lr(self)
        if not 0 <= self.momentum < 1:
            raise ValueError(f"TentConfig.momentum must be in [0, 1), got {self.momentum!r}")
        if self.steps < 1:
            raise ValueError(f"TentConfig.steps must be >= 1, got {self.steps!r}")
        check_abl_option(self)


def _check_lr(config: object) -> None:
    """``lr``: a positive finite number, or None for :data:`DEFAULT_LR` by the model's norms."""
    lr = config.lr  # type: ignore[attr-defined]
    if lr is not None and (
        isinstance(lr, bool)
        or not isinstance(lr, int | float)
        or not (math.isfinite(lr) and lr > 0)
    ):
        raise ValueError(
            f"{type(config).__name__}.lr must be a positive finite number or None (the default "
            f"for the model's norms), got {lr!r}"
        )


def _check_positive(config: object, *fields: str) -> None:
    name = type(config).__name__
    for field in fields:
        value = getattr(config, field)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not (math.isfinite(value) and value > 0)
        ):
            raise ValueError(f"{name}.{field} must be a positive finite number, got {value!r}")


@dataclass
class EATAConfig(AdaptConfig):
    """EATA (Niu et al., ICML 2022, "Efficient Test-Time Model Adaptation without Forgetting"):
    Tent's entropy minimisation on the norm affine parameters, on selected samples, re-weighted,
    with a Fisher-weighted pull back to the source parameters (see :mod:`qtta_plugins.methods.eata`).

    Every part switches off for ablations: ``reliable_filter`` (keep samples whose entropy is below
    ``E0 = e_margin * ln K``), ``redundancy_filter`` (drop samples whose softmax has cosine
    similarity ``>= d_margin`` with an EMA of the selected samples' mean softmax), ``reweight``
    (weight ``exp(E0 - E)`` per sample), ``fisher`` (the anti-forgetting term
    ``fisher_alpha * sum_i F_i (theta_i - theta0_i)^2``).

    Defaults and where they come from:

    * ``lr``, ``momentum``: SGD as EATA uses, at Tent's defaults (``lr=None``: by the model's norm
      family, :data:`DEFAULT_LR`: 1e-2 with batch norms, 1e-3 with layer norms only; momentum 0.9),
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
    loss, as Tent does (:class:`TentConfig`): the selected samples' entropies are taken on the
    adjusted logits; selection, weights and the prediction use the raw logits.
    """

    renamed_options: ClassVar[dict[str, Renamed]] = {
        "probs_momentum": Renamed("probs_decay", how="the same value: the weight kept"),
        **_ABL_RENAMES,
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
        _check_lr(self)
        _check_positive(self, "e_margin", "d_margin", "fisher_alpha")
        _check_unit(self, "momentum", low_open=False, high_open=True)
        _check_unit(self, "probs_decay", low_open=False, high_open=True)
        _check_nonnegative(self, "weight_decay")
        _check_flags(self, "reliable_filter", "redundancy_filter", "reweight")
        if self.fisher is not None and not isinstance(self.fisher, bool):
            raise ValueError(
                f"EATAConfig.fisher must be None (on when source images are at hand), True or "
                f"False, got {self.fisher!r}"
            )
        _check_int(self, "source_batch_size", 1)
        check_abl_option(self)


@dataclass
class SARConfig(AdaptConfig):
    """SAR (Niu et al., ICLR 2023, "Towards Stable Test-Time Adaptation in Dynamic Wild World"):
    reliable, sharpness-aware entropy minimisation on the norm affine parameters, with a model
    recovery reset (see :mod:`qtta_plugins.methods.sar`).

    Every part switches off for ablations: ``reliable_filter`` (keep samples whose entropy is below
    ``E0 = e_margin * ln K``, in both passes), ``sam`` (the sharpness-aware step; off, one plain
    SGD step on the reliable entropy), ``recovery`` (reset the parameters and the optimizer to
    their initial state when the EMA of the second pass's loss falls below ``reset_constant``).

    Defaults and where they come from:

    * ``lr``, ``momentum``: SGD as SAR uses, at Tent's defaults (``lr=None``: by the model's norm
      family, :data:`DEFAULT_LR`: 1e-2 with batch norms, 1e-3 with layer norms only; momentum 0.9),
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
        _check_lr(self)
        _check_positive(self, "e_margin", "rho", "reset_constant")
        _check_unit(self, "momentum", low_open=False, high_open=True)
        _check_unit(self, "loss_decay", low_open=False, high_open=True)
        _check_nonnegative(self, "weight_decay")
        _check_flags(self, "reliable_filter", "sam", "recovery")


@dataclass
class ReconstructConfig(metaclass=OptionsMeta):
    """Base of every PTQ reconstruction method's configuration (``brecq``, ``qdrop``, ``ttaq``...).

    ``seed``: methods draw from their own generators seeded with it (the process's global RNGs
    are left alone)."""

    renamed_options: ClassVar[dict[str, Renamed]] = {}

    method: str = "ttaq"
    seed: int = 0


def _check_nonnegative(config: object, *fields: str) -> None:
    for field in fields:
        value = getattr(config, field)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not (math.isfinite(value) and value >= 0)
        ):
            raise ValueError(
                f"{type(config).__name__}.{field} must be a finite number >= 0, got {value!r}"
            )


def _check_unit(config: object, field: str, *, low_open: bool, high_open: bool) -> None:
    """``config.field`` must be a number in the unit interval, ends open as asked."""
    value = getattr(config, field)
    ok = (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and (value > 0 if low_open else value >= 0)
        and (value < 1 if high_open else value <= 1)
    )
    if not ok:
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ValueError(f"{type(config).__name__}.{field} must be in {interval}, got {value!r}")


def _check_int(config: object, field: str, minimum: int) -> None:
    value = getattr(config, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"{type(config).__name__}.{field} must be an int >= {minimum}, got {value!r}"
        )


def _check_flags(config: object, *fields: str) -> None:
    for field in fields:
        value = getattr(config, field)
        if not isinstance(value, bool):
            raise ValueError(
                f"{type(config).__name__}.{field} must be True or False, got {value!r}"
            )


def _check_optimizer(config: object) -> None:
    """``optimizer`` ('adam' / 'sgd'), ``lr`` > 0, ``momentum`` in [0, 1), ``weight_decay`` >= 0."""
    name = type(config).__name__
    if config.optimizer not in ("adam", "sgd"):  # type: ignore[attr-defined]
        raise ValueError(f"{name}.optimizer must be 'adam' or 'sgd', got {config.optimizer!r}")  # type: ignore[attr-defined]
    _check_positive(config, "lr")
    _check_unit(config, "momentum", low_open=False, high_open=True)
    _check_nonnegative(config, "weight_decay")


@dataclass
class CoTTAConfig(AdaptConfig):
    """CoTTA (Wang et al., CVPR 2022): continual test-time adaptation with a mean teacher,
    augmentation-averaged pseudo-labels and stochastic restore (:mod:`qtta_plugins.methods.cotta`).

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
    loss (as in :class:`TentConfig`): the cross-entropy to the teacher's soft labels is taken on
    the adjusted student logits; the prediction is unchanged.
    """

    renamed_options: ClassVar[dict[str, Renamed]] = {
        "ema_alpha": Renamed("teacher_decay", how="the same value: the weight kept"),
        **_ABL_RENAMES,
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
        _check_optimizer(self)
        _check_flags(self, "mean_teacher", "augment", "restore")
        _check_unit(self, "teacher_decay", low_open=False, high_open=True)
        _check_int(self, "n_augmentations", 1)
        _check_unit(self, "confidence_threshold", low_open=False, high_open=False)
        if self.confidence_from not in ("source", "teacher"):
            raise ValueError(
                "CoTTAConfig.confidence_from must be 'source' or 'teacher', got "
                f"{self.confidence_from!r}"
            )
        _check_unit(self, "restore_prob", low_open=False, high_open=False)
        check_abl_option(self)


@dataclass
class RoTTAConfig(AdaptConfig):
    """RoTTA (Yuan et al., CVPR 2023): robust test-time adaptation in dynamic scenarios
    (:mod:`qtta_plugins.methods.rotta`).

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
    here writes an EMA (the weight kept). The old options ``rbn_momentum`` / ``ema_nu`` held the
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
        _check_optimizer(self)
        _check_flags(self, "rbn", "balanced_memory", "mean_teacher", "timeliness", "strong_augment")
        _check_unit(self, "rbn_decay", low_open=False, high_open=True)
        _check_int(self, "memory_capacity", 1)
        _check_int(self, "update_frequency", 1)
        _check_unit(self, "teacher_decay", low_open=False, high_open=False)
        _check_nonnegative(self, "lambda_t", "lambda_u")

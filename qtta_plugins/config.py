"""The core's configuration: one dataclass per choice, validated when it is built.

Here: :class:`QuantConfig` (``quantize``), the bases :class:`AdaptConfig` and
:class:`ReconstructConfig` that every method's config subclasses, :class:`ABLConfig` (embedded by
the methods that offer ABL), the option-rename machinery (:class:`Renamed`, :class:`OptionsMeta`,
:func:`upgrade_options`), :data:`DEFAULT_LR` and the option checks the method configs share. Each
method's own config lives in its module (``TentConfig`` in :mod:`qtta_plugins.methods.tent`,
``ZOAConfig`` in :mod:`qtta_plugins.methods.zoa`...); the baselines' configs, once defined here,
still resolve from this module.
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
# One name per idea (issue 36). The option names every config follows, the core's here and each
# method plugin's in its module:
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


#: the choices of :attr:`QuantConfig.act_ranges`
ACT_RANGE_CHOICES: tuple[str, ...] = ("search", "percentile", "min-max", "least-error")


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

    ``act_ranges``: the ranges of the activation quantizers below 8 bit. ``"search"`` (the
    default): each backend's shared percentile rule, then, per quantizer, the range among
    percentile, min-max and least error with which the model's output on the calibration batches
    is closest to the float model's (:func:`qtta_plugins.ranges.search_activation_ranges`: on
    those batches never worse than any one rule applied everywhere; it forwards the first 256
    calibration images about twice per quantizer). ``"percentile"``: the shared percentile rule
    alone (99.999th percentile per batch, averaged), as before the search; ``"min-max"`` /
    ``"least-error"``: that rule on every quantizer (the full range seen, or the fraction of it
    with the least squared quantization error).
    """

    backend: str = "torchao"
    weight_bits: int = 8
    act_bits: int = 8
    first_last_bits: int | None = 8
    calib_batches: int = 8
    keep_calibration_sample: bool = False
    act_ranges: str = "search"

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
        if self.act_ranges not in ACT_RANGE_CHOICES:
            raise ValueError(
                f"QuantConfig.act_ranges must be one of {', '.join(map(repr, ACT_RANGE_CHOICES))}, "
                f"got {self.act_ranges!r}"
            )
        if not isinstance(self.keep_calibration_sample, bool):
            raise ValueError(
                "QuantConfig.keep_calibration_sample must be True or False, got "
                f"{self.keep_calibration_sample!r}"
            )

    @property
    def tag(self) -> str:
        return f"W{self.weight_bits}A{self.act_bits}"

    @property
    def applies_act_ranges(self) -> bool:
        """Whether :func:`qtta_plugins.quantize` changes the ranges the backend set: a choice
        other than the backend's own percentile rule, with some activation below 8 bit."""
        return self.act_ranges != "percentile" and min(self.act_bits, self.first_last_bits or 8) < 8


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
        check_nonnegative(self, "tau_f", "tau_g")  # 0 turns that term off
        check_unit(self, "decay", low_open=False, high_open=True)  # the weight of the old value


#: the flat ABL options before issue 36, in the configs that offer ABL
ABL_RENAMES = {
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
class ReconstructConfig(metaclass=OptionsMeta):
    """Base of every PTQ reconstruction method's configuration (``brecq``, ``qdrop``, ``ttaq``...).

    ``seed``: methods draw from their own generators seeded with it (the process's global RNGs
    are left alone)."""

    renamed_options: ClassVar[dict[str, Renamed]] = {}

    method: str = "ttaq"
    seed: int = 0


#: The SGD learning rate of the gradient methods that adapt norm affines (Tent, EATA, SAR) when
#: their config's ``lr`` is None, by the kind of norm they adapt: batch norms' where the model has
#: any, else layer / group norms' (chosen for Tent: 1e-2 on the digits-C dev stream, 1e-3 on
#: held-out seeds of the ViT's stream, docs/zoa.md; EATA and SAR take the same SGD step on the same
#: parameters with entropy losses, and 1e-2 lost to source on the LayerNorm ViT)
DEFAULT_LR = {"batch": 1e-2, "layer": 1e-3}
TENT_DEFAULT_LR = DEFAULT_LR  # the name before EATA and SAR shared it


# --------------------------------------------------------------------------------------------
# The option checks the method configs share: each raises ValueError naming
# ``<ConfigClass>.<field>`` and what it must be.
# --------------------------------------------------------------------------------------------


def check_lr(config: object) -> None:
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


def check_positive(config: object, *fields: str) -> None:
    name = type(config).__name__
    for field in fields:
        value = getattr(config, field)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not (math.isfinite(value) and value > 0)
        ):
            raise ValueError(f"{name}.{field} must be a positive finite number, got {value!r}")


def check_nonnegative(config: object, *fields: str) -> None:
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


def check_unit(config: object, field: str, *, low_open: bool, high_open: bool) -> None:
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


def check_int(config: object, field: str, minimum: int) -> None:
    value = getattr(config, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"{type(config).__name__}.{field} must be an int >= {minimum}, got {value!r}"
        )


def check_flags(config: object, *fields: str) -> None:
    for field in fields:
        value = getattr(config, field)
        if not isinstance(value, bool):
            raise ValueError(
                f"{type(config).__name__}.{field} must be True or False, got {value!r}"
            )


def check_optimizer(config: object) -> None:
    """``optimizer`` ('adam' / 'sgd'), ``lr`` > 0, ``momentum`` in [0, 1), ``weight_decay`` >= 0."""
    name = type(config).__name__
    if config.optimizer not in ("adam", "sgd"):  # type: ignore[attr-defined]
        raise ValueError(f"{name}.optimizer must be 'adam' or 'sgd', got {config.optimizer!r}")  # type: ignore[attr-defined]
    check_positive(config, "lr")
    check_unit(config, "momentum", low_open=False, high_open=True)
    check_nonnegative(config, "weight_decay")


#: The baselines' configs, which lived here before each moved into its method's module (issue 36):
#: re-exported for compatibility (``from qtta_plugins.config import TentConfig`` keeps working),
#: imported lazily because those modules import this one.
_METHOD_CONFIGS = {
    "SourceConfig": "qtta_plugins.methods.source",
    "NormConfig": "qtta_plugins.methods.norm",
    "TentConfig": "qtta_plugins.methods.tent",
    "EATAConfig": "qtta_plugins.methods.eata",
    "SARConfig": "qtta_plugins.methods.sar",
    "CoTTAConfig": "qtta_plugins.methods.cotta",
    "RoTTAConfig": "qtta_plugins.methods.rotta",
}


def __getattr__(name: str) -> Any:
    if name in _METHOD_CONFIGS:
        import importlib

        return getattr(importlib.import_module(_METHOD_CONFIGS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

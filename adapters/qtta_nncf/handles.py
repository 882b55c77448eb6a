"""Where NNCF keeps its fake quantizers, and the handle that puts one behind the uniform
:class:`~qtta_plugins.view.QuantizerHandle`.

``nncf.quantize`` on a PyTorch model returns the same class, its ``forward`` wrapped by NNCF and a
``HookStorage`` module at ``model.__nncf_hooks`` holding the fake quantizers:

* ``pre_hooks["<op>__<port>"]`` run on an operation's input ``port`` (port 1 of a conv / linear
  is its weight: the weight quantizers live here);
* ``post_hooks["<op>__<port>"]`` run on an operation's output (most activation quantizers: NNCF
  puts them after the producer of a tensor, not in front of its consumers).

Quantizer handles wrap NNCF's ``SymmetricQuantizer`` (parameter ``scale``: the clipping threshold,
so the grid is ``scale * k / level_high``) and ``AsymmetricQuantizer`` (``input_low``,
``input_range``). Their bit-width is NNCF's ``num_bits``; the thresholds stay where calibration put
them when it changes, so the same range is cut into ``2**bits`` levels (or one fewer, narrow range).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn

from qtta_plugins.view import Grid, QuantizerHandle

HOOKS_ATTR = "__nncf_hooks"
"""The child module of an NNCF model that holds its ``HookStorage`` (the quantizers)."""


def _from_nncf(obj: object) -> bool:
    return type(obj).__module__.startswith("nncf.")


def hook_storage(model: nn.Module) -> nn.Module | None:
    """NNCF's ``HookStorage`` of ``model``, or ``None``."""
    return model._modules.get(HOOKS_ATTR)


def is_quantizer(module: nn.Module) -> bool:
    """An NNCF fake quantizer (``BaseQuantizer``: symmetric, asymmetric, LoRA variants)."""
    return (
        _from_nncf(module)
        and hasattr(module, "_num_bits")
        and hasattr(module, "enabled")
        and hasattr(module, "set_levels")
    )


def quantizer_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every NNCF quantizer of ``model`` by its module path, in hook-storage order."""
    storage = hook_storage(model)
    if storage is None:
        return {}
    return {
        f"{HOOKS_ATTR}.{name}": module
        for name, module in storage.named_modules()
        if is_quantizer(module)
    }


def split_hook_name(name: str) -> tuple[str, str, int]:
    """``__nncf_hooks.pre_hooks.a/b/conv2d/0__1.0`` -> ``("pre_hooks", "a/b/conv2d/0", 1)``."""
    parts = name.split(".")
    op, _, port = parts[-2].rpartition("__")
    return parts[-3], op.replace(":", "."), int(port)


def op_function(op: str) -> str:
    """The torch function of an NNCF op name: ``layer1/conv1/conv2d/0`` -> ``conv2d``."""
    return op.rsplit("/", 2)[-2] if op.count("/") >= 1 else op


@contextlib.contextmanager
def quantizers_off(model: nn.Module) -> Iterator[None]:
    """Every NNCF quantizer of ``model`` switched off inside the block (the model computes its
    float function), each put back as it was after."""
    every = list(quantizer_modules(model).values())
    saved = [m.enabled.clone() for m in every]
    try:
        for m in every:
            m.enabled.fill_(0)
        yield
    finally:
        for m, enabled in zip(every, saved, strict=True):
            m.enabled.copy_(enabled)


# --- quantizer handles ---------------------------------------------------------------------------
class NNCFQuantizerHandle(QuantizerHandle):
    """An NNCF ``SymmetricQuantizer`` / ``AsymmetricQuantizer`` hook module.

    ``name`` is the quantizer's module path in the model (as in its ``state_dict``), e.g.
    ``__nncf_hooks.pre_hooks.layer1/conv1/conv2d/0__1.0``.
    """

    def __init__(self, name: str, module: nn.Module, role: str) -> None:
        self.name, self.module, self.role = name, module, role  # type: ignore[assignment]
        # NNCF's activation quantizers are post-hooks on the producer's output.
        self.shared_by_consumers = role == "act"

    @property
    def qrange(self) -> tuple[int, int]:
        return int(self.module.level_low), int(self.module.level_high)

    @property
    def bits(self) -> int:
        return int(self.module.num_bits)

    @bits.setter
    def bits(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
            raise ValueError(f"bit-width must be an int in 2..8, got {value!r}")
        module = self.module
        # NNCF's overflow fix ("half range", first layer on some CPU targets) drops one bit of an
        # 8-bit weight grid. Below 8 bit it would halve the grid again: keep it only at 8 bit.
        if not hasattr(module, "_qtta_half_range"):
            module._qtta_half_range = bool(module._half_range)
        module._half_range = module._qtta_half_range if value == 8 else False
        # NNCF recomputes level_low / level_high from num_bits; scale (symmetric) and
        # input_low / input_range (asymmetric) are thresholds, not step sizes: the calibrated
        # range is kept and cut into the new number of levels.
        module.num_bits = value

    @property
    def enabled(self) -> bool:
        return bool(self.module.is_enabled_quantization())

    @enabled.setter
    def enabled(self, value: bool) -> None:
        # NNCF's switch is the quantizer's ``enabled`` buffer (in the state dict). Its
        # enable_quantization() / disable_quantization() also flip requires_grad of the
        # quantizer's parameters, which would undo a method's freeze() / set_trainable(): set
        # the buffer only.
        self.module.enabled.fill_(1 if value else 0)

    @property
    def ch_axis(self) -> int | None:
        if not self.module.per_channel:
            return None
        shape = list(self.module.scale_shape)
        return max(range(len(shape)), key=lambda i: shape[i])

    @property
    def symmetric(self) -> bool:
        return hasattr(self.module, "_scale_param_storage")

    def input_module(self) -> nn.Module:
        """The NNCF quantizer module itself (its forward runs whether or not it is enabled)."""
        return self.module

    def params(self) -> dict[str, torch.Tensor]:
        """``{"scale": ...}`` (symmetric) or ``{"input_low": ..., "input_range": ...}``."""
        return dict(self.module.get_trainable_params())

    def _flat(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().float().reshape(-1 if self.ch_axis is not None else ()).clone()

    def grid(self) -> Grid:
        """What NNCF's ``Quantize_forward`` computes from its thresholds, with ``n = levels - 1``:

        * symmetric: ``input_low = s' * level_low / level_high``, ``input_range = s' - input_low``
          (``s' = |scale| + eps``): step ``input_range / n`` (``= s' / level_high``), zero point 0,
          integers ``level_low..level_high``;
        * asymmetric: ``input_low`` and ``input_range`` first tuned by NNCF's ``TuneRange`` (so
          that 0 is on the grid): step ``input_range / n``, zero point
          ``round(-input_low / step)``, integers ``0..n``.

        NNCF multiplies by ``1 / step`` and offsets by ``input_low`` before rounding, so it may
        round the other way within ~1e-5 steps of a tie (one step apart, see
        :func:`~qtta_plugins.view.fake_quantize`); values on the grid come back exact.
        """
        return self._grid(warn=True)

    def _grid(self, warn: bool) -> Grid:
        q = self.module
        n = q.levels - 1
        with torch.no_grad():
            if self.symmetric:
                scale = q.scale.abs() + q.eps
                input_low = scale * (q.level_low / q.level_high)
                step = (scale - input_low) / n
                zero_point = torch.zeros_like(step)
                qmin, qmax = self.qrange
            else:
                tune = nncf_tune_range()
                input_low, input_range = tune(q.input_low, q.input_range.abs() + q.eps, q.levels)
                step = input_range / n
                position = -input_low * (n / input_range)
                zero_point = torch.round(position)
                qmin, qmax = 0, n
                if warn:
                    self._warn_unaligned(position - zero_point)
        return Grid(self._flat(step), self._flat(zero_point), qmin, qmax, self.ch_axis)

    def _warn_unaligned(self, offset: torch.Tensor) -> None:
        """NNCF's ``TuneRange`` moves an asymmetric range so that 0 is a grid point, except when
        the zero point rounds to 0 or to ``n`` (its two candidate ranges then compare the wrong
        way and it keeps the range as it is). NNCF's forward then rounds ``x / step + offset``
        (``offset = -input_low / step - zero_point``, up to half a step): no ``Grid`` describes
        that, and :func:`fake_quantize` with the grid returned differs by one step near the
        shifted ties. :meth:`set_grid` writes an aligned range, which NNCF applies exactly."""
        worst = float(offset.abs().max())
        if worst > 1e-3:
            warnings.warn(
                f"{self.name}: NNCF's range puts 0 {worst:.3g} steps off the grid (its TuneRange "
                "leaves a zero point of 0 or n unaligned); its forward differs from grid() by "
                "one step near ties until set_grid() writes the grid",
                RuntimeWarning,
                stacklevel=4,
            )

    def set_grid(self, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> None:
        """Into NNCF's storage, inverting :meth:`grid`: symmetric ``scale_nncf = step *
        level_high`` (no zero point: a new one raises ``NotImplementedError``); asymmetric
        ``input_low = -zero_point * step``, ``input_range = step * n``. Log-domain storage
        (``logarithm_scale``) gets the logarithm of ``scale_nncf`` / ``input_range``."""
        current = self._grid(warn=False)  # an unaligned range is about to be replaced
        new = current.with_values(scale, zero_point)
        q = self.module
        if self.symmetric and not torch.equal(new.zero_point, current.zero_point):
            raise NotImplementedError(f"{self.name}: an NNCF SymmetricQuantizer has no zero point")
        storage = self._storage()
        old = [p.detach().clone() for p in storage]
        shape = storage[-1].shape
        step = new.scale.reshape(shape)

        def stored(threshold: torch.Tensor) -> torch.Tensor:
            return threshold.log() if q.is_using_log_scale_storage else threshold

        with torch.no_grad():
            if self.symmetric:
                storage[0].copy_(stored(step * q.level_high))
            else:
                storage[0].copy_(-new.zero_point.reshape(shape) * step)
                storage[1].copy_(stored(step * (q.levels - 1)))
        written = self._grid(warn=False)
        if not (
            torch.allclose(written.scale, new.scale, rtol=1e-5, atol=0.0)
            and torch.equal(written.zero_point, new.zero_point)
        ):  # pragma: no cover - a parametrisation this inversion does not know
            with torch.no_grad():
                for p, v in zip(storage, old, strict=True):
                    p.copy_(v)
            raise NotImplementedError(f"{self.name}: NNCF did not take the grid as written")

    def _storage(self) -> list[nn.Parameter]:
        names = (
            ("_scale_param_storage",)
            if self.symmetric
            else ("input_low", "_input_range_param_storage")
        )
        return [getattr(self.module, n) for n in names]

    def set_trainable(self, flag: bool = True) -> list[nn.Parameter]:
        """NNCF's own storage parameters (``_scale_param_storage``, or ``input_low`` and
        ``_input_range_param_storage``; log-domain when NNCF stores the scale as a logarithm)."""
        params = self._storage()
        for p in params:
            p.requires_grad_(flag)
        return params


def nncf_tune_range() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """NNCF's ``TuneRange.apply`` (asymmetric ranges moved so that 0 is on the grid)."""
    from ._backend import nncf_module

    return nncf_module("nncf.torch.quantization.quantize_functions").TuneRange.apply

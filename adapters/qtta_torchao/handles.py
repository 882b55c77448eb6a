"""Quantizer handles of torchao models: pt2e ``FakeQuantize`` modules, eager QAT fake quantizers
(``IntxFakeQuantizer``) and the constant Q/DQ parameters of a converted graph, each behind the
uniform :class:`~qtta_plugins.view.QuantizerHandle`."""

from __future__ import annotations

import torch
from torch import nn

from qtta_plugins.view import (
    Grid,
    QuantizerHandle,
    bits_of,
)


def _from_torchao(obj: object) -> bool:
    return type(obj).__module__.startswith("torchao.")


# --- quantizer handles ---------------------------------------------------------------------------
class FakeQuantizeHandle(QuantizerHandle):
    """A pt2e ``FakeQuantize`` module (scale and zero-point are buffers set by its observer)."""

    def __init__(self, name: str, module: nn.Module, role: str) -> None:
        self.name, self.module, self.role = name, module, role  # type: ignore[assignment]

    @property
    def qrange(self) -> tuple[int, int]:
        return int(self.module.quant_min), int(self.module.quant_max)

    @property
    def bits(self) -> int:
        return bits_of(*self.qrange)

    @bits.setter
    def bits(self, value: int) -> None:
        if not isinstance(value, int) or not 2 <= value <= 8:
            raise ValueError(f"bit-width must be an int in 2..8, got {value!r}")
        qmin, qmax = self.qrange
        if qmin < 0 and qmin == -qmax:  # restricted symmetric, e.g. -7..7
            new = (-(2 ** (value - 1) - 1), 2 ** (value - 1) - 1)
        elif qmin < 0:
            new = (-(2 ** (value - 1)), 2 ** (value - 1) - 1)
        else:
            new = (0, 2**value - 1)
        fq, obs = self.module, self.module.activation_post_process
        fq.quant_min, fq.quant_max = new
        obs.quant_min, obs.quant_max = new
        # Re-derive the scale from the range the observer recorded during calibration.
        if getattr(obs, "min_val", torch.empty(0)).numel() and torch.isfinite(obs.min_val).all():
            scale, zero_point = obs.calculate_qparams()
            fq.scale.resize_(scale.shape).copy_(scale)
            fq.zero_point.resize_(zero_point.shape).copy_(zero_point)

    @property
    def enabled(self) -> bool:
        return bool(self.module.fake_quant_enabled[0])

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.module.enable_fake_quant(bool(value))

    @property
    def ch_axis(self) -> int | None:
        per_channel = self.module.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine)
        return int(self.module.ch_axis) if per_channel else None

    def params(self) -> dict[str, torch.Tensor]:
        return {"scale": self.module.scale, "zero_point": self.module.zero_point}

    def input_module(self) -> nn.Module:
        """The ``FakeQuantize`` module itself: its forward's input is what it quantizes."""
        return self.module

    def grid(self) -> Grid:
        """``scale`` / ``zero_point`` buffers as they are: ``FakeQuantize`` runs
        ``torch.fake_quantize_per_{tensor,channel}_affine`` on them (``round(x * (1 / s))``, half
        to even)."""
        axis = self.ch_axis
        scale = self.module.scale.detach().float().clone()
        zero_point = self.module.zero_point.detach().float().clone()
        if axis is None:
            scale, zero_point = scale.reshape(()), zero_point.reshape(())
        return Grid(scale, zero_point, *self.qrange, axis)

    def set_grid(self, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> None:
        """Into the ``scale`` (float) and ``zero_point`` (int) buffers, and into the observer's
        recorded range: ``convert_pt2e`` takes its quantize parameters from the observer
        (``calculate_qparams()``), not from the buffers, so the range is set to the one that
        yields exactly this grid. The observer is then switched off: while on, every forward
        would re-derive the buffers from newly observed statistics."""
        current = self.grid()
        new = current.with_values(scale, zero_point)
        symmetric = self.module.qscheme in (torch.per_tensor_symmetric, torch.per_channel_symmetric)
        if symmetric and not torch.equal(new.zero_point, current.zero_point):
            raise NotImplementedError(f"{self.name}: a symmetric FakeQuantize keeps its zero point")
        fq, obs = self.module, self.module.activation_post_process
        with torch.no_grad():
            fq.scale.copy_(new.scale.reshape(fq.scale.shape).to(fq.scale.dtype))
            fq.zero_point.copy_(new.zero_point.reshape(fq.zero_point.shape).to(fq.zero_point.dtype))
            if isinstance(getattr(obs, "min_val", None), torch.Tensor):
                if symmetric:  # the observer's scale is max(|lo|, hi) / ((qmax - qmin) / 2)
                    hi = new.scale * (new.qmax - new.qmin) / 2
                    lo = -hi
                else:  # scale = (hi - lo) / (qmax - qmin), zero point = qmin - round(lo / scale)
                    lo = (new.qmin - new.zero_point) * new.scale
                    hi = (new.qmax - new.zero_point) * new.scale
                shape = fq.scale.shape
                obs.min_val.resize_(shape).copy_(lo.reshape(shape).to(obs.min_val.dtype))
                obs.max_val.resize_(shape).copy_(hi.reshape(shape).to(obs.max_val.dtype))
        fq.disable_observer()


class IntxFakeQuantizerHandle(QuantizerHandle):
    """torchao QAT's ``IntxFakeQuantizer`` (on a ``FakeQuantizedLinear``)."""

    def __init__(
        self, name: str, module: nn.Module, role: str, weight: torch.Tensor | None
    ) -> None:
        self.name, self.module, self.role, self._weight = name, module, role, weight  # type: ignore[assignment]

    @property
    def qrange(self) -> tuple[int, int]:
        from torchao.quantization.quant_primitives import _DTYPE_TO_QVALUE_BOUNDS

        return tuple(_DTYPE_TO_QVALUE_BOUNDS[self.module.config.dtype])  # type: ignore[return-value]

    @property
    def bits(self) -> int:
        return bits_of(*self.qrange)

    @bits.setter
    def bits(self, value: int) -> None:
        if not isinstance(value, int) or not 2 <= value <= 8:
            raise ValueError(f"bit-width must be an int in 2..8, got {value!r}")
        signed = self.qrange[0] < 0
        self.module.config.dtype = getattr(torch, f"{'int' if signed else 'uint'}{value}")
        if not self.module.config.is_dynamic:
            # Static scales belong to the old grid: re-initialise them from the weight. They may be
            # registered Parameters (range learning), which cannot be re-assigned plain tensors.
            for name in ("scale", "zero_point"):
                self.module._parameters.pop(name, None)
                setattr(self.module, name, None)
            if self._weight is not None:
                with torch.no_grad():
                    self.module(self._weight)

    @property
    def enabled(self) -> bool:
        return bool(self.module.enabled)

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.module.enabled = bool(value)

    @property
    def ch_axis(self) -> int | None:
        axis = getattr(self.module.config.granularity, "axis", None)
        return int(axis) if axis is not None else None

    def params(self) -> dict[str, torch.Tensor]:
        if self.module.config.is_dynamic:
            return {}
        return {"scale": self.module.scale, "zero_point": self.module.zero_point}

    def _static_per_channel(self) -> None:
        config = self.module.config
        if config.is_dynamic:
            raise NotImplementedError(
                f"{self.name}: a dynamic torchao fake quantizer computes its scale from each input "
                f"({type(config.granularity).__name__}); it has no fixed grid"
            )
        if self.ch_axis is None:  # PerGroup: one scale per group of a row, not one per channel
            raise NotImplementedError(
                f"{self.name}: {type(config.granularity).__name__} scales are not a per-tensor / "
                "per-channel grid"
            )
        if self.module.scale is None or self.module.zero_point is None:
            raise NotImplementedError(
                f"{self.name}: scales are not initialised yet (run the model, or "
                "initialize_fake_quantizers, once)"
            )

    def grid(self) -> Grid:
        """Static per-channel (``PerAxis(0)``) quantizers: ``scale`` / ``zero_point`` of shape
        ``(C, 1)`` flattened; torchao computes ``round(x * (1 / s)) + zp`` (half to even)."""
        self._static_per_channel()
        scale = self.module.scale.detach().float().reshape(-1).clone()
        zero_point = self.module.zero_point.detach().float().reshape(-1).clone()
        return Grid(scale, zero_point, *self.qrange, self.ch_axis)

    def set_grid(self, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> None:
        """In place into ``scale`` / ``zero_point`` (tensors, or Parameters under range
        learning); a symmetric config's zero point stays 0."""
        self._static_per_channel()
        current = self.grid()
        new = current.with_values(scale, zero_point)
        if self.module.config.is_symmetric and not torch.equal(new.zero_point, current.zero_point):
            raise NotImplementedError(f"{self.name}: a symmetric quantizer keeps its zero point 0")
        with torch.no_grad():
            for target, value in (
                (self.module.scale, new.scale),
                (self.module.zero_point, new.zero_point),
            ):
                target.copy_(value.reshape(target.shape).to(target.dtype))

    def set_trainable(self, flag: bool = True) -> list[nn.Parameter]:
        scale = self.module.scale
        if not isinstance(scale, nn.Parameter):
            raise NotImplementedError(
                f"{self.name}: scale is not learnable (dynamic quantizer, or range_learning=False)"
            )
        scale.requires_grad_(flag)
        return [scale]


class ConstantQuantizerHandle(QuantizerHandle):
    """A quantize/dequantize pair of a converted graph: parameters are constants, read-only."""

    def __init__(self, name: str, node: torch.fx.Node, role: str, gm: torch.fx.GraphModule) -> None:
        self.name, self.node, self.role, self.gm = name, node, role, gm  # type: ignore[assignment]
        per_channel = "per_channel" in str(node.target)
        # per_tensor: (x, scale, zp, qmin, qmax, dtype); per_channel: (x, scale, zp, axis, qmin, qmax, dtype)
        self._range_at = 4 if per_channel else 3
        self._axis = node.args[3] if per_channel else None

    def _value(self, arg: object) -> object:
        if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
            return getattr(self.gm, str(arg.target))
        return arg

    @property
    def qrange(self) -> tuple[int, int]:
        return int(self.node.args[self._range_at]), int(self.node.args[self._range_at + 1])

    @property
    def bits(self) -> int:
        return bits_of(*self.qrange)

    @bits.setter
    def bits(self, value: int) -> None:
        raise NotImplementedError(
            f"{self.name}: a convert_pt2e model stores integer weights; change bit-widths on the "
            "prepared model, before convert_pt2e"
        )

    @property
    def enabled(self) -> bool:
        return True

    @enabled.setter
    def enabled(self, value: bool) -> None:
        raise NotImplementedError(f"{self.name}: a convert_pt2e model cannot turn quantization off")

    @property
    def ch_axis(self) -> int | None:
        return int(self._axis) if self._axis is not None else None

    def params(self) -> dict[str, torch.Tensor]:
        return {
            "scale": torch.as_tensor(self._value(self.node.args[1])),
            "zero_point": torch.as_tensor(self._value(self.node.args[2])),
        }

    def grid(self) -> Grid:
        """The constants of the dequantize node (its quantize twin has the same ones)."""
        params = self.params()
        scale = params["scale"].detach().float().clone()
        zero_point = params["zero_point"].detach().float().clone()
        if self._axis is None:
            scale, zero_point = scale.reshape(()), zero_point.reshape(())
        return Grid(scale, zero_point, *self.qrange, self.ch_axis)

    def set_grid(self, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> None:
        raise NotImplementedError(
            f"{self.name}: a convert_pt2e model holds integer weights quantized with these "
            "constants; set grids on the prepared model, before convert_pt2e"
        )

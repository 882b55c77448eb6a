"""The :class:`SubnetBank`: a float CNN made switchable, its per-subnet norm statistics, costs
(MACs, BitOPs, bytes), evaluation, and the materialization of a subnet by a backend."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...view import copy_model, model_device
from .config import RTFQConfig, Subnet
from .data import first_images, labelled_batches
from .layers import SwitchableBatchNorm, SwitchableLayer, _act_range, _channels, _Switch


class SubnetBank(nn.Module):
    """A float CNN made switchable in width, input resolution and bit-width (see the module doc).

    ``model``: the pretrained float model (not modified); ``calib``: unlabelled target images that
    set the initial activation step sizes, each subnet's norm statistics and a materialized
    subnet's backend calibration: batches (tensors or ``(x, y)`` pairs, a ``DataLoader``), as
    :func:`qtta_plugins.quantize` takes them, or one ``(N, C, H, W)`` tensor. Only the first
    ``config.recalib_images`` images are read, and kept (a buffer, on the model's device).
    ``table`` is filled by :meth:`evaluate`.
    """

    def __init__(
        self,
        model: nn.Module,
        calib: torch.Tensor | Iterable[Any],
        config: RTFQConfig | None = None,
    ) -> None:
        super().__init__()
        self.config = config or RTFQConfig()
        calib = first_images(calib, self.config.recalib_images, "calib")
        if not torch.isfinite(calib).all():
            raise ValueError("calib contains NaN or Inf")
        self.native_resolution = int(calib.shape[-1])
        if max(self.config.resolutions) > self.native_resolution:
            raise ValueError(
                f"resolutions {self.config.resolutions} exceed the images' "
                f"{self.native_resolution} px"
            )
        self.template = copy_model(model).eval()  # the float original, for materialization
        for p in self.template.parameters():
            p.requires_grad_(False)
        # the images on the model's device, where every pass over them runs
        self.register_buffer("calib", calib.detach().to(model_device(model), copy=True))
        self.switch = _Switch()
        self.resolution = self.native_resolution
        self.net = copy_model(model).eval()
        self.layers: dict[str, SwitchableLayer] = {}
        self.norms: dict[str, SwitchableBatchNorm] = {}
        for name, module in list(self.net.named_modules()):
            if isinstance(module, nn.Conv2d | nn.Linear):
                new: nn.Module = SwitchableLayer(module, self.switch, self.config.bits)
                self.layers[name] = new  # type: ignore[assignment]
            elif isinstance(module, nn.BatchNorm2d):
                new = SwitchableBatchNorm(module)
                self.norms[name] = new  # type: ignore[assignment]
            elif isinstance(module, nn.modules.batchnorm._NormBase | nn.LayerNorm | nn.GroupNorm):
                raise ValueError(
                    f"RTF-Q's width slicing supports Conv2d / Linear / BatchNorm2d models; "
                    f"{name!r} is a {type(module).__name__}"
                )
            else:
                continue
            self.net.set_submodule(name, new)
        if not self.layers:
            raise ValueError("the model has no Conv2d / Linear layer to quantize")
        self.order = self._forward_order()
        flb = self.config.first_last_bits
        if flb is not None:
            for name in (self.order[0], self.order[-1]):
                self.layers[name].layer_bits = {b: flb for b in self.config.bits}
        self._calibrate_act_scales()
        self.norm_stats: dict[Subnet, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.rows: list[dict[str, Any]] = []
        self.eval()

    # -- switching ----------------------------------------------------------------------------------
    def set_subnet(self, subnet: Subnet | None, *, bits: int | None = None) -> None:
        """Run ``subnet`` from now on (its norm statistics too, once recalibrated); ``None``: the
        full float model (``bits`` then picks a precision for the full width and resolution)."""
        if subnet is None:
            self.switch.width, self.resolution, self.switch.bits = 1.0, self.native_resolution, bits
            return
        self.switch.width, self.resolution, self.switch.bits = (
            subnet.width,
            subnet.resolution,
            subnet.bits,
        )
        stats = self.norm_stats.get(subnet)
        if stats is not None:
            with torch.no_grad():
                for name, (mean, var) in stats.items():
                    bn = self.norms[name]
                    bn.running_mean[: len(mean)].copy_(mean)
                    bn.running_var[: len(var)].copy_(var)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = _resize(x, self.resolution)
        return self.net(x)

    def _forward_order(self) -> list[str]:
        order: list[str] = []
        hooks = [
            m.register_forward_pre_hook(
                lambda _m, _a, n=n: order.append(n) if n not in order else None
            )
            for n, m in self.layers.items()
        ]
        try:
            with torch.no_grad():
                self.net(self.calib[:2])
        finally:
            for h in hooks:
                h.remove()
        return order

    @torch.no_grad()
    def _calibrate_act_scales(self) -> None:
        """Each layer's input range on the calibration images (full float model) -> step sizes.

        Layers that read the same tensor (a block's first conv and its shortcut conv) share one
        set of step sizes: the tensor is quantized once, as NNCF (one quantizer where the branches
        split) and pt2e (one observer per edge, set alike here) materialize it."""
        lo: dict[str, float] = {}
        hi: dict[str, float] = {}
        first_inputs: dict[str, torch.Tensor] = {}  # held, so no two live inputs share an id

        def hook_for(name: str):
            def hook(_m: nn.Module, args: tuple) -> None:
                x = args[0]
                first_inputs.setdefault(name, x)
                lo[name] = min(lo.get(name, 0.0), float(x.min()))
                hi[name] = max(hi.get(name, 0.0), float(x.max()))

            return hook

        hooks = [m.register_forward_pre_hook(hook_for(n)) for n, m in self.layers.items()]
        self.set_subnet(None)
        try:
            for i in range(0, len(self.calib), 256):
                self.net(self.calib[i : i + 256])
        finally:
            for h in hooks:
                h.remove()
        for name, layer in self.layers.items():
            layer.act_signed = lo[name] < 0
            for b in self.config.bits:
                _, qmax = _act_range(layer.layer_bits[b], layer.act_signed)
                extent = max(hi[name], -lo[name]) if layer.act_signed else hi[name]
                step = torch.tensor(max(extent, 1e-8) / qmax, device=layer.weight.device)
                layer.act_scale[str(b)] = nn.Parameter(step)
        for i, name in enumerate(self.order):
            layer = self.layers[name]
            for earlier in self.order[:i]:
                other = self.layers[earlier]
                if first_inputs[earlier] is first_inputs[name] and (
                    other.layer_bits == layer.layer_bits
                ):
                    layer.act_scale = other.act_scale  # the same ParameterDict: one step size
                    break

    # -- norm statistics ----------------------------------------------------------------------------
    @torch.no_grad()
    def recalibrate(self, subnet: Subnet) -> None:
        """This subnet's norm statistics, averaged over batches of the calibration images."""
        self.set_subnet(subnet)
        was_training = self.training
        self.eval()
        for bn in self.norms.values():
            bn.sums = [0, 0.0, 0.0]
        try:
            for i in range(0, len(self.calib), 128):
                self(self.calib[i : i + 128])
            stats = {}
            for name, bn in self.norms.items():
                n, mean, var = bn.sums  # type: ignore[misc]
                stats[name] = (mean / n, var / n)
        finally:
            for bn in self.norms.values():
                bn.sums = None
            self.train(was_training)
        self.norm_stats[subnet] = stats
        self.set_subnet(subnet)

    # -- costs --------------------------------------------------------------------------------------
    @torch.no_grad()
    def costs(self, subnet: Subnet) -> dict[str, float]:
        """MACs (flop counter), BitOPs and weight bytes of ``subnet`` on one image."""
        from torch.utils.flop_counter import FlopCounterMode

        self.set_subnet(subnet)
        was_training = self.training
        self.eval()
        x = self.calib[:1]
        counter = FlopCounterMode(display=False)
        try:
            with counter:
                self(x)
        finally:
            self.train(was_training)
        per_module = counter.get_flop_counts()
        bitops = weight_bytes = 0.0
        for name, layer in self.layers.items():
            key = next((k for k in per_module if k.endswith(f"net.{name}")), None)
            flops = sum(per_module[key].values()) if key is not None else 0
            lb = layer.layer_bits[subnet.bits]
            bitops += flops / 2 * lb * lb
            weight_bytes += layer.weight_elements * lb / 8
            if layer.bias is not None:
                weight_bytes += 4 * layer.out_k
        for bn in self.norms.values():
            # a batch norm follows a conv of the same width: weight and bias over its slice
            weight_bytes += 4 * 2 * _channels(len(bn.running_mean), subnet.width)
        macs = sum(per_module.get("Global", {}).values()) / 2
        return {"macs": macs, "bitops": bitops, "bytes": weight_bytes}

    @torch.no_grad()
    def evaluate(
        self, x: torch.Tensor | Iterable[Any], y: torch.Tensor | None = None
    ) -> list[dict[str, Any]]:
        """Recalibrate every subnet and fill :attr:`rows`: costs and accuracy (%) on the held-out
        target data: tensors ``x``, ``y``, or ``x`` alone as ``(x, y)`` batches (a ``DataLoader``,
        read once per subnet). Batches on the CPU move to the bank's device."""
        rows = []
        for subnet in self.config.subnets():
            self.recalibrate(subnet)
            row = {"subnet": subnet, "name": subnet.name, **self.costs(subnet)}
            row["accuracy"] = self._accuracy(x, y)
            rows.append(row)
        self.rows = rows
        return rows

    def _accuracy(self, x: torch.Tensor | Iterable[Any], y: torch.Tensor | None) -> float:
        """Top-1 accuracy (%) of the bank as it is set, over ``x``'s batches (tensors in chunks of
        256, as :func:`qtta_plugins.models.accuracy` counts them)."""
        device = model_device(self)
        correct = total = 0
        for bx, by in labelled_batches(x, y, "evaluate"):
            correct += int((self(bx.to(device)).argmax(1) == by.to(device)).sum())
            total += len(by)
        if total == 0:
            raise ValueError("evaluate: the data holds no image")
        return 100.0 * correct / total

    def table(self) -> list[dict[str, Any]]:
        if not self.rows:
            raise ValueError("the bank has no table yet: call bank.evaluate(x, y) on target data")
        return self.rows

    # -- materialization ----------------------------------------------------------------------------
    @torch.no_grad()
    def float_subnet(self, subnet: Subnet) -> nn.Module:
        """``subnet`` as a plain float model of the original architecture (sliced modules, its own
        norm statistics), resizing its input first when its resolution is not native."""
        if subnet not in self.norm_stats:
            self.recalibrate(subnet)
        self.set_subnet(subnet)
        self.eval()
        self(self.calib[:1])  # records every layer's slice
        model = copy_model(self.template)
        for name, layer in self.layers.items():
            w = layer.weight[: layer.out_k, : layer.in_k].detach().clone()
            b = None if layer.bias is None else layer.bias[: layer.out_k].detach().clone()
            old = model.get_submodule(name)
            if layer.is_conv:  # on the bank's device, as the template's other modules are
                new: nn.Module = nn.Conv2d(
                    layer.in_k,
                    layer.out_k,
                    old.kernel_size,
                    old.stride,
                    old.padding,
                    old.dilation,
                    groups=layer.in_k if layer.depthwise else 1,
                    bias=b is not None,
                    padding_mode=old.padding_mode,
                    device=w.device,
                )
            else:
                new = nn.Linear(layer.in_k, layer.out_k, bias=b is not None, device=w.device)
            new.weight.copy_(w)
            if b is not None:
                new.bias.copy_(b)
            model.set_submodule(name, new)
        for name, (mean, var) in self.norm_stats[subnet].items():
            bn_old, sw = model.get_submodule(name), self.norms[name]
            k = len(mean)
            bn = nn.BatchNorm2d(k, eps=bn_old.eps, momentum=bn_old.momentum, device=mean.device)
            bn.weight.copy_(sw.weight[:k])
            bn.bias.copy_(sw.bias[:k])
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            model.set_submodule(name, bn)
        model.eval()
        if subnet.resolution != self.native_resolution:
            model = AtResolution(model, subnet.resolution).eval()
        return model

    def materialize(self, subnet: Subnet, backend: str) -> nn.Module:
        """``subnet`` quantized by ``backend`` (its own kind of model), with the bank's activation
        step sizes written into the backend's grids where the grids have the bank's form."""
        import qtta_plugins

        from ...features import measure_source_statistics

        model = self.float_subnet(subnet)
        prefix = "net." if isinstance(model, AtResolution) else ""
        calib = [self.calib[i : i + 64] for i in range(0, len(self.calib), 64)]
        qmodel = qtta_plugins.quantize(
            model,
            backend,
            (subnet.bits, subnet.bits),
            calib,
            first_last_bits=self.config.first_last_bits,
            # the bank's grids replace every activation range the search would choose; those it
            # cannot place keep the backend's own calibration, as they did before the search
            act_ranges="percentile",
        )
        view = qtta_plugins.quant_view(qmodel)
        mismatched: list[str] = []
        placed: set[str] = set()
        for qlayer in view.layers():
            name = qlayer.name[len(prefix) :] if qlayer.name.startswith(prefix) else qlayer.name
            layer = self.layers.get(name)
            if layer is None:
                continue
            handle = qlayer.input_quantizer
            if handle is not None and handle.enabled:
                placed.add(handle.name)
                scale, qmin, qmax = layer.act_grid(subnet.bits)
                grid = handle.grid()
                if (grid.qmin, grid.qmax, grid.ch_axis) == (qmin, qmax, None):
                    handle.set_grid(
                        scale.detach().clone().reshape(grid.scale.shape),
                        torch.zeros_like(grid.zero_point),
                    )
                else:
                    mismatched.append(handle.name)
            handle = qlayer.weight_quantizer
            if handle is not None and handle.enabled:
                # The bank's weight scale is max|w_row| / qmax; a backend may calibrate another
                # (e.g. MSE thresholds). Per-channel scaling commutes with a per-channel factor the
                # backend folds in (torchao's w * gamma / sigma), so the max-abs scale of what the
                # backend's quantizer sees rounds exactly as the bank does.
                placed.add(handle.name)
                grid = handle.grid()
                qmax = 2 ** (layer.layer_bits[subnet.bits] - 1) - 1
                if (grid.qmin, grid.qmax, grid.ch_axis) == (-qmax, qmax, 0):
                    seen = view.weight_quantizer_input(qlayer).detach()
                    scale = seen.abs().flatten(1).amax(1).clamp_min(1e-12) / qmax
                    handle.set_grid(scale.reshape(grid.scale.shape), grid.zero_point)
                else:
                    mismatched.append(handle.name)
        # Quantizers the bank has no counterpart for (NNCF also quantizes batch-norm outputs before
        # residual sums): switched off, so the model computes what the bank's table measured.
        extra = [q for q in view.quantizers() if q.enabled and q.name not in placed]
        for q in extra:
            q.enabled = False
        if mismatched:
            warnings.warn(
                f"{backend} quantizes {', '.join(mismatched)} on another grid than the bank's; "
                "those keep the backend's own calibration",
                stacklevel=2,
            )
        qmodel.qtta_disabled_quantizers = [q.name for q in extra]
        # the source statistics quantize kept describe the grids before the bank's were written
        measure_source_statistics(qmodel, calib)
        return qmodel


class AtResolution(nn.Module):
    """Resize the input to ``size`` px (bilinear, as the bank does), then run ``net``."""

    def __init__(self, net: nn.Module, size: int) -> None:
        super().__init__()
        self.net, self.size = net, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(_resize(x, self.size))


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)

"""``brecq``, ``qdrop`` and ``ttaq``: block-wise PTQ reconstruction, plain and stable under shift.

Our formulation of TTAQ's reconstruction (Xiao et al., arXiv 2412.09899; the paper's method section
is not available offline: this docstring gives the algorithm as we run it, docs/ttaq.md its
measurements) on top of the BRECQ / QDrop baseline.

Where it works: in a *simulation* of the backend's quantized model, built from the float original
``fp_model`` (blocks are its modules, named as the view names them) and the grids the backend applies
now (``QuantizerHandle.grid()``): each quantized layer's input goes through a fake quantizer with a
learnable step size (LSQ), and its weight through AdaRound's learnable rounding on the backend's own
weight grid. What is learned is then written back into the backend's own state
(``QuantView.set_layer_weight`` with weights snapped to the grid, ``QuantizerHandle.set_grid`` for the
step sizes), so the backend's forward reproduces the reconstructed function and export still works.
Quantizers the view does not hand out per layer (a backend that also quantizes, e.g., a residual sum)
are not simulated: :func:`simulation_gap` measures how far the simulation is from the backend model.

Per block ``B``, in forward order, on the calibration images (``X_fp`` / ``X_q``: the block's input in
the float model / in the simulation with every earlier block already reconstructed)::

    L = ||B_q(X~) - B_fp(X_fp)||^2                       reconstruction, X~ = QDrop mix of X_q, X_fp
      + round_weight * sum(1 - |2 h(V) - 1|^beta)        AdaRound's regulariser, beta annealed
      + pem_weight * sum_layers sum_j s_j^2 ||(W^ - W)_{:,j}||^2 / C_out    PEM (ttaq)
      + pcr_weight * ||B_q(X^_q) - B_q(X_q)||^2                             PCR (ttaq)
      + logits_weight * KL(p_fp(x) || p(x | B_fp replaced by B_q))          L_logits (ttaq)

- PEM: on a shifted input ``x + delta`` the float layer gives ``W (x + delta)`` and the quantized
  one ``W^ (x + delta)``; their difference is ``(W^ - W) x + (W^ - W) delta``. The reconstruction
  term fits the first part on clean images; PEM adds the expectation of the second: with independent
  per-input-channel perturbations of variance ``s_j^2``, ``sum_j s_j^2 ||(W^ - W)_{:,j}||^2`` per
  output element, averaged over output channels (a conv's kernel positions see independent
  perturbations too). It weighs each input channel's rounding error by how much that channel moves
  under shift. ``s_j^2`` is measured once: the mean squared difference of each input channel of the
  layer, in the float model, between the calibration images and shifted views of them
  (:func:`shifted_views`). Same units as the reconstruction error, so ``pem_weight = 1`` weighs the
  expected shift error like the clean error. ``pem_on="weight"`` penalises ``W^`` itself, i.e. the
  target is the float model on the *clean* input (our formulation's first form): that pulls weights toward
  zero and cost clean accuracy on the dev stream, so it is kept only for comparison.
- PCR: ``X^_q`` is the simulation's block input for the shifted view of the same image; the
  consistency target ``B_q(X_q)`` is not differentiated (the clean path is what reconstruction fits).
- L_logits: the block's quantized output replaces the float block's output inside the float model
  (a forward hook), the rest of the float model maps it to logits, compared with the float logits
  by KL (temperature 1): a global signal against block-local over-fitting.
- Weights: PEM 1 (the units argument above), PCR 0.1 and L_logits 0.1, chosen on the digits dev
  stream (seeds 1 and 2, W2A4 torchao, Tent error after reconstruction): PCR at 1 made the block
  insensitive to its input and cost clean accuracy; L_logits at 1 did the same.
- ``brecq``: no QDrop, no PEM / PCR / L_logits. ``qdrop``: QDrop with p = 0.5. ``ttaq``: QDrop plus
  the three terms. Every term has its own switch, for the ablations.

Choices where the sources are silent (each is a :class:`TTAQConfig` field): Adam on V (lr 1e-3) and
on the step sizes (lr 4e-5), as BRECQ / QDrop's public code; 1000 iterations per block at batch 32
(their 20k on a GPU is out of reach of a 2-core CPU; the dev stream showed little change past 1000);
the regulariser off for the first 20% of iterations, then beta from 20 to 2; weight elements whose
nearest grid point is an end of the range keep it, so a per-channel range that a backend recomputes
from the weights (Brevitas' default) stays where it was.

Memory: every iteration draws its mini-batch at random from the whole calibration set, so the
reconstruction needs random access to it: it holds the first ``calib_images`` images given (1024 by
default; :func:`qtta_plugins.reconstruct` reads nothing past them, and hands them over as one
tensor), their shifted views (PEM / PCR), and, for the block being reconstructed, its float input
and output, its quantized input (and, for PCR, its quantized input on the shifted views) on all of
them; a block's captures are let go when the next block starts. Everything lives on the model's
device. Random draws (mini-batch indices, QDrop masks, shifted views) come from one CPU generator
seeded with ``seed`` and are moved to that device: a CUDA run draws what the CPU run draws.

Over 500 lines: the simulation, the three reconstructions (BRECQ, QDrop, TTAQ) and the write-back are one pipeline; splitting it would scatter the algorithm this docstring describes.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..adaptation import calibration_images
from ..config import ReconstructConfig
from ..fakequant import fake_quant
from ..hookspecs import hookimpl
from ..progress import show_progress
from ..view import Grid, QuantLayer, QuantView, copy_model, model_device
from .base import MethodInfo

# AdaRound's rectified sigmoid stretch (Nagel et al. 2020).
_ZETA, _GAMMA = 1.1, -0.1


@dataclass
class TTAQConfig(ReconstructConfig):
    """Options of the block-wise reconstructions; the method name sets the defaults of the switches
    (``brecq``: all off; ``qdrop``: ``qdrop_p=0.5``; ``ttaq``: QDrop + PEM + PCR + L_logits)."""

    method: str = "ttaq"
    iters: int = 1000  # per block
    batch_size: int = 32
    # the calibration images used (the first ones given): every iteration draws its mini-batch
    # from all of them, so they are held, with each block's inputs and outputs on them (BRECQ's
    # and QDrop's ImageNet setting is 1024)
    calib_images: int = 1024
    lr_round: float = 1e-3  # Adam on AdaRound's V
    lr_scale: float = 4e-5  # Adam on the activation step sizes (LSQ)
    round_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2  # fraction of iterations before the rounding regulariser starts
    learn_act_scales: bool = True
    qdrop_p: float | None = None  # None: 0.5 for qdrop / ttaq, 0 for brecq
    pem: bool | None = None  # None: on for ttaq
    pem_weight: float = 1.0
    pem_on: str = "error"  # "error": (W^ - W) under the shift; "weight": W^ itself (the first form)
    pcr: bool | None = None
    pcr_weight: float = 0.1
    logits: bool | None = None
    logits_weight: float = 0.1
    shift_strength: float = 1.0  # scales the photometric jitter / noise of the shifted views
    # NNCF quantizes an activation once, at its producer, so a residual block's identity path
    # adds the same 4-bit tensor its first conv reads. True: the simulation quantizes that path
    # too, as the backend does. False (default): it learns with that path in float, and the
    # result is written back into the backend, where the path is quantized. Measured on the digits
    # BN CNN at W2A4 after qdrop (3 seeds): NNCF 63.1 +- 0.8 % with True, 69.1 +- 0.5 % with False
    # (docs/backends.md): learning the step through both readers fits neither. Torchao and
    # Brevitas quantize per consumer, so this changes nothing for them.
    shared_inputs: bool = False
    progress: bool | None = None

    def __post_init__(self) -> None:
        if self.method not in RECONSTRUCTION_METHODS:
            raise ValueError(
                f"TTAQConfig.method must be one of {', '.join(RECONSTRUCTION_METHODS)}, "
                f"not {self.method!r}"
            )
        ttaq = self.method == "ttaq"
        if self.qdrop_p is None:
            self.qdrop_p = 0.0 if self.method == "brecq" else 0.5
        for name in ("pem", "pcr", "logits"):
            if getattr(self, name) is None:
                setattr(self, name, ttaq)
        for name in ("iters", "batch_size", "calib_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TTAQConfig.{name} must be a positive int, got {value!r}")
        if self.pem_on not in ("error", "weight"):
            raise ValueError(f"TTAQConfig.pem_on must be 'error' or 'weight', not {self.pem_on!r}")
        if not 0.0 <= self.qdrop_p <= 1.0:
            raise ValueError(f"TTAQConfig.qdrop_p must be in [0, 1], got {self.qdrop_p!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"TTAQConfig.warmup must be in [0, 1), got {self.warmup!r}")
        for name in (
            "lr_round",
            "lr_scale",
            "round_weight",
            "pem_weight",
            "pcr_weight",
            "logits_weight",
            "shift_strength",
        ):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0 or not math.isfinite(value):
                raise ValueError(f"TTAQConfig.{name} must be a finite number >= 0, got {value!r}")
        if self.beta_start < self.beta_end or self.beta_end <= 0:
            raise ValueError("TTAQConfig needs beta_start >= beta_end > 0")

    @property
    def needs_shifted_views(self) -> bool:
        return bool(self.pem or self.pcr)


RECONSTRUCTION_METHODS = ("brecq", "qdrop", "ttaq")


# --- the simulation --------------------------------------------------------------------------------
class ActQuantizer(nn.Module):
    """A fake quantizer on the backend's activation grid, with a learnable step size (LSQ).

    ``(clamp(round(x / s) + zp, qmin, qmax) - zp) * s`` with a straight-through round: the gradient
    on ``s`` is LSQ's (``round(x/s) - x/s`` inside the range, the range end outside it).
    """

    def __init__(self, grid: Grid, learn: bool) -> None:
        super().__init__()
        self.scale = nn.Parameter(grid.scale.detach().clone().float(), requires_grad=learn)
        self.register_buffer("zero_point", grid.zero_point.detach().clone().float())
        self.qmin, self.qmax = grid.qmin, grid.qmax
        self.grid = grid  # for its channel axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.grid.along(self.scale, x.ndim)
        zp = self.grid.along(self.zero_point, x.ndim)
        return fake_quant(x, s, zp, self.qmin, self.qmax, ste=True)


class AdaRoundWeight(nn.Module):
    """A weight on the backend's grid with learnable rounding (AdaRound): ``floor(w/s) + h(V)``.

    ``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``, initialised to the fractional part
    (so the soft weight starts at the float weight); ``hard=True`` rounds up where ``h >= 0.5``.
    Elements whose nearest grid point is an end of the range keep it (see the module docstring).
    """

    def __init__(self, weight: torch.Tensor, grid: Grid) -> None:
        super().__init__()
        w = weight.detach().float()
        # the grid on the weight's device (an adapter may keep a grid's tensors elsewhere)
        s = grid.along(grid.scale.detach().float().to(w.device), w.ndim)
        zp = grid.along(grid.zero_point.detach().float().to(w.device), w.ndim)
        self.register_buffer("s", s)
        self.register_buffer("zp", zp)
        self.qmin, self.qmax = grid.qmin, grid.qmax
        ws = w / s
        self.register_buffer("base", torch.floor(ws))
        nearest = torch.round(ws) + zp
        self.register_buffer("pinned", (nearest <= self.qmin) | (nearest >= self.qmax))
        self.register_buffer("nearest", nearest.clamp(self.qmin, self.qmax))
        rest = (ws - self.base).clamp(1e-4, 1 - 1e-4)
        self.V = nn.Parameter(-torch.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1))

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.V) * (_ZETA - _GAMMA) + _GAMMA, 0, 1)

    def forward(self, hard: bool = False) -> torch.Tensor:
        h = (self.V >= 0).to(self.V.dtype) if hard else self.h()
        q = torch.where(self.pinned, self.nearest, self.base + h + self.zp)
        return (torch.clamp(q, self.qmin, self.qmax) - self.zp) * self.s

    def regulariser(self, beta: float) -> torch.Tensor:
        r = 1 - (2 * self.h() - 1).abs().pow(beta)
        return r[~self.pinned].sum()


class SimLayer(nn.Module):
    """A float conv / linear that computes like the backend's quantized layer: input through the
    shared :class:`ActQuantizer`, weight through :class:`AdaRoundWeight` (rounding to nearest
    once ``hard``).

    ``rounded``: the tensor the backend's weight quantizer sees, which may be the weight times a
    per-output-channel ``fold`` (torchao's QAT batch-norm pattern quantizes ``w * gamma / sigma``
    and divides the conv output by the same factor); the layer computes with ``q(rounded) / fold``.
    """

    def __init__(
        self,
        module: nn.Module,
        weight: torch.Tensor,
        rounded: torch.Tensor,
        weight_grid: Grid | None,
        act: ActQuantizer | None,
    ) -> None:
        super().__init__()
        self.module = module
        for p in module.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            module.weight.copy_(weight)
        w, r = weight.detach().float().flatten(1), rounded.detach().float().flatten(1)
        norm = w.square().sum(1)
        fold = torch.where(norm > 0, (w * r).sum(1) / norm.clamp_min(1e-30), torch.ones_like(norm))
        self.register_buffer("fold", fold.reshape((-1,) + (1,) * (weight.ndim - 1)))
        self.rounding = AdaRoundWeight(rounded, weight_grid) if weight_grid is not None else None
        self.act = act
        self.hard = False

    def quantized_weight(self) -> torch.Tensor:
        if self.rounding is None:
            return self.module.weight
        return self.rounding(hard=self.hard) / self.fold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x)
        w = self.quantized_weight()
        if isinstance(self.module, nn.Linear):
            return F.linear(x, w, self.module.bias)
        return self.module._conv_forward(x, w, self.module.bias)


class Simulation:
    """The float model with every quantized layer of the backend model replaced by a
    :class:`SimLayer` on that layer's grids. ``model`` is the simulated network.

    With ``shared_inputs``, an activation quantizer the backend applies to its producer's output
    for every consumer (``shared_by_consumers``) is also applied to the block's input when it
    quantizes the block's input, so a residual shortcut reads the quantized tensor there too, as
    in the backend (see :attr:`TTAQConfig.shared_inputs`).
    """

    def __init__(
        self,
        view: QuantView,
        fp_model: nn.Module,
        learn_act_scales: bool,
        probe: torch.Tensor,
        shared_inputs: bool = True,
    ) -> None:
        self.view = view
        # on the backend model's device (a float model the caller keeps on the CPU included)
        device = model_device(view.model)
        self.model = copy_model(fp_model).eval().to(device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.acts: dict[str, tuple[ActQuantizer, Any]] = {}  # handle name -> (sim, handle)
        self.layers: dict[str, tuple[SimLayer, QuantLayer]] = {}
        for layer in view.layers():
            try:
                module = self.model.get_submodule(layer.name)
            except AttributeError:
                raise ValueError(
                    f"the float model has no module {layer.name!r}, which the {view.backend} "
                    "model's quantized layer of that name comes from: pass the float model the "
                    "quantized one was made from"
                ) from None
            if not isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear):
                raise ValueError(
                    f"the float model's {layer.name!r} is a {type(module).__name__}, not the conv "
                    f"/ linear the {view.backend} model quantizes there"
                )
            if tuple(module.weight.shape) != tuple(layer.weight.shape):
                raise ValueError(
                    f"the float model's {layer.name!r} has weight shape "
                    f"{tuple(module.weight.shape)}, the quantized one {tuple(layer.weight.shape)}"
                )
            wq = layer.weight_quantizer
            weight_grid = wq.grid() if wq is not None and wq.enabled else None
            act = None
            aq = layer.input_quantizer
            if aq is not None and aq.enabled:
                if aq.name not in self.acts:
                    quantizer = ActQuantizer(aq.grid(), learn_act_scales).to(device)
                    self.acts[aq.name] = (quantizer, aq)
                act = self.acts[aq.name][0]
            rounded = view.weight_quantizer_input(layer)
            sim = SimLayer(module, layer.weight.detach().clone(), rounded, weight_grid, act)
            self.model.set_submodule(layer.name, sim)
            self.layers[layer.name] = (sim, layer)
        if shared_inputs:
            self._quantize_shared_block_inputs(probe)
        # By name: a view hands out new handle objects on every call.
        simulated = set(self.acts) | {
            layer.weight_quantizer.name
            for _, layer in self.layers.values()
            if layer.weight_quantizer is not None
        }
        self.unsimulated = [
            q.name for q in view.quantizers() if q.enabled and q.name not in simulated
        ]
        if self.unsimulated:
            warnings.warn(
                f"{len(self.unsimulated)} quantizer(s) of this {view.backend} model sit where no "
                f"quantized layer reads its input (e.g. {self.unsimulated[0]}); the simulation "
                "leaves them out, so reconstruction fits a slightly different function than the "
                "backend runs (simulation_gap measures by how much)",
                stacklevel=3,
            )

    def _quantize_shared_block_inputs(self, probe: torch.Tensor) -> None:
        for block in self.view.blocks():
            if not block.layers:
                continue
            first = block.layers[0]
            handle = first.input_quantizer
            if handle is None or not handle.enabled or not handle.shared_by_consumers:
                continue
            try:
                block_module = self.model.get_submodule(block.name)
            except AttributeError:
                continue  # reported by the reconstruction, which needs the block
            sim_layer = self.layers[first.name][0]
            if block_module is sim_layer:
                continue  # the block is the layer: it quantizes its own input already
            # Only where the first layer reads the block's input itself (not, e.g., a norm of it).
            seen: dict[str, torch.Tensor] = {}

            def record(key: str, seen: dict = seen) -> Callable:
                def hook(_m: nn.Module, args: tuple) -> None:
                    seen.setdefault(key, args[0])

                return hook

            hooks = [
                block_module.register_forward_pre_hook(record("block")),
                sim_layer.register_forward_pre_hook(record("layer")),
            ]
            try:
                with torch.no_grad():
                    self.model(probe)
            finally:
                for h in hooks:
                    h.remove()
            if "block" in seen and "layer" in seen and seen["block"] is seen["layer"]:
                act = self.acts[handle.name][0]
                block_module.register_forward_pre_hook(lambda m, a, act=act: (act(a[0]), *a[1:]))

    @contextlib.contextmanager
    def hard_rounding(self) -> Iterator[Simulation]:
        """Every layer's weight rounded as it will be written back (hard), for the block only."""
        layers = [s for s, _ in self.layers.values()]
        hard = [s.hard for s in layers]
        for s in layers:
            s.hard = True
        try:
            yield self
        finally:
            for s, h in zip(layers, hard, strict=True):
                s.hard = h

    def block_layers(self, names: Iterable[str]) -> list[SimLayer]:
        return [self.layers[n][0] for n in names]

    def write_back(self) -> None:
        """Learned rounding and step sizes into the backend's own state (weights snapped)."""
        with torch.no_grad():
            for sim, layer in self.layers.values():
                if sim.rounding is not None:
                    self.view.set_layer_weight(layer, sim.rounding(hard=True))
            for act, handle in self.acts.values():
                if not torch.equal(act.scale, handle.grid().scale.to(act.scale)):
                    handle.set_grid(act.scale.detach().clone(), act.zero_point.detach().clone())


@torch.no_grad()
def simulation_gap(sim: Simulation, qmodel: nn.Module, x: torch.Tensor) -> float:
    """Relative output difference ``||sim(x) - qmodel(x)|| / ||qmodel(x)||`` (eval mode)."""
    with sim.hard_rounding():
        a, b = sim.model(x), qmodel(x)
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


# --- data for the reconstruction -------------------------------------------------------------------
def shifted_views(x: torch.Tensor, gen: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Lightly shifted views of clean images: per-image contrast and brightness jitter plus pixel
    noise, scaled to the data's spread (the domain shifts PEM / PCR brace the model for)."""
    n = x.shape[0]
    shape = (n,) + (1,) * (x.ndim - 1)
    spread = x.std().clamp_min(1e-6)
    # drawn on the generator's device (the CPU), then moved to the images': the same draws on any
    # device, and the same arithmetic on the CPU as before
    contrast = 1 + strength * 0.2 * (2 * torch.rand(shape, generator=gen).to(x.device) - 1)
    brightness = strength * 0.2 * spread * (2 * torch.rand(shape, generator=gen).to(x.device) - 1)
    noise = strength * 0.1 * spread * torch.randn(x.shape, generator=gen).to(x.device)
    mean = x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    return (x - mean) * contrast + mean + brightness + noise


@torch.no_grad()
def _capture(
    model: nn.Module, module: nn.Module, x: torch.Tensor, chunk: int = 256, output: bool = False
) -> torch.Tensor:
    """``module``'s input (or output) when ``model`` runs on ``x``, in chunks."""
    got: list[torch.Tensor] = []

    def pre(_m: nn.Module, args: tuple) -> None:
        if not output:
            got.append(args[0].detach())

    def post(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
        if output:
            got.append(out.detach())

    handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        for i in range(0, x.shape[0], chunk):
            model(x[i : i + chunk])
    finally:
        for h in handles:
            h.remove()
    return torch.cat(got)


@torch.no_grad()
def input_channel_variance(
    fp_model: nn.Module, modules: dict[str, nn.Module], x: torch.Tensor, x_shift: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per input channel, the mean squared difference of each module's input between ``x`` and
    ``x_shift`` in the float model (PEM's ``s_j^2``); channels on dim 1 (conv) or the last (linear)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    clean: dict[str, torch.Tensor] = {}
    phase = ["clean"]

    def hook_for(name: str, linear: bool) -> Callable:
        def hook(_m: nn.Module, args: tuple) -> None:
            a = args[0].detach()
            if phase[0] == "clean":
                clean[name] = a
                return
            d = (a - clean[name]).square()
            d = d.reshape(-1, d.shape[-1]) if linear else d.transpose(0, 1).reshape(d.shape[1], -1)
            s = d.sum(0) if linear else d.sum(1)
            sums[name] = sums.get(name, 0) + s
            counts[name] = counts.get(name, 0) + (d.shape[0] if linear else d.shape[1])

        return hook

    handles = [
        m.register_forward_pre_hook(hook_for(n, isinstance(m, nn.Linear)))
        for n, m in modules.items()
    ]
    try:
        for i in range(0, x.shape[0], 256):
            phase[0] = "clean"
            fp_model(x[i : i + 256])
            phase[0] = "shift"
            fp_model(x_shift[i : i + 256])
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / counts[n] for n in modules}


def pem_term(weight: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """``sum_j s_j^2 ||W_{:,j}||^2 / C_out``: the expected squared output error per output element
    that independent input perturbations of per-channel variance ``s_j^2`` cause through ``W``."""
    per_in = weight.square().reshape(weight.shape[0], weight.shape[1], -1).sum((0, 2))
    return (variance * per_in).sum() / weight.shape[0]


def layer_pem(layer: SimLayer, variance: torch.Tensor, on: str = "error") -> torch.Tensor:
    """PEM of one simulated layer: :func:`pem_term` of its rounding error ``W^ - W`` (``on="error"``)
    or of its quantized weight ``W^`` (``on="weight"``)."""
    w = layer.quantized_weight()
    return pem_term(w - layer.module.weight if on == "error" else w, variance)


def pcr_loss(block: nn.Module, x_shifted: torch.Tensor, clean_output: torch.Tensor) -> torch.Tensor:
    """PCR: the block's output on the shifted view's input, against its (fixed) clean output."""
    return F.mse_loss(block(x_shifted), clean_output.detach())


# --- the reconstruction ------------------------------------------------------------------------------
def _calibration_tensor(calib: Iterable[Any] | torch.Tensor, limit: int) -> torch.Tensor:
    """The first ``limit`` calibration images as one tensor, read lazily (nothing past them); a
    tensor is sliced, not copied (the reconstruction never writes to it)."""
    x = calibration_images(calib, "reconstruction", limit)
    if not torch.isfinite(x).all():
        raise ValueError("calibration batches contain NaN or Inf")
    return x


def reconstruct_view(
    view: QuantView, fp_model: nn.Module, calib: Iterable[Any], config: TTAQConfig
) -> Simulation:
    """Reconstruct ``view.model`` block by block against ``fp_model`` and write the result back
    into it; return the simulation (for :func:`simulation_gap`).

    Runs on ``view.model``'s device: the calibration images and the float model's copies are
    moved there (the caller's ``fp_model`` is not); the random draws come from a CPU generator
    (see the module docstring)."""
    device = model_device(view.model)
    x = _calibration_tensor(calib, config.calib_images).to(device)
    gen = torch.Generator().manual_seed(config.seed)
    fp = copy_model(fp_model).eval().to(device)
    for p in fp.parameters():
        p.requires_grad_(False)
    sim = Simulation(view, fp_model, config.learn_act_scales, x[:8], config.shared_inputs)
    x_shift = shifted_views(x, gen, config.shift_strength) if config.needs_shifted_views else None
    variances: dict[str, torch.Tensor] = {}
    if config.pem:
        modules = {name: fp.get_submodule(name) for name in sim.layers}
        variances = input_channel_variance(fp, modules, x, x_shift)  # type: ignore[arg-type]
    with torch.no_grad():
        p_fp = torch.cat([fp(x[i : i + 256]).softmax(1) for i in range(0, len(x), 256)])
    blocks = [b for b in view.blocks() if b.layers]
    for block in blocks:
        names = [layer.name for layer in block.layers]
        _reconstruct_block(block.name, names, fp, sim, x, x_shift, variances, p_fp, config, gen)
    sim.write_back()
    return sim


def _reconstruct_block(
    name: str,
    layer_names: list[str],
    fp: nn.Module,
    sim: Simulation,
    x: torch.Tensor,
    x_shift: torch.Tensor | None,
    variances: dict[str, torch.Tensor],
    p_fp: torch.Tensor,
    cfg: TTAQConfig,
    gen: torch.Generator,
) -> None:
    try:
        fp_block, q_block = fp.get_submodule(name), sim.model.get_submodule(name)
    except AttributeError:
        raise ValueError(
            f"the float model has no module {name!r} for the block of that name"
        ) from None
    x_fp = _capture(fp, fp_block, x)
    y_fp = _capture(fp, fp_block, x, output=True)
    x_q = _capture(sim.model, q_block, x)
    x_qs = _capture(sim.model, q_block, x_shift) if cfg.pcr and x_shift is not None else None
    layers = sim.block_layers(layer_names)
    rounding = [s.rounding for s in layers if s.rounding is not None]
    acts = {id(s.act): s.act for s in layers if s.act is not None and s.act.scale.requires_grad}
    groups = []
    if rounding:
        groups.append({"params": [r.V for r in rounding], "lr": cfg.lr_round})
    if acts:
        groups.append({"params": [a.scale for a in acts.values()], "lr": cfg.lr_scale})
    if not groups:
        return
    optimizer = torch.optim.Adam(groups)
    replaced: list[torch.Tensor | None] = [None]

    def substitute(_m: nn.Module, _a: tuple, _out: torch.Tensor) -> torch.Tensor | None:
        return replaced[0]

    hook = fp_block.register_forward_hook(substitute) if cfg.logits else None
    warm = int(cfg.warmup * cfg.iters)
    bar = tqdm(
        range(cfg.iters),
        desc=f"{cfg.method} {name}",
        disable=not show_progress(cfg.progress),
        leave=False,
    )
    try:
        for it in bar:
            # drawn on the CPU generator, then moved to the data's device (see the module doc)
            idx = torch.randint(0, x.shape[0], (min(cfg.batch_size, x.shape[0]),), generator=gen)
            idx = idx.to(x.device)
            xin = x_q[idx]
            if cfg.qdrop_p:
                keep_fp = (torch.rand(xin.shape, generator=gen) < cfg.qdrop_p).to(xin.device)
                xin = torch.where(keep_fp, x_fp[idx], xin)
            out = q_block(xin)
            loss = F.mse_loss(out, y_fp[idx])
            if it >= warm and rounding:
                progress = (it - warm) / max(1, cfg.iters - warm)
                beta = cfg.beta_end + (cfg.beta_start - cfg.beta_end) * (1 - progress)
                loss = loss + cfg.round_weight * sum(r.regulariser(beta) for r in rounding)
            if cfg.pem and cfg.pem_weight:
                pem = sum(
                    layer_pem(s, variances[n], cfg.pem_on)
                    for s, n in zip(layers, layer_names, strict=True)
                )
                loss = loss + cfg.pem_weight * pem
            if x_qs is not None and cfg.pcr_weight:
                with torch.no_grad():
                    target = out if not cfg.qdrop_p else q_block(x_q[idx])
                loss = loss + cfg.pcr_weight * pcr_loss(q_block, x_qs[idx], target)
            if hook is not None and cfg.logits_weight:
                replaced[0] = out
                logits = fp(x[idx])
                replaced[0] = None
                kl = F.kl_div(logits.log_softmax(1), p_fp[idx], reduction="batchmean")
                loss = loss + cfg.logits_weight * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for a in acts.values():
                    a.scale.clamp_(min=1e-8)
    finally:
        if hook is not None:
            hook.remove()
    for s in layers:
        s.hard = True
    for a in acts.values():
        a.scale.requires_grad_(False)


# --- the plugin -----------------------------------------------------------------------------------
@hookimpl
def qtta_methods() -> list[MethodInfo]:
    summary = {
        "brecq": "PTQ reconstruction: block-wise AdaRound + LSQ step sizes (BRECQ)",
        "qdrop": "PTQ reconstruction: BRECQ with QDrop's mixed block inputs",
        "ttaq": "PTQ reconstruction stable under shift: QDrop + PEM + PCR + L_logits (TTAQ)",
    }
    return [
        MethodInfo(name, "reconstruct", text, needs_backward=True, config_cls=TTAQConfig)
        for name, text in summary.items()
    ]


@hookimpl
def qtta_reconstruct(
    qmodel: nn.Module, fp_model: nn.Module, calib: Iterable[Any], config: ReconstructConfig
) -> nn.Module | None:
    if config.method not in RECONSTRUCTION_METHODS:
        return None
    if not isinstance(config, TTAQConfig):
        config = TTAQConfig(method=config.method, seed=config.seed)
    from .. import quant_view  # the core's recognition, at call time (the core imports us)

    reconstruct_view(quant_view(qmodel), fp_model, calib, config)
    return qmodel

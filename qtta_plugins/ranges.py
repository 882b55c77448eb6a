"""Range search shared by the adapters: the clipping ratio with the least quantization error.

Min-max ranges leave 2- to 4-bit grids nearly empty (most values round to zero); shrinking the range
to the ratio of the min-max one whose quantization error is least is the usual PTQ fix (BRECQ /
QDrop initialise their weight scales so). Each adapter quantizes with its backend's own grid, so it
passes that as ``error``; the search itself lives here once.

Activations below 8 bit: each backend sets the shared percentile rule (:class:`ActivationRange`),
then :func:`search_activation_ranges` (called by :func:`qtta_plugins.quantize` for every backend,
through the uniform view) picks per quantizer the rule whose model output is closest to the float
model's on the calibration images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .fakequant import fake_quant
from .view import Grid, QuantizerHandle, QuantView, fake_quantize


def least_error_ratio(
    ratios: Iterable[float | torch.Tensor], error: Callable[[float], torch.Tensor]
) -> torch.Tensor:
    """Per group (a channel, or one tensor), the ratio whose ``error(ratio)`` is least.

    ``error(ratio)`` returns the quantization error of every group with the range scaled by
    ``ratio`` (a tensor of per-group errors, or a 0-d one). On ties the earlier ratio wins. Returns
    the chosen ratios, shaped as the errors.
    """
    best_err: torch.Tensor | None = None
    best: torch.Tensor | None = None
    for ratio in ratios:
        r = float(ratio)
        err = error(r)
        if best_err is None or best is None:
            best_err, best = err, torch.full_like(err, r)
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    if best is None:
        raise ValueError("least_error_ratio needs at least one ratio")
    return best


def symmetric_weight_error(w: torch.Tensor, qmax: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per output channel of ``w`` (``(C, ...)``), the squared error of symmetric round-to-nearest
    quantization on ``[-qmax, qmax]`` with threshold ``threshold`` (``(C,)``)."""
    flat = w.detach().reshape(w.shape[0], -1)

    def error(threshold: torch.Tensor) -> torch.Tensor:
        scale = (threshold / qmax)[:, None]
        return ((fake_quant(flat, scale, None, -qmax, qmax) - flat) ** 2).sum(1)

    return error


def mse_symmetric_thresholds(w: torch.Tensor, qmax: int, steps: int = 100) -> torch.Tensor:
    """Per output channel of ``w`` (``(C, ...)``), the symmetric clipping threshold among ``steps``
    fractions of the channel's absolute maximum whose round-to-nearest error on ``[-qmax, qmax]``
    is least (``(C,)``). What Brevitas' and torchao's weight ranges use."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    flat = w.detach().reshape(w.shape[0], -1).float()
    absmax = flat.abs().amax(1).clamp_min(1e-8)
    error = symmetric_weight_error(flat, qmax)
    fractions = torch.linspace(1.0 / steps, 1.0, steps)
    ratio = least_error_ratio(fractions, lambda r: error(r * absmax))
    return ratio * absmax


# Activation ranges, the rule every backend sets below 8 bit (the search below starts there): per
# calibration batch, the 99.999th percentile of the values (Brevitas' default activation statistic,
# ``AbsPercentile`` / ``PercentileInterval``), averaged over the batches. On the digits CNN, min-max
# over the whole calibration set let the rarest value set the step (torchao's 4-bit steps 1.0-1.5x
# Brevitas' layer by layer, 9.5 points of W2A4 accuracy), and a least-MSE clip overcorrected at 4
# bit (NNCF's steps 0.4-0.8x, 5 points of W4A4). On an MNIST CNN the same rule cost 17-19 points of
# W4A4 against the search (docs/backends.md): no one rule is best everywhere.
HIGH_PERCENTILE = 99.999


def percentile(x: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-th percentile (0..100) of all of ``x``'s values (nearest rank, as
    ``torch.kthvalue``; ``torch.quantile`` refuses tensors over 2**24 elements)."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q!r}")
    flat = x.detach().reshape(-1).float()
    if flat.numel() == 0:
        raise ValueError("percentile of an empty tensor")
    k = min(max(round(q / 100.0 * flat.numel()), 1), flat.numel())
    return flat.kthvalue(k).values


class ActivationRange:
    """Running activation statistics for one quantizer: per batch the ``high`` percentile of
    ``|x|`` (a symmetric range's threshold) and the ``100 - high`` / ``high`` percentiles of ``x``
    (an asymmetric range's ends), averaged over the batches seen."""

    def __init__(self, high: float = HIGH_PERCENTILE) -> None:
        self.high = high
        self._abs: list[torch.Tensor] = []
        self._low: list[torch.Tensor] = []
        self._high: list[torch.Tensor] = []

    def update(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        self._abs.append(percentile(x.abs(), self.high))
        self._low.append(percentile(x, 100.0 - self.high))
        self._high.append(percentile(x, self.high))

    @property
    def batches(self) -> int:
        return len(self._abs)

    def threshold(self) -> torch.Tensor:
        """The symmetric clipping threshold: mean over batches of the percentile of ``|x|``."""
        if not self._abs:
            raise ValueError("ActivationRange saw no batch")
        return torch.stack(self._abs).mean()

    def interval(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The asymmetric range ``(low, high)``, widened to hold 0 (so that 0 is on the grid)."""
        if not self._low:
            raise ValueError("ActivationRange saw no batch")
        low = torch.stack(self._low).mean().clamp(max=0.0)
        high = torch.stack(self._high).mean().clamp(min=0.0)
        return low, high


# --- the per-layer search over range rules --------------------------------------------------------
# No single activation rule is best everywhere (measured: the percentile rule lowered W2A4 after
# QDrop on Brevitas and NNCF where each backend's own rule did better, and raised it on torchao). So
# below 8 bit every backend starts from the shared percentile rule, then this search gives each
# activation quantizer, one at a time in forward order, the candidate range (percentile, min-max,
# least error) with which the quantized model's output on the calibration batches is closest to the
# float model's. It starts from the best of the three rules applied everywhere and keeps a change
# only when the error falls, so on the calibration batches it is never worse than any one rule.

#: the activation range rules the search chooses between, per quantizer
RANGE_RULES: tuple[str, ...] = ("percentile", "min-max", "least-error")
#: values kept per quantizer and calibration batch for the least-error candidate (a seeded draw)
_SAMPLE_PER_BATCH = 1 << 13
#: calibration images the search compares outputs on (each trial forwards them all)
SEARCH_IMAGES = 256


def search_batches(
    batches: Sequence[torch.Tensor], images: int = SEARCH_IMAGES
) -> list[torch.Tensor]:
    """The first calibration batches holding ``images`` images (the last one cut to fit)."""
    kept: list[torch.Tensor] = []
    count = 0
    for b in batches:
        if count >= images:
            break
        kept.append(b[: images - count])
        count += len(kept[-1])
    return kept


@dataclass
class RangeSearch:
    """What :func:`search_activation_ranges` chose: the rule of each activation quantizer it
    searched (by handle name), and the calibration output error (mean squared difference of the
    logits from the float model's) of each rule applied everywhere and of the chosen mix."""

    rules: dict[str, str]
    uniform_error: dict[str, float]
    error: float

    def counts(self) -> dict[str, int]:
        """How many quantizers took each rule."""
        return {rule: sum(r == rule for r in self.rules.values()) for rule in RANGE_RULES}


class _Observed:
    """What one activation quantizer saw on the calibration batches: min, max and a sample."""

    def __init__(self, seed: int) -> None:
        self.low = torch.tensor(float("inf"))
        self.high = torch.tensor(float("-inf"))
        self.samples: list[torch.Tensor] = []
        self.gen = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).float()
        if flat.numel() == 0:
            return
        self.low = torch.minimum(self.low, flat.min())
        self.high = torch.maximum(self.high, flat.max())
        if flat.numel() > _SAMPLE_PER_BATCH:
            pick = torch.randint(flat.numel(), (_SAMPLE_PER_BATCH,), generator=self.gen)
            flat = flat[pick]
        self.samples.append(flat.clone())


def _grid_for(grid: Grid, low: torch.Tensor, high: torch.Tensor, free_zero_point: bool) -> Grid:
    """The grid of ``grid``'s integer range that covers ``[low, high]`` (0 always inside): an
    asymmetric one where the quantizer can take a zero point, else around its fixed zero point."""
    low, high = low.clamp(max=0.0), high.clamp(min=0.0)
    qmin, qmax = grid.qmin, grid.qmax
    if free_zero_point:
        scale = ((high - low) / (qmax - qmin)).clamp_min(1e-8)
        zero_point = torch.clamp(torch.round(qmin - low / scale), qmin, qmax)
        return grid.with_values(
            scale.reshape(grid.scale.shape), zero_point.reshape(grid.scale.shape)
        )
    z = grid.zero_point
    scale = torch.zeros(())
    if qmax > z:
        scale = torch.maximum(scale, high / (qmax - z))
    if z > qmin:
        scale = torch.maximum(scale, -low / (z - qmin))
    return grid.with_values(scale.clamp_min(1e-8).reshape(grid.scale.shape))


def _least_error_grid(grid: Grid, seen: _Observed, free_zero_point: bool, steps: int = 100) -> Grid:
    """The fraction of the min-max range (1/steps .. 1) whose grid quantizes the sampled values
    with the least squared error."""
    sample = torch.cat(seen.samples)
    fractions = torch.linspace(1.0 / steps, 1.0, steps)

    def error(r: float) -> torch.Tensor:
        g = _grid_for(grid, seen.low * r, seen.high * r, free_zero_point)
        return ((fake_quantize(sample, g) - sample) ** 2).mean()

    ratio = float(least_error_ratio(fractions, error))
    return _grid_for(grid, seen.low * ratio, seen.high * ratio, free_zero_point)


def _takes_zero_point(handle: QuantizerHandle, grid: Grid) -> bool:
    """Whether ``handle`` stores a zero point other than its current one (tried, then put back)."""
    other = grid.zero_point + (1 if float(grid.zero_point) < grid.qmax else -1)
    try:
        handle.set_grid(grid.scale, other)
    except NotImplementedError:
        return False
    handle.set_grid(grid.scale, grid.zero_point)
    return True


def searchable_activation_quantizers(view: QuantView, below_bits: int = 8) -> list[QuantizerHandle]:
    """The view's enabled activation quantizers under ``below_bits`` with a fixed per-tensor grid
    the search can read and write, and an input it can observe."""
    found = []
    for handle in view.quantizers():
        if handle.role != "act" or not handle.enabled or handle.bits >= below_bits:
            continue
        try:
            grid = handle.grid()
            handle.input_module()
        except NotImplementedError:
            continue  # dynamic (per-token) quantizers, or a backend that cannot show the input
        if grid.ch_axis is None:
            found.append(handle)
    return found


@torch.no_grad()
def search_activation_ranges(
    view: QuantView,
    float_model: nn.Module,
    batches: Sequence[torch.Tensor],
    *,
    rule: str = "search",
    below_bits: int = 8,
    seed: int = 0,
) -> RangeSearch:
    """Set the range of each activation quantizer of ``view`` below ``below_bits``: ``rule="search"``
    gives each the range among :data:`RANGE_RULES` with which the quantized model's output on
    ``batches`` is closest to ``float_model``'s; a rule of :data:`RANGE_RULES` applies that rule to
    every quantizer. Written into the backend's own quantizers through
    :meth:`~qtta_plugins.view.QuantizerHandle.set_grid`.

    "percentile" is each quantizer's range as the backend set it (the shared percentile rule);
    "min-max" and "least-error" are computed from what the quantizer sees on ``batches`` in the
    quantized model as the backend left it. The search starts from the best rule applied
    everywhere, then tries the others on each quantizer in forward order, keeping a change only
    where the output error falls. The quantized model runs with its source norm statistics and the
    float model in eval mode (both put back after); ``float_model`` is only read. ``seed`` draws
    the values the least-error candidate is fitted on.
    """
    if rule != "search" and rule not in RANGE_RULES:
        raise ValueError(f"rule must be 'search' or one of {', '.join(RANGE_RULES)}, got {rule!r}")
    handles = searchable_activation_quantizers(view, below_bits)
    if not handles:
        return RangeSearch({}, {}, float("nan"))
    model = view.model
    with _source_norms(view), _eval_mode(float_model):
        candidates = _candidates(model, handles, batches, seed)
        reference = [float_model(b) for b in batches]

        def apply(choice: dict[str, str]) -> None:
            for h in handles:
                g = candidates[h.name][choice[h.name]]
                h.set_grid(g.scale, g.zero_point)

        rules = RANGE_RULES if rule == "search" else (rule,)
        uniform = {}
        for r in rules:
            apply({h.name: r for h in handles})
            uniform[r] = _output_error(model, batches, reference)
        start = min(rules, key=lambda r: uniform[r])  # ties: the earlier rule
        choice = {h.name: start for h in handles}
        apply(choice)
        best = uniform[start]
        for h in handles if rule == "search" else ():
            for r in RANGE_RULES:
                if r == choice[h.name]:
                    continue
                g = candidates[h.name][r]
                h.set_grid(g.scale, g.zero_point)
                err = _output_error(model, batches, reference)
                if err < best:
                    best, choice[h.name] = err, r
                else:
                    kept = candidates[h.name][choice[h.name]]
                    h.set_grid(kept.scale, kept.zero_point)
        return RangeSearch(choice, uniform, best)


def _candidates(
    model: nn.Module,
    handles: Sequence[QuantizerHandle],
    batches: Sequence[torch.Tensor],
    seed: int,
) -> dict[str, dict[str, Grid]]:
    """Per quantizer, the grid of each rule, from what it sees on ``batches``."""
    seen = {h.name: _Observed(seed + i) for i, h in enumerate(handles)}
    hooks = [
        h.input_module().register_forward_pre_hook(
            lambda _m, args, _s=seen[h.name]: _s.update(_tensor_of(args[0]))
        )
        for h in handles
    ]
    try:
        for b in batches:
            model(b)
    finally:
        for hook in hooks:
            hook.remove()
    candidates: dict[str, dict[str, Grid]] = {}
    for h in handles:
        grid, s = h.grid(), seen[h.name]
        if not s.samples:
            raise RuntimeError(f"{h.name}: the search saw no input reach this quantizer")
        free = _takes_zero_point(h, grid)
        candidates[h.name] = {
            "percentile": grid,
            "min-max": _grid_for(grid, s.low, s.high, free),
            "least-error": _least_error_grid(grid, s, free),
        }
    return candidates


def _tensor_of(x: object) -> torch.Tensor:
    """The plain tensor of a quantizer's input (Brevitas may pass a ``QuantTensor``)."""
    return x if isinstance(x, torch.Tensor) else x.value  # type: ignore[attr-defined]


def _output_error(
    model: nn.Module, batches: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]
) -> float:
    total, count = 0.0, 0
    for b, ref in zip(batches, reference, strict=True):
        out = _tensor_of(model(b))
        total += float(((out.float() - ref.float()) ** 2).sum())
        count += ref.numel()
    return total / max(count, 1)


@contextmanager
def _source_norms(view: QuantView) -> Iterator[None]:
    mode = view.norm_mode
    view.set_norm_mode("source")
    try:
        yield
    finally:
        view.set_norm_mode(mode)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag

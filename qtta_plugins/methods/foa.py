"""``foa``: Forward-Optimization Adaptation (Niu et al., ICML 2024), the forward-only baseline.

FOA learns a small input-side parameter set with CMA-ES (the ``cma`` package), using forward passes
only. For ViTs the paper learns three prompt tokens; our models are image models of any backend
(including integer graphs whose token stream we cannot reach), so the parameters live on the input
image, which every model has: a low-resolution additive prompt per channel (``prompt_grid`` x
``prompt_grid``, upsampled bilinearly to the image) plus a per-channel gain and bias. That is our
"equivalent small input-side parameter set" for CNNs (DESIGN §4), and it is a parameter.

Per batch: one pass with the incumbent (the previous best), whose output is the prediction and which
feeds the output shift; then ``population`` candidates from ``es.ask()``, one pass each; fitness
``sum_i H(p_i) + lambda * sum_f (||mean_f - mean_f^src||_2 + ||std_f - std_f^src||_2)`` with
``lambda = 0.4 * batch / 64`` (the paper's); ``es.tell``; the best candidate becomes the incumbent.
``1 + population`` = 28 forward passes per batch by default. Batch norms use test-batch statistics
(``batch_stats``), as ZOA's do, so the two are compared on the same footing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdaptConfig
from ..hookspecs import hookimpl
from ..view import QuantView
from .base import MethodInfo, TestTimeMethod
from .features import (
    FeatureRecorder,
    feature_layers,
    kept_statistics,
    source_batches,
    source_input_shape,
    source_statistics,
)
from .tent import softmax_entropy


@dataclass
class FOAConfig(AdaptConfig):
    """FOA's options (see the module docstring)."""

    method: str = "foa"
    population: int = 27  # CMA-ES candidates per batch (+1 pass with the incumbent)
    sigma0: float = 0.1  # CMA-ES initial step size, in input units (images in [0, 1])
    prompt_grid: int = 4  # side of the low-resolution additive prompt; 0: none
    affine: bool = True  # per-channel input gain and bias
    align_weight: float | None = None  # lambda; None: 0.4 * batch / 64
    shift: bool = True
    shift_momentum: float = 0.9
    batch_stats: bool = True
    feature_layers: str = "blocks"
    source_batch_size: int = 64
    source_data: Any = None  # as ZOAConfig.source_data

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.population, int) or self.population < 2:
            raise ValueError(f"FOAConfig.population must be an int >= 2, got {self.population!r}")
        if not (math.isfinite(self.sigma0) and self.sigma0 > 0):
            raise ValueError(f"FOAConfig.sigma0 must be positive, got {self.sigma0!r}")
        if self.prompt_grid < 0 or (self.prompt_grid == 0 and not self.affine):
            raise ValueError("FOAConfig: needs a prompt (prompt_grid >= 1) or affine=True")
        if not 0 <= self.shift_momentum < 1:
            raise ValueError(
                f"FOAConfig.shift_momentum must be in [0, 1), got {self.shift_momentum!r}"
            )


class _RandN:
    """CMA-ES's normal sampler on a generator we own (so state is saved, restored and seeded here
    instead of in numpy's global RNG)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


class InputPrompt:
    """``x * (1 + gain) + bias + upsample(prompt)``, per channel, from one flat parameter vector."""

    def __init__(self, channels: int, size: tuple[int, int], grid: int, affine: bool) -> None:
        self.channels, self.size, self.grid, self.affine = channels, size, grid, affine
        self.dim = channels * grid * grid + (2 * channels if affine else 0)

    def __call__(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        c = self.channels
        offset = 0
        if self.affine:
            gain, bias = theta[:c], theta[c : 2 * c]
            x = x * (1 + gain).view(1, c, 1, 1) + bias.view(1, c, 1, 1)
            offset = 2 * c
        if self.grid:
            prompt = theta[offset:].view(1, c, self.grid, self.grid)
            x = x + F.interpolate(prompt, size=self.size, mode="bilinear", align_corners=False)
        return x


class FOA(TestTimeMethod):
    needs_backward = False

    def __init__(self, view: QuantView, config: FOAConfig) -> None:
        import cma  # the real CMA-ES; imported here so the core does not need it

        super().__init__(view, config)
        shape = getattr(view, "sample_shape", None)
        batches = source_batches(view, config.source_data, config.source_batch_size)
        if shape is None and batches:
            shape = tuple(batches[0].shape[1:])
        if shape is None:  # as the calibration data had it
            shape = source_input_shape(view)
        if shape is None or len(shape) != 3:
            raise ValueError(
                "method 'foa' needs image inputs (C, H, W) and a known input shape: pass "
                "source_data=..., or use a model quantized by qtta_plugins.quantize"
            )
        self.prompt = InputPrompt(shape[0], (shape[1], shape[2]), config.prompt_grid, config.affine)
        view.freeze()
        if config.batch_stats and any(n.has_statistics for n in view.norms()):
            view.set_norm_mode("batch")
        layers = feature_layers(view, config.feature_layers)
        self.recorder = FeatureRecorder(view, layers)
        self.recorder.shift_momentum = config.shift_momentum
        if batches:
            found = source_statistics(view, self.recorder, batches)
        else:  # what quantize measured on its calibration data (None: warned why)
            found = kept_statistics(
                view, self.recorder, layers, None, config.source_batch_size, "foa"
            )
        self.source_stats = found[0] if found is not None else None
        if self.source_stats is not None and config.shift:
            self.recorder.shift_target = self.source_stats[-1].mean
        self._cma = cma
        self.theta = torch.zeros(self.prompt.dim)  # the incumbent
        self._hook = view.model.register_forward_pre_hook(self._apply_prompt)
        self._init_state()

    def _init_state(self) -> None:
        cfg = self.config
        self.randn = _RandN(cfg.seed)
        self.es = self._cma.CMAEvolutionStrategy(
            np.zeros(self.prompt.dim),
            cfg.sigma0,
            {"popsize": cfg.population, "randn": self.randn, "verbose": -9, "seed": cfg.seed + 1},
        )
        self.theta = torch.zeros(self.prompt.dim)
        self._current: torch.Tensor | None = None
        self.recorder.reset_shift()

    def _apply_prompt(self, module: nn.Module, args: tuple) -> tuple:
        theta = self._current if self._current is not None else self.theta
        x = args[0]  # theta stays on the CPU with CMA-ES; the prompt follows the batch
        return (self.prompt(x, theta.to(device=x.device, dtype=x.dtype)), *args[1:])

    def _fitness(self, logits: torch.Tensor) -> float:
        fitness = softmax_entropy(logits).sum()
        if self.source_stats is not None:
            lam = self.config.align_weight
            lam = 0.4 * logits.shape[0] / 64 if lam is None else lam
            for s, src in zip(self.recorder.collected(), self.source_stats, strict=True):
                fitness = fitness + lam * ((s.mean - src.mean).norm() + (s.std - src.std).norm())
        return float(fitness)

    def adapted_parameters(self) -> list[nn.Parameter]:
        return self.recorder.tensors()  # the output shift's head bias (the prompt is a hook)

    @torch.no_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        with self.recorder.attached():  # the recording hooks for this step only
            return self._step(x)

    def _step(self, x: torch.Tensor) -> torch.Tensor:
        recorder = self.recorder
        # The prediction: the incumbent, with the output shift (its EMA sees this batch once).
        self._current = None
        recorder.shift_enabled, recorder.update_ema = True, True
        logits = self.view.model(x)
        # The population: no shift, the fitness judges the prompt alone.
        recorder.shift_enabled = False
        candidates = self.es.ask()
        fitnesses = []
        try:
            for candidate in candidates:
                self._current = torch.as_tensor(candidate, dtype=torch.float32)
                recorder.clear()
                fitnesses.append(self._fitness(self.view.model(x)))
        finally:
            self._current = None
            recorder.shift_enabled = True
            recorder.apply_shift()  # the population ran without it: the prediction's shift back
        self.es.tell(candidates, fitnesses)
        self.theta = torch.as_tensor(candidates[int(np.argmin(fitnesses))], dtype=torch.float32)
        return logits

    def reset(self) -> None:
        self._init_state()

    def state_dict(self) -> dict[str, Any]:
        return {
            "es": self.es,
            "theta": self.theta.clone(),
            **self.recorder.shift_state(),
        }

    def _copy_state(self) -> dict[str, Any]:
        import copy

        state = self.state_dict()
        state["es"] = copy.deepcopy(self.es)  # holds its sampler, and so the RNG state
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import copy

        if state["theta"].shape != self.theta.shape:
            raise ValueError("FOA state does not match this model's input prompt")
        self.es = copy.deepcopy(state["es"])
        self.randn = self.es.opts["randn"]
        self.theta = state["theta"].clone()
        self.recorder.load_shift_state(state)


@hookimpl
def qtta_methods() -> list[MethodInfo]:
    return [
        MethodInfo(
            "foa",
            "adapt",
            "forward-only: CMA-ES on an input prompt (28 passes)",
            config_cls=FOAConfig,
        )
    ]


@hookimpl
def qtta_adapt(view: QuantView, config: AdaptConfig) -> TestTimeMethod | None:
    if config.method != "foa":
        return None
    if not isinstance(config, FOAConfig):
        config = FOAConfig(seed=config.seed)
    return FOA(view, config)

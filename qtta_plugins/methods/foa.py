"""``foa``: Forward-Optimization Adaptation (Niu et al., ICML 2024), the forward-only baseline.

FOA learns a small input-side parameter set with CMA-ES (the ``cma`` package), using forward passes
only. Two forms of that set (``prompt``):

- ``"tokens"``, the paper's: ``prompt_tokens`` (3) learned tokens of the model's width, inserted
  after the class token of a timm ``VisionTransformer`` (after the position embedding, before the
  first block) and taken out again before the final norm, so every block attends to them and the
  pooled feature keeps its meaning whatever the pooling. Any backend whose quantized model is the
  eager timm model has the token sequence; torchao's exported graph gets the two insertions in its
  graph (:class:`GraphTokenPrompt`).
- ``"image"``, our own stand-in for models without a token sequence (CNNs): a low-resolution
  additive prompt per channel (``prompt_grid`` x ``prompt_grid``, upsampled bilinearly to the
  image) plus a per-channel gain and bias, from zero with step size ``sigma0`` (0.1, in input
  units). Not the paper's method: the paper prompts ViTs only.

``"auto"`` (default) takes the tokens where the model has them, else the image prompt.

One batch, as the authors' code runs it (mr-eggplant/FOA, ``tta_library/foa.py``; read, not
copied - its licence is non-commercial):

1. Candidates: ``population`` (27) prompts from ``es.ask()`` plus the previous best prompt, one
   forward pass each (28 passes). The first batch's previous best is the VPT initialisation
   (uniform in +-sqrt(6 / (3 * patch^2 + width))); CMA-ES itself starts at zero with step size
   ``sigma0`` (1.0).
2. Fitness of each: ``sum_i H(p_i) + lambda * sum_f (||std_f - std_f^src||^2 +
   ||mean_f - mean_f^src||^2)``, ``lambda = 0.4 * batch / 64``, entropy on the unshifted logits.
   Features ``f`` on a ViT (``features="class_token"``): the class token at the input of every
   block's first layer (its ``norm1`` output) and at the head (the final norm's class token);
   statistics over the batch (unbiased std), the source's over all clean images at once. The first
   block's class token does not depend on the image, so it adds nothing: these are the authors'
   features. On CNNs: pooled stage outputs, the source's averaged over batches (``"mean"``).
3. ``es.tell`` with all 28; the best candidate (the previous best among them) becomes the
   incumbent, and its output, with the output shift, is the prediction.
4. Output shift: the head sees ``f + (mean_src - m)``, ``m`` an EMA (weight ``shift_decay``
   0.9 kept) of the batch means of the head's input over all of a batch's passes, started at the
   first batch's and updated after predicting (the first batch is predicted unshifted). The shift
   lives in the head's bias (``b + W_q @ shift``), so between batches the model is the backend's
   own model with the incumbent prompt and the shift for the next batch.

Each step that differs from our FOA before issue 34 has a switch that puts the old one back, so
its effect can be measured (``benchmarks/foa_fidelity.py``): ``fitness="norm"`` (L2 norms, not
squared), ``features="mean"`` (all-token means, averaged over source batches), ``predict=
"incumbent"`` (an extra pass with the previous best gives the prediction; CMA-ES is told only its
27), ``shift_update="prediction"`` (the EMA takes the predicting pass's mean, this batch included,
before predicting) and ``cma_start="prompt"`` (CMA-ES centred at the VPT initialisation). Batch
norms use test-batch statistics (``batch_stats``), as ZOA's do.

Over 500 lines: one method read top to bottom, the algorithm and each place it follows or departs from the authors' code written next to the line that does it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..config import AdaptConfig, Renamed
from ..features import (
    FeatureRecorder,
    feature_layers,
    kept_statistics,
    source_batches,
    source_input_shape,
    source_statistics,
)
from ..hookspecs import hookimpl
from ..view import QuantView
from .base import MethodInfo, TestTimeMethod
from .tent import softmax_entropy


@dataclass
class FOAConfig(AdaptConfig):
    """FOA's options (see the module docstring). The defaults are the authors' FOA; ``fitness``,
    ``features``, ``predict``, ``shift_update`` and ``cma_start`` each put one step of our FOA
    before issue 34 back, for ablations."""

    renamed_options: ClassVar[dict[str, Renamed]] = {
        "shift_momentum": Renamed("shift_decay", how="the same value: the weight kept"),
    }

    method: str = "foa"
    population: int = 27  # CMA-ES candidates per batch (+ the previous best: 28 passes)
    prompt: str = "auto"  # "tokens" (ViTs, the paper's), "image" (any model), "auto"
    prompt_tokens: int = 3  # the paper's number of prompt tokens
    # CMA-ES initial step size; None: 1.0 for tokens (the authors' code), 0.1 for the image
    # prompt (input units, images in [0, 1])
    sigma0: float | None = None
    prompt_grid: int = 4  # image prompt: side of the low-resolution additive prompt; 0: none
    affine: bool = True  # image prompt: per-channel input gain and bias
    align_weight: float | None = None  # lambda; None: 0.4 * batch / 64
    fitness: str = "squared"  # "squared" (the authors') or "norm" (L2 norms)
    # "class_token" (the authors', where the model has one), "mean" (all tokens / pooled maps),
    # "auto": the class token on a model with a token sequence, else "mean"
    features: str = "auto"
    predict: str = "best"  # "best" (this batch's best candidate) or "incumbent" (a pass of its own)
    shift_update: str = "candidates"  # "candidates" (the authors') or "prediction"
    cma_start: str = "zero"  # "zero" (the authors') or "prompt" (centred at the VPT init)
    shift: bool = True
    shift_decay: float = 0.9  # the shift EMA's weight on the old value
    batch_stats: bool = True
    feature_layers: str = "blocks"
    source_batch_size: int = 64
    source_data: Any = None  # as ZOAConfig.source_data

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.population, int) or self.population < 2:
            raise ValueError(f"FOAConfig.population must be an int >= 2, got {self.population!r}")
        if self.sigma0 is not None and not (
            isinstance(self.sigma0, int | float) and math.isfinite(self.sigma0) and self.sigma0 > 0
        ):
            raise ValueError(f"FOAConfig.sigma0 must be positive or None, got {self.sigma0!r}")
        for name, allowed in (
            ("prompt", ("auto", "tokens", "image")),
            ("fitness", ("squared", "norm")),
            ("features", ("auto", "class_token", "mean")),
            ("predict", ("best", "incumbent")),
            ("shift_update", ("candidates", "prediction")),
            ("cma_start", ("zero", "prompt")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"FOAConfig.{name} must be one of {', '.join(map(repr, allowed))}, got "
                    f"{getattr(self, name)!r}"
                )
        if isinstance(self.prompt_tokens, bool) or not (
            isinstance(self.prompt_tokens, int) and self.prompt_tokens >= 1
        ):
            raise ValueError(
                f"FOAConfig.prompt_tokens must be an int >= 1, got {self.prompt_tokens!r}"
            )
        if self.prompt_grid < 0 or (self.prompt_grid == 0 and not self.affine):
            raise ValueError("FOAConfig: needs a prompt (prompt_grid >= 1) or affine=True")
        if not 0 <= self.shift_decay < 1:
            raise ValueError(f"FOAConfig.shift_decay must be in [0, 1), got {self.shift_decay!r}")


class _RandN:
    """CMA-ES's normal sampler on a generator we own (so state is saved, restored and seeded here
    instead of in numpy's global RNG)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


class InputPrompt:
    """``x * (1 + gain) + bias + upsample(prompt)``, per channel, from one flat parameter vector."""

    kind = "image"
    skip_tokens = None

    def __init__(self, channels: int, size: tuple[int, int], grid: int, affine: bool) -> None:
        self.channels, self.size, self.grid, self.affine = channels, size, grid, affine
        self.dim = channels * grid * grid + (2 * channels if affine else 0)

    def initial(self, seed: int) -> np.ndarray:
        return np.zeros(self.dim)

    def sync(self, theta: torch.Tensor) -> None:
        """Nothing to do: the hook reads the current prompt on every pass."""

    def attach(self, model: nn.Module, theta: Callable[[], torch.Tensor]) -> list[RemovableHandle]:
        def hook(module: nn.Module, args: tuple) -> tuple:
            x = args[0]  # theta stays on the CPU with CMA-ES; the prompt follows the batch
            return (self(x, theta().to(device=x.device, dtype=x.dtype)), *args[1:])

        return [model.register_forward_pre_hook(hook)]

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


def token_model(model: nn.Module) -> nn.Module | None:
    """The timm ``VisionTransformer`` inside ``model`` whose token sequence prompt tokens can join
    (found by what FOA uses of it), or None."""
    for module in model.modules():
        if all(
            hasattr(module, a)
            for a in ("patch_embed", "norm_pre", "blocks", "norm", "num_prefix_tokens", "embed_dim")
        ):
            return module
    return None


def carries_tokens(model: nn.Module) -> bool:
    """Whether ``model`` already carries FOA's prompt tokens (an earlier ``foa`` run's result, or a
    copy of it): inserted into its graph, or hooked into its ViT."""
    if isinstance(getattr(model, "qtta_foa_insert_tokens", None), nn.Module):
        return True
    vit = token_model(model)
    hooks = vit.norm_pre._forward_hooks.values() if vit is not None else ()
    return any(getattr(h, "qtta_foa_tokens", False) for h in hooks)


class TokenPrompt:
    """FOA's prompt tokens: ``n`` tokens of the ViT's width after its prefix (class) tokens, from
    the position-embedded sequence to the final norm, which sees the sequence without them."""

    kind = "tokens"

    def __init__(self, vit: nn.Module, n: int) -> None:
        self.vit, self.n = vit, n
        self.width, self.prefix = int(vit.embed_dim), int(vit.num_prefix_tokens)
        self.dim = n * self.width
        # where the tokens sit in the sequence; the feature statistics leave them out
        self.skip_tokens = slice(self.prefix, self.prefix + n)
        patch = getattr(vit.patch_embed, "patch_size", (16, 16))
        area = int(np.prod(patch)) if isinstance(patch, tuple | list) else int(patch) ** 2
        self.init_range = math.sqrt(6.0 / (3 * area + self.width))  # VPT's initialisation

    def initial(self, seed: int) -> np.ndarray:
        return np.random.default_rng(seed).uniform(-self.init_range, self.init_range, self.dim)

    def sync(self, theta: torch.Tensor) -> None:
        """Nothing to do: the hooks read the current prompt on every pass."""

    def attach(self, model: nn.Module, theta: Callable[[], torch.Tensor]) -> list[RemovableHandle]:
        p, n = self.prefix, self.n

        def insert(module: nn.Module, args: tuple, x: torch.Tensor) -> torch.Tensor:
            t = theta().to(device=x.device, dtype=x.dtype).view(1, n, self.width)
            return torch.cat([x[:, :p], t.expand(x.shape[0], -1, -1), x[:, p:]], 1)

        def remove(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            return (torch.cat([x[:, :p], x[:, p + n :]], 1), *args[1:])

        insert.qtta_foa_tokens = True  # type: ignore[attr-defined]  # see carries_tokens
        return [
            self.vit.norm_pre.register_forward_hook(insert),
            self.vit.norm.register_forward_pre_hook(remove),
        ]


class _InsertTokens(nn.Module):
    """Graph form of the token insertion: the tokens are this module's buffer, so the adapted
    graph holds its incumbent prompt in its own state (and copies and exports with it)."""

    def __init__(self, n: int, width: int, prefix: int) -> None:
        super().__init__()
        self.prefix = prefix
        self.register_buffer("tokens", torch.zeros(n, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        return torch.cat([x[:, : self.prefix], t, x[:, self.prefix :]], 1)


class _DropTokens(nn.Module):
    def __init__(self, n: int, prefix: int) -> None:
        super().__init__()
        self.n, self.prefix = n, prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, : self.prefix], x[:, self.prefix + self.n :]], 1)


class GraphTokenPrompt(TokenPrompt):
    """FOA's prompt tokens in an exported graph of a timm ViT (torchao's pt2e route).

    The graph has no ``norm_pre`` module to hook, and it was traced at one sequence length, which
    its attention reshapes hold as literals. So the tokens go in as two modules the graph calls - one
    on the input of the first block's first norm (the position-embedded sequence), one on the
    input of the final norm - and the reshapes between them are told about the ``n`` extra tokens.
    Found from the graph's ``nn_module_stack`` (``blocks.0.norm1``, ``norm``); None when absent.
    """

    @classmethod
    def find(cls, model: nn.Module, n: int) -> GraphTokenPrompt | None:
        graph = getattr(model, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            return None
        first = last = None
        for node in graph.nodes:
            stack = node.meta.get("nn_module_stack")
            if node.op != "call_function" or not stack or "layer_norm" not in str(node.target):
                continue
            path = list(stack.values())[-1][0]
            if path == "blocks.0.norm1" and first is None:
                first = node
            elif path == "norm":
                last = node
        val = last.args[0].meta.get("val") if last is not None else None
        if first is None or val is None or val.ndim != 3:
            return None
        prefix = sum(1 for a in ("cls_token", "reg_token") if hasattr(model, a))
        return cls(model, first, last, int(val.shape[1]), int(val.shape[2]), prefix, n)

    def __init__(
        self,
        model: nn.Module,
        first: torch.fx.Node,
        last: torch.fx.Node,
        tokens: int,
        width: int,
        prefix: int,
        n: int,
    ) -> None:
        self.model, self.first, self.last, self.tokens = model, first, last, tokens
        self.width, self.prefix, self.n, self.dim = width, prefix, n, n * width
        self.skip_tokens = slice(prefix, prefix + n)
        self.inserted: _InsertTokens | None = None
        self.init_range = math.sqrt(6.0 / (3 * 16 + width))  # VPT's, for a patch of 4 x 4
        for node in model.graph.nodes:  # the patch size, from the patch embedding's weight
            if node.op == "get_attr" and node.target == "patch_embed.proj.weight":
                k = model.get_parameter(node.target).shape[-2:]
                self.init_range = math.sqrt(6.0 / (3 * int(k[0]) * int(k[1]) + width))

    def sync(self, theta: torch.Tensor) -> None:
        """The tokens the graph runs with: ``theta`` (FOA calls this before every pass)."""
        if self.inserted is not None:
            self.inserted.tokens.copy_(theta.view(self.n, self.width))

    def attach(self, model: nn.Module, theta: Callable[[], torch.Tensor]) -> list[RemovableHandle]:
        graph = model.graph
        param = next(model.parameters(), None)
        self.inserted = _InsertTokens(self.n, self.width, self.prefix).to(
            device=param.device if param is not None else None
        )
        model.add_module("qtta_foa_insert_tokens", self.inserted)
        model.add_module("qtta_foa_drop_tokens", _DropTokens(self.n, self.prefix))
        self.sync(theta())
        stream = self.first.args[0]
        with graph.inserting_before(self.first):
            inserted = graph.call_module("qtta_foa_insert_tokens", (stream,))
        stream.replace_all_uses_with(inserted, delete_user_cb=lambda user: user is not inserted)
        with graph.inserting_before(self.last):
            dropped = graph.call_module("qtta_foa_drop_tokens", (self.last.args[0],))
        self.last.replace_input_with(self.last.args[0], dropped)
        # the reshapes between the two were traced at ``tokens`` tokens: now there are n more
        inside, longer = False, self.tokens + self.n
        for node in graph.nodes:
            if node is inserted:
                inside = True
            elif node is dropped:
                break
            elif inside and node.op == "call_function" and "reshape" in str(node.target):
                shape = list(node.args[1])
                if len(shape) > 1 and shape[1] == self.tokens:
                    shape[1] = longer
                    node.args = (node.args[0], shape, *node.args[2:])
        model.recompile()
        return []


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
        self.prompt: InputPrompt | TokenPrompt = self._choose_prompt(view, config, shape)
        self.sigma0 = config.sigma0 or (1.0 if self.prompt.kind == "tokens" else 0.1)
        self.features = config.features
        if self.features == "auto":
            self.features = "class_token" if self.prompt.kind == "tokens" else "mean"
        view.freeze()
        if config.batch_stats and any(n.has_statistics for n in view.norms()):
            view.set_norm_mode("batch")
        layers = feature_layers(view, config.feature_layers)
        class_token = self.features == "class_token"
        self.recorder = FeatureRecorder(view, layers, token=0 if class_token else None)
        self.recorder.shift_decay = config.shift_decay
        if batches:
            found = source_statistics(view, self.recorder, batches)
        else:  # what quantize measured on its calibration data (None: warned why)
            found = kept_statistics(
                view, self.recorder, layers, None, config.source_batch_size, "foa"
            )
        self.source_stats = found[0] if found is not None else None
        self.shift_target = (
            self.source_stats[-1].mean if self.source_stats is not None and config.shift else None
        )
        self._cma = cma
        self.recorder.skip_tokens = self.prompt.skip_tokens
        self._init_state()
        # the prompt stays on the model between steps: the incumbent is the adapted model
        self._hooks = self.prompt.attach(view.model, self._theta_now)

    @staticmethod
    def _choose_prompt(
        view: QuantView, config: FOAConfig, shape: tuple[int, ...]
    ) -> InputPrompt | TokenPrompt:
        if config.prompt != "image":
            if carries_tokens(view.model):
                # a second set would stack on the first, which stays frozen in the sequence
                raise ValueError(
                    f"this {view.backend} model already carries FOA's prompt tokens (it is an "
                    "earlier foa run's model): continue that run, or adapt the model it started "
                    "from"
                )
            vit = token_model(view.model)
            if vit is not None:
                return TokenPrompt(vit, config.prompt_tokens)
            found = GraphTokenPrompt.find(view.model, config.prompt_tokens)
            if found is not None:
                return found
            if config.prompt == "tokens":
                raise ValueError(
                    "FOAConfig(prompt='tokens') needs a model with a token sequence (a timm "
                    f"VisionTransformer, eager or exported); this {view.backend} model has none: "
                    "use prompt='image'"
                )
        return InputPrompt(shape[0], (shape[1], shape[2]), config.prompt_grid, config.affine)

    def _init_state(self) -> None:
        cfg = self.config
        self.randn = _RandN(cfg.seed)
        start = self.prompt.initial(cfg.seed)
        centre = np.zeros_like(start) if cfg.cma_start == "zero" else start
        self.es = self._cma.CMAEvolutionStrategy(
            centre,
            self.sigma0,
            {"popsize": cfg.population, "randn": self.randn, "verbose": -9, "seed": cfg.seed + 1},
        )
        self._current: torch.Tensor | None = None
        self._set_incumbent(torch.as_tensor(start, dtype=torch.float32))
        self.recorder.reset_shift()

    def _theta_now(self) -> torch.Tensor:
        """The prompt the model runs with: the candidate under test, else the incumbent."""
        return self._current if self._current is not None else self.theta

    def _try(self, candidate: torch.Tensor | None) -> None:
        """Run the next passes with ``candidate`` (None: the incumbent)."""
        self._current = candidate
        self.prompt.sync(self._theta_now())

    def _set_incumbent(self, theta: torch.Tensor) -> None:
        self.theta = theta
        self.prompt.sync(self._theta_now())

    def _fitness(self, logits: torch.Tensor) -> float:
        fitness = softmax_entropy(logits).sum()
        if self.source_stats is not None:
            lam = self.config.align_weight
            lam = 0.4 * logits.shape[0] / 64 if lam is None else lam
            squared = self.config.fitness == "squared"
            for s, src in zip(self.recorder.collected(), self.source_stats, strict=True):
                d_mean, d_std = s.mean - src.mean, s.std - src.std
                if squared:
                    fitness = fitness + lam * (d_std.square().sum() + d_mean.square().sum())
                else:
                    fitness = fitness + lam * (d_mean.norm() + d_std.norm())
        return float(fitness)

    def min_batch_size(self) -> int:
        """2 on any model: its fitness aligns the batch's feature means and deviations with the source's (one
        image has no deviation), and CMA-ES ranks candidates by it."""
        return max(super().min_batch_size(), 2)

    def adapted_parameters(self) -> list[nn.Parameter]:
        # the output shift's head bias (the prompt is a hook, or a buffer of the graph)
        return self.recorder.tensors()

    @torch.no_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        with self.recorder.attached():  # the recording hooks for this step only
            logits, chosen, shift = self._step(x)
        if shift is None:
            return logits
        if self.recorder.head is not None:  # the head is linear: shift its output exactly
            return logits + self.recorder.head.weight.to(shift) @ shift
        # no head bias to hold the shift: run the chosen prompt once more, shifted at the input
        self._try(chosen)
        try:
            with self.recorder.input_shift(shift):
                return self.view.model(x)
        finally:
            self._try(None)

    def _pass(self, x: torch.Tensor, theta: torch.Tensor | None) -> tuple[torch.Tensor, float]:
        """Logits of ``x`` with prompt ``theta`` (None: the incumbent), unshifted, and their
        fitness; the head input's batch mean is left in the recorder."""
        self._try(theta)
        self.recorder.clear()
        logits = self.view.model(x)
        return logits, self._fitness(logits)

    def _step(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One batch: the unshifted logits of the prediction, its prompt, and the shift the
        prediction gets (None: none)."""
        cfg, recorder = self.config, self.recorder
        if recorder.head is not None:
            recorder.head.write(None)  # the passes judge the prompt alone, unshifted
        means: list[torch.Tensor] = []  # the head input's batch mean, per pass
        try:
            if cfg.predict == "incumbent":  # the prediction: the previous best, a pass of its own
                chosen, (logits, _) = self.theta, self._pass(x, None)
                means.append(recorder.collected()[-1].mean)
                chosen_mean = means[0]
            asked = self.es.ask()
            thetas = [torch.as_tensor(c, dtype=torch.float32) for c in asked]
            if cfg.predict == "best":  # the previous best competes on this batch
                thetas.append(self.theta)
            fitnesses: list[float] = []
            best = 0
            for i, theta in enumerate(thetas):
                out, fit = self._pass(x, theta)
                fitnesses.append(fit)
                means.append(recorder.collected()[-1].mean)
                if fit < fitnesses[best] or i == 0:
                    best, best_logits = i, out
        finally:
            self._try(None)
            recorder.apply_shift()  # the shift the model carried (a failed step changes nothing)
        # the authors tell CMA-ES the previous best's fitness too (an injected 28th solution)
        self.es.tell([np.asarray(t, dtype=np.float64) for t in thetas], fitnesses)
        if cfg.predict == "best":
            chosen, logits, chosen_mean = thetas[best], best_logits, means[best]
        self._set_incumbent(thetas[best])
        shift = None
        if self.shift_target is not None:
            shift = self._update_shift(torch.stack(means).mean(0), chosen_mean)
        return logits, chosen, shift

    def _update_shift(self, all_mean: torch.Tensor, chosen_mean: torch.Tensor) -> torch.Tensor:
        """Move the head input's EMA on with this batch; return the shift the prediction gets.
        The model is left carrying ``shift_target - EMA``: the shift for the next batch.

        ``shift_update="candidates"`` (the authors'): the EMA takes the mean over all of the
        batch's passes, after the prediction, which gets the shift from earlier batches (none on
        the first). ``"prediction"``: the EMA takes the predicting pass's mean first, and the
        prediction gets the shift with this batch in it."""
        recorder, m = self.recorder, self.config.shift_decay
        before = recorder.applied_shift
        candidates = self.config.shift_update == "candidates"
        mean = all_mean if candidates else chosen_mean
        ema = recorder.feature_ema
        recorder.feature_ema = mean if ema is None else m * ema + (1 - m) * mean
        recorder.applied_shift = self.shift_target - recorder.feature_ema
        recorder.apply_shift()
        return before if candidates else recorder.applied_shift

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
            raise ValueError("FOA state does not match this model's prompt")
        self.es = copy.deepcopy(state["es"])
        self.randn = self.es.opts["randn"]
        self._set_incumbent(state["theta"].clone())
        self.recorder.load_shift_state(state)


@hookimpl
def qtta_methods() -> list[MethodInfo]:
    return [
        MethodInfo(
            "foa",
            "adapt",
            "forward-only: CMA-ES on prompt tokens (ViT) or an input prompt (28 passes)",
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

"""``tent``: Tent (Wang et al., ICLR 2021), fully test-time adaptation by entropy minimisation.

Configure: batch norms use test-batch statistics; only the norm layers' affine parameters adapt
(batch norms, and LayerNorm / GroupNorm in models that have no batch norm). Collect: those parameters,
under SGD with momentum. Forward and adapt: predict, take the mean prediction entropy, one step.
Gradients pass the fake quantizers straight through, so the quantized model adapts as it will run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import AdaptConfig, TentConfig
from ..hookspecs import hookimpl
from ..view import QuantView
from .base import MethodInfo, TestTimeMethod


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy of the softmax of ``logits``."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def tent_parameters(view: QuantView) -> list[nn.Parameter]:
    """Affine parameters of the batch norms, or of all norms when the model has no batch norm."""
    norms = view.norms()
    chosen = [n for n in norms if n.kind == "batch"] or norms
    params: dict[int, nn.Parameter] = {}
    for norm in chosen:
        for p in norm.affine():
            params.setdefault(id(p), p)
    return list(params.values())


class Tent(TestTimeMethod):
    needs_backward = True

    def __init__(self, view: QuantView, config: TentConfig) -> None:
        super().__init__(view, config)
        if not view.can_backprop:
            raise ValueError(
                f"method 'tent' needs gradients, and this {view.backend} model cannot backpropagate "
                "(an integer-kernel model?); use the forward-only method 'zoa' or 'norm'"
            )
        self.params = tent_parameters(view)
        if not self.params:
            raise ValueError(
                f"method 'tent' found no norm affine parameters in this {view.backend} model"
            )
        view.freeze()
        for p in self.params:
            p.requires_grad_(True)
        view.set_norm_mode("batch")
        self.optimizer = torch.optim.SGD(
            self.params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        prediction = None
        for _ in range(self.config.steps):
            with torch.enable_grad():
                logits = self.view.model(x)
                loss = softmax_entropy(logits).mean()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
            self.optimizer.step()
            if prediction is None:
                prediction = logits.detach()
        self.optimizer.zero_grad(set_to_none=True)
        return prediction

    def adapted_parameters(self) -> list[nn.Parameter]:
        return self.params

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])

    def reset(self) -> None:
        self.optimizer.state.clear()


@hookimpl
def qtta_methods() -> list[MethodInfo]:
    return [
        MethodInfo(
            "tent", "adapt", "entropy minimisation on norm affine params (SGD)", True, TentConfig
        )
    ]


@hookimpl
def qtta_adapt(view: QuantView, config: AdaptConfig) -> TestTimeMethod | None:
    if config.method != "tent":
        return None
    if not isinstance(config, TentConfig):
        config = TentConfig(seed=config.seed)
    return Tent(view, config)

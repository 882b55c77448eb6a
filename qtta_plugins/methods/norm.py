"""``norm``: BN-adapt (Schneider et al., NeurIPS 2020). Batch norms normalise with the test batch's
statistics instead of the source's running ones; nothing is learned, so it is forward-only.
LayerNorm / GroupNorm already use per-sample statistics and are unchanged by it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import AdaptConfig
from ..hookspecs import hookimpl
from ..view import QuantView
from .base import MethodInfo, TestTimeMethod


@dataclass
class NormConfig(AdaptConfig):
    """BN-adapt (Schneider et al. 2020): batch norms use the test batch's statistics; nothing is learned."""

    method: str = "norm"


class NormAdapt(TestTimeMethod):
    def __init__(self, view: QuantView, config: AdaptConfig) -> None:
        super().__init__(view, config)
        if not any(n.has_statistics for n in view.norms()):
            raise ValueError(
                "method 'norm' needs batch-norm layers with statistics, and this "
                f"{view.backend} model has none (folded away, or absent); try method='zoa' or 'tent'"
            )
        view.set_norm_mode("batch")

    @torch.no_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        return self.view.model(x)


@hookimpl
def qtta_methods() -> list[MethodInfo]:
    return [MethodInfo("norm", "adapt", "BN-adapt: test-batch statistics", config_cls=NormConfig)]


@hookimpl
def qtta_adapt(view: QuantView, config: AdaptConfig) -> TestTimeMethod | None:
    if config.method != "norm":
        return None
    return NormAdapt(view, config)

"""``source``: no adaptation. The quantized model as trained on the source domain, with its norms
on their running (source) statistics: the row every method is measured against."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import AdaptConfig
from ..hookspecs import hookimpl
from ..view import QuantView
from .base import MethodInfo, TestTimeMethod


@dataclass
class SourceConfig(AdaptConfig):
    """No adaptation: the quantized model as it is, norms on their source (running) statistics."""

    method: str = "source"


class Source(TestTimeMethod):
    def __init__(self, view: QuantView, config: AdaptConfig) -> None:
        super().__init__(view, config)
        view.set_norm_mode("source")

    @torch.no_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        return self.view.model(x)


@hookimpl
def qtta_methods() -> list[MethodInfo]:
    return [
        MethodInfo("source", "adapt", "no adaptation (source statistics)", config_cls=SourceConfig)
    ]


@hookimpl
def qtta_adapt(view: QuantView, config: AdaptConfig) -> TestTimeMethod | None:
    if config.method != "source":
        return None
    return Source(view, config)

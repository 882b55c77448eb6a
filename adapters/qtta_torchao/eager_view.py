"""The view of an eager model whose Linear layers went through ``quantize_``: QAT
(``FakeQuantizedLinear``, gradients flow) or a weight tensor subclass (forward-only)."""

from __future__ import annotations

import torch
from torch import nn

from qtta_plugins.view import (
    NormLayer,
    NormMode,
    QuantLayer,
    QuantView,
    module_norms,
    set_module_norm_mode,
)

from .handles import IntxFakeQuantizerHandle, _from_torchao


class ModuleView(QuantView):
    """An eager model with torchao-quantized Linear layers (QAT fake-quant or a weight subclass)."""

    backend = "torchao"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.sample_shape = None

    def layers(self) -> list[QuantLayer]:
        layers = []
        for name, module in self.model.named_modules():
            if not isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
                continue
            kind = "linear" if isinstance(module, nn.Linear) else "conv"
            w_fq = getattr(module, "weight_fake_quantizer", None)
            x_fq = getattr(module, "activation_fake_quantizer", None)
            if w_fq is None and not _from_torchao(module.weight):
                continue
            layers.append(
                QuantLayer(
                    name,
                    kind,
                    module.weight,
                    IntxFakeQuantizerHandle(
                        f"{name}.weight_quantizer", w_fq, "weight", module.weight
                    )
                    if w_fq is not None
                    else None,
                    IntxFakeQuantizerHandle(f"{name}.input_quantizer", x_fq, "act", None)
                    if x_fq is not None
                    else None,
                )
            )
        return layers

    def norms(self) -> list[NormLayer]:
        return module_norms(self.model.named_modules())

    def set_layer_weight(self, layer: QuantLayer, weight: torch.Tensor) -> None:
        """Into the module's weight parameter (QAT fake-quant layers); weight tensor subclasses
        (``quantize_`` with a non-QAT config) hold integer data and are not written."""
        if _from_torchao(layer.weight):
            raise NotImplementedError(
                f"{layer.name}: the weight is a torchao {type(layer.weight).__name__} holding "
                "integer data; write weights into the float / QAT model before quantize_"
            )
        super().set_layer_weight(layer, weight)

    @property
    def can_backprop(self) -> bool:
        # Weight tensor subclasses (quantize_ with a non-QAT config) do not carry gradients.
        return not any(_from_torchao(p) for p in self.model.parameters())

    def _apply_norm_mode(self, mode: NormMode) -> None:
        set_module_norm_mode(self.model, mode)

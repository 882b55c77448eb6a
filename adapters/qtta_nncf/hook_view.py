"""The view of a model returned by ``nncf.quantize`` (PyTorch backend): :class:`NNCFView`.

It reads the model's structure from a trace (:mod:`.graph`), hands out :mod:`.handles` for NNCF's
quantizers, and before adaptation names quantized norm parameters (:mod:`.norm_params`) and applies
the batch-overflow policy (:mod:`.recalibration`). The trace needs one example input: the one
``qtta_plugins.quantize`` stored on the model (attribute ``_qtta_example_input``), one set as
``view.example_input = x``, or else the first input the model is called with once a view has looked
at it (a one-shot forward pre-hook keeps it). Until one is known, :meth:`NNCFView.layers` falls back to what the hook names alone say (weight quantizers; only input
quantizers NNCF pre-hooked on the layer itself) and warns; :meth:`NNCFView.quantizers` (all that
snapshot / restore and the methods need) is exact either way, in hook-storage order instead of
forward order.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from qtta_plugins.view import (
    NormLayer,
    NormMode,
    QuantizerHandle,
    QuantLayer,
    QuantView,
    module_norms,
    set_module_norm_mode,
)

from .graph import EXAMPLE_ATTR, _CaptureExample, _Structure, static_structure, trace_structure
from .handles import NNCFQuantizerHandle, quantizer_modules
from .norm_params import norm_parameter_quantizers
from .recalibration import measure_source_extremes, recalibrate_if_overflowing


class NNCFView(QuantView):
    """A model returned by ``nncf.quantize`` (PyTorch backend), whoever called it.

    The model stays an eager ``nn.Module`` with its norms unfolded, so gradients reach the norm
    affine parameters and (see :meth:`NNCFQuantizerHandle.set_trainable`) the quantizer ranges.
    """

    backend = "nncf"

    def __init__(self, model: nn.Module, example_input: torch.Tensor | None = None) -> None:
        super().__init__(model)
        self.sample_shape = None
        self._handles: dict[int, NNCFQuantizerHandle] = {}
        self._cache: tuple[object, tuple[int, ...], _Structure] | None = None
        self._warned = False
        if example_input is not None:
            self.example_input = example_input

    # --- example input -------------------------------------------------------------------------
    @property
    def example_input(self) -> torch.Tensor | None:
        """One input sample (batch of one) used to trace the model; stored on the model."""
        return self.model.__dict__.get(EXAMPLE_ATTR)

    @example_input.setter
    def example_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim == 0 or len(x) == 0:
            raise ValueError("example_input must be a non-empty batch tensor")
        self.model.__dict__[EXAMPLE_ATTR] = x[:1].detach().clone()
        self._cache = None

    # --- structure -----------------------------------------------------------------------------
    def _structure(self, *, warn: bool = False) -> _Structure:
        modules = quantizer_modules(self.model)
        example = self.example_input
        ids = tuple(id(m) for m in modules.values())
        if self._cache is not None and self._cache[0] is example and self._cache[1] == ids:
            structure = self._cache[2]
        else:
            if example is not None:
                structure = trace_structure(self.model, example)
            else:
                structure = static_structure(self.model)
                self._capture_next_input()
            self._cache = (example, ids, structure)
        if warn and not structure.traced and not self._warned:
            self._warned = True
            warnings.warn(
                "NNCF view without an example input: layer names and input quantizers come from "
                "NNCF's hook names only (run the model once, or set view.example_input = x, for "
                "the traced structure)",
                stacklevel=3,
            )
        return structure

    def _capture_next_input(self) -> None:
        hooks = self.model._forward_pre_hooks.values()
        if not any(isinstance(h, _CaptureExample) for h in hooks):
            self.model.register_forward_pre_hook(_CaptureExample())

    def _handle(self, name: str, structure: _Structure) -> NNCFQuantizerHandle:
        module = self.model.get_submodule(name)
        handle = self._handles.get(id(module))
        if handle is None or handle.name != name:
            handle = NNCFQuantizerHandle(name, module, structure.roles.get(name, "act"))
            self._handles[id(module)] = handle
        else:
            handle.role = structure.roles.get(name, handle.role)  # type: ignore[assignment]
        return handle

    def layers(self) -> list[QuantLayer]:
        structure = self._structure(warn=True)
        params = dict(self.model.named_parameters())
        layers = []
        for info in structure.layers:
            weight = params.get(info.weight_name) if info.weight_name else None
            layers.append(
                QuantLayer(
                    info.name,
                    info.kind,  # type: ignore[arg-type]
                    weight if weight is not None else torch.empty(0),
                    self._handle(info.weight_q, structure) if info.weight_q else None,
                    self._handle(info.input_q, structure) if info.input_q else None,
                    self._handle(info.output_q, structure) if info.output_q else None,
                )
            )
        return layers

    def quantizers(self) -> list[QuantizerHandle]:
        """Every NNCF quantizer, including those that feed no conv / linear (NNCF also quantizes
        residual branches, attention inputs, pooled features): in forward order once the model
        was traced, in hook-storage order before."""
        structure = self._structure()
        return [self._handle(name, structure) for name in structure.order]

    def norms(self) -> list[NormLayer]:
        return module_norms(self.model.named_modules())

    def measure_source(self, batches: Sequence[torch.Tensor]) -> dict[str, object]:
        """What :meth:`prepare_adaptation` needs of the source data: each activation quantizer's
        extremes in batch-statistics mode on the first 4 batches (none for a model without batch
        norm statistics); see :func:`~qtta_nncf.recalibration.measure_source_extremes`."""
        return measure_source_extremes(self, batches)

    def prepare_adaptation(self) -> list[str]:
        """Two things keep adaptation from working on an NNCF model, both from calibrating under
        the running statistics: quantizers on norm affine parameters (named, see
        :func:`norm_parameter_quantizers`), and activation ranges that batch statistics overflow
        (recalibrated here from clean source data, see :func:`recalibrate_activations`: the
        calibration sample when ``quantize`` kept one, else the batch-mode extremes it measured,
        :meth:`measure_source`; without either, or on a model changed since, left as they are,
        with a message; :func:`~qtta_nncf.recalibration.recalibrate_if_overflowing`)."""
        messages = []
        clamped = norm_parameter_quantizers(self.model)
        if clamped:
            messages.append(
                f"NNCF quantizes the affine parameters of {len(clamped)} norm layer(s) "
                f"({clamped[0]}, ...) on a range calibrated on their source values: adapted "
                "values are clamped to it, so norm adaptation barely moves the output. Remove "
                "them first with qtta_nncf.view.release_norm_parameters(model) "
                "(qtta_plugins.quantize does)."
            )
        return messages + recalibrate_if_overflowing(self)

    # --- state ---------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, object]:
        """As :meth:`QuantView.snapshot`, plus the raw storage of quantizers that keep their range
        as a logarithm (``logarithm_scale``): NNCF's state dict holds ``exp(storage)``, a computed
        copy that a restore cannot write into."""
        state = super().snapshot()
        state["nncf_log_storage"] = {
            h.name: [p.detach().clone() for p in h._storage()]
            for h in self.quantizers()
            if h.module.is_using_log_scale_storage
        }
        return state

    def check_snapshot(self, snapshot: object) -> None:
        """As :meth:`QuantView.check_snapshot`, and the log-scale storage must name this model's
        quantizers with tensors of their storage's shapes."""
        super().check_snapshot(snapshot)
        saved = snapshot.get("nncf_log_storage", {})  # type: ignore[union-attr]
        if not isinstance(saved, dict):
            raise ValueError("snapshot['nncf_log_storage'] must map quantizer names to tensors")
        handles = {h.name: h for h in self.quantizers()}
        for name, values in saved.items():
            handle = handles.get(name)
            if handle is None:
                raise ValueError(
                    f"snapshot does not match this model: log-scale storage for {name!r}, "
                    "which is not one of its quantizers"
                )
            storage = handle._storage()
            if len(values) != len(storage) or any(
                not isinstance(v, torch.Tensor) or v.shape != p.shape
                for v, p in zip(values, storage, strict=False)
            ):
                raise ValueError(
                    f"snapshot does not match this model: log-scale storage of {name!r} has "
                    f"shapes {[tuple(getattr(v, 'shape', ())) for v in values]}, the quantizer's "
                    f"{[tuple(p.shape) for p in storage]}"
                )

    def restore(self, snapshot: dict[str, object]) -> None:
        super().restore(snapshot)  # checks the whole snapshot (check_snapshot) before writing
        saved: dict[str, list[torch.Tensor]] = snapshot.get("nncf_log_storage", {})  # type: ignore[assignment]
        with torch.no_grad():
            for handle in self.quantizers():
                for p, v in zip(handle._storage(), saved.get(handle.name, ()), strict=False):
                    p.copy_(v)

    @property
    def can_backprop(self) -> bool:
        return True

    def _apply_norm_mode(self, mode: NormMode) -> None:
        set_module_norm_mode(self.model, mode)

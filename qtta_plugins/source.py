"""Clean source data a quantized model carries, and the fingerprint of the state it was measured
on (docs/design.md, "Data flow").

:func:`qtta_plugins.quantize` keeps on the model either a sample of its calibration images
(:func:`remember_source_sample`, when asked) or the source statistics ZOA, FOA and EATA need
(:class:`SourceStatistics`), outside the state dict so that they follow the model through copies.
Statistics hold only for the model state they were measured on: :func:`state_fingerprint` names
that state, values of tensor subclasses (torchao's packed weights) included.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .view import QuantView


_SOURCE_SAMPLE = "_qtta_source_sample"
_SOURCE_STATS = "_qtta_source_statistics"
SOURCE_SAMPLE_SIZE = 512
#: the batch size source statistics are measured in (the methods' ``source_batch_size`` default)
SOURCE_BATCH_SIZE = 64


def first_inputs(
    batches: Iterable[torch.Tensor], n: int = SOURCE_SAMPLE_SIZE
) -> torch.Tensor | None:
    """The first ``n`` inputs of ``batches`` as one detached tensor (``None`` if there are none)."""
    kept, count = [], 0
    for x in batches:
        x = x.detach()[: n - count].clone()
        kept.append(x)
        count += x.shape[0]
        if count >= n:
            break
    return torch.cat(kept) if kept else None


def _set_meta(model: nn.Module, key: str, value: object) -> None:
    if isinstance(model, torch.fx.GraphModule):
        model.meta[key] = value  # a GraphModule's deep copy keeps .meta, not attributes
    else:
        object.__setattr__(model, key, value)


def _get_meta(model: nn.Module, key: str) -> object:
    inner = model._modules.get("_orig_mod")  # a torch.compile wrapper: the model inside
    if isinstance(inner, nn.Module):
        return _get_meta(inner, key)
    if isinstance(model, torch.fx.GraphModule):
        return model.meta.get(key)
    return model.__dict__.get(key)


def remember_source_sample(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Keep up to :data:`SOURCE_SAMPLE_SIZE` clean inputs on ``model`` (outside its state dict).

    :func:`qtta_plugins.quantize` does so only when asked (``keep_calibration_sample=True``): the
    sample follows the model through deep copies, :func:`copy_model` and every copy a user makes,
    so by default the model carries :class:`SourceStatistics` instead. With a sample, methods
    measure source statistics on the model as it is when they start (after a conversion, say).
    """
    sample = first_inputs(batches)
    if sample is not None:
        _set_meta(model, _SOURCE_SAMPLE, sample)


def source_sample(model: nn.Module) -> torch.Tensor | None:
    """The clean inputs :func:`remember_source_sample` kept on ``model`` (or its compiled wrapper)."""
    return _get_meta(model, _SOURCE_SAMPLE)  # type: ignore[return-value]


@dataclass
class FeatureStatistics:
    """Source feature statistics of one model state, the one whose :func:`state_fingerprint` is
    ``fingerprint``: ``features[mode][layer]``, the per-channel ``(mean, std)`` of the pooled
    input of each quantized layer but the first, averaged over batches, with norms in ``mode``
    (``"source"`` / ``"batch"``), as ``zoa`` compares test batches with; ``class_token[mode]
    [layer]``, for models whose layers see token sequences, the same of the class token (the
    pooled feature where a layer sees none) over all images at once, unbiased std, as ``foa``
    compares; and ``detector[mode][norm]``, the per-channel ``(mean, var)`` of what the first
    norm normalises."""

    fingerprint: str
    features: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    class_token: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(
        default_factory=dict
    )
    detector: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)


@dataclass
class SourceStatistics:
    """What :func:`qtta_plugins.quantize` keeps on a model in place of its calibration images:
    statistics measured on them, small tensors outside the state dict that follow the model through
    copies (:func:`qtta_plugins.features.measure_source_statistics`).

    ``measured``: :class:`FeatureStatistics` of the model as :func:`qtta_plugins.adapt` prepares it
    (:meth:`QuantView.prepare_adaptation`), in batches of ``batch_size``, with batch norms on
    test-batch statistics (as ``zoa`` and ``foa`` run by default; a model without batch-norm
    statistics normalises alike in both modes). ``adapter``: what the adapter measured on the
    model as quantized (:func:`state_fingerprint` ``fingerprint``) for its own preparation
    (:meth:`QuantView.measure_source`). Statistics hold only for the model states they were
    measured on: a model changed since (converted, reconstructed or adapted in place, edited)
    matches none of them, and methods then need clean data again (``source_data=``, or
    ``keep_calibration_sample=True`` at quantize time).
    """

    images: int
    batch_size: int
    input_shape: tuple[int, ...]
    fingerprint: str
    adapter: dict[str, object] = field(default_factory=dict)
    measured: list[FeatureStatistics] = field(default_factory=list)

    def matches(self, view: QuantView) -> bool:
        """Whether ``view``'s model is still the model as quantized (what ``adapter`` describes)."""
        return state_fingerprint(view) == self.fingerprint

    def for_view(self, view: QuantView) -> FeatureStatistics | None:
        """The feature statistics measured on ``view``'s model as it is now, if any."""
        if not self.measured:
            return None
        fingerprint = state_fingerprint(view)
        return next((m for m in self.measured if m.fingerprint == fingerprint), None)


def keep_source_statistics(model: nn.Module, stats: SourceStatistics | None) -> None:
    """Keep ``stats`` on ``model`` (outside its state dict; ``None`` removes them)."""
    if stats is None:
        if isinstance(model, torch.fx.GraphModule):
            model.meta.pop(_SOURCE_STATS, None)
        else:
            model.__dict__.pop(_SOURCE_STATS, None)
        return
    _set_meta(model, _SOURCE_STATS, stats)


def kept_source_statistics(model: nn.Module) -> SourceStatistics | None:
    """The :class:`SourceStatistics` kept on ``model`` (or its compiled wrapper), if any."""
    return _get_meta(model, _SOURCE_STATS)  # type: ignore[return-value]


#: a memory address in a repr (``<... at 0x7f...>``): differs between a model and its deep copy
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _tensor_digest(t: torch.Tensor) -> bytes:
    """Bytes that change whenever ``t``'s values do, equal for equal tensors (a deep copy's too).

    A plain dense tensor: its raw bytes. A traceable tensor subclass (torchao's packed weights,
    ``Int8Tensor``, ``IntxUnpackedToInt8Tensor``, ...): its type, its metadata and, recursively,
    the inner tensors ``__tensor_flatten__`` names (the integer data, scales, zero points), which
    are what it computes with. Anything else (torch's quantized or sparse tensors, subclasses
    without ``__tensor_flatten__``): its ``torch.save`` serialization, which holds its values.
    """
    t = t.detach()
    if (
        type(t) is torch.Tensor
        and t.layout == torch.strided
        and not t.is_quantized
        and not t.is_meta
    ):
        return t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None:
        names, context = flatten()
        parts = [type(t).__qualname__.encode(), _ADDRESS.sub("", repr(context)).encode()]
        for name in names:
            inner = getattr(t, name)
            parts += [f"{name}|{inner.dtype}|{tuple(inner.shape)}".encode(), _tensor_digest(inner)]
        return b"|".join(parts)
    buffer = io.BytesIO()
    torch.save(t, buffer)
    return buffer.getvalue()


def state_fingerprint(view: QuantView) -> str:
    """A digest of everything a model's function depends on that a view can change: every
    state-dict tensor (names, dtypes, shapes and values; a tensor subclass such as torchao's
    packed weights by its inner tensors, :func:`_tensor_digest`) and each quantizer's bit-width
    and switch. Equal fingerprints: statistics measured on one model hold for the other.

    Batch norms' ``num_batches_tracked`` counters are left out: they do not change what the model
    computes, and torchao's train-mode pt2e graph increments them on every forward, so merely
    running a quantized model would otherwise invalidate its source statistics."""
    model = view.model
    inner = model._modules.get("_orig_mod")
    if isinstance(inner, nn.Module):
        model = inner
    digest = hashlib.sha256()
    for name, t in model.state_dict(keep_vars=True).items():
        if name.rsplit(".", 1)[-1] == "num_batches_tracked":
            continue
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(_tensor_digest(t))
    for q in view.quantizers():
        digest.update(f"{q.name}|{q.bits}|{q.enabled}|".encode())
    return digest.hexdigest()

"""State fingerprints see the values of every state-dict tensor, tensor subclasses included.

The fingerprint decides whether the source statistics ``quantize`` kept on a model still hold for
it (:meth:`qtta_plugins.view.SourceStatistics.matches`). torchao's ``quantize_`` replaces a
Linear's weight by a tensor subclass (``Int8Tensor``, ``IntxUnpackedToInt8Tensor`` in torchao 0.18)
that has no byte view: a fingerprint of its type, shape and dtype alone would call a model whose
packed weights were edited the same model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qtta_plugins
from qtta_plugins.source import SourceStatistics, _tensor_digest, state_fingerprint

pytest.importorskip("torchao")


def packed_model(config_name: str) -> nn.Module:
    """A small Linear / LayerNorm model whose Linear weights torchao's ``quantize_`` packed."""
    import torchao.quantization as tq

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 4)).eval()
    tq.quantize_(model, getattr(tq, config_name)())
    return model


@pytest.mark.parametrize(
    "config_name", ["Int8DynamicActivationInt8WeightConfig", "IntxWeightOnlyConfig"]
)
def test_a_packed_weights_value_changes_the_fingerprint(config_name):
    model = packed_model(config_name)
    weight = model[0].weight
    assert type(weight) is not torch.Tensor and hasattr(weight, "__tensor_flatten__")
    view = qtta_plugins.quant_view(model)
    before = state_fingerprint(view)
    kept = SourceStatistics(images=1, batch_size=1, input_shape=(16,), fingerprint=before)
    assert kept.matches(view)
    # a deep copy (what adapt works on) is the same model: the statistics still hold for it
    assert kept.matches(qtta_plugins.quant_view(copy.deepcopy(model)))

    with torch.no_grad():
        weight.qdata[0, 0] += 1  # one integer of one packed weight
    assert state_fingerprint(view) != before
    assert not kept.matches(view)
    with torch.no_grad():
        weight.qdata[0, 0] -= 1
    assert state_fingerprint(view) == before

    with torch.no_grad():
        weight.scale[0] *= 2  # the packed weight's scale: the same integers, another function
    assert not kept.matches(view)


def test_tensors_without_a_byte_view_are_digested_by_value():
    """torch's sparse tensors (and quantized ones) have no byte view: their serialization is
    digested, equal for a copy, different when a value changes."""
    dense = torch.arange(6.0).reshape(2, 3)
    sparse = dense.to_sparse()
    assert _tensor_digest(sparse) == _tensor_digest(sparse.clone())
    dense[1, 2] = -1.0
    assert _tensor_digest(dense.to_sparse()) != _tensor_digest(sparse)

"""The core loop and the methods on the model's device.

A CPU batch moves to the model's device; a batch elsewhere is refused with an error that names
both devices, and changes nothing. The ``cuda`` tests run every method on a GPU (skipped without
one: ``pytest -m cuda`` on a machine that has one).
"""

from __future__ import annotations

import copy

import pytest
import torch

import qtta_plugins
from qtta_plugins.errors import BadBatchError

pytest.importorskip("torchao")

METHODS = ["norm", "tent", "eata", "sar", "cotta", "rotta", "zoa", "foa"]
OPTIONS = {
    "foa": {"population": 4},
    "cotta": {"n_augmentations": 2},
    "rotta": {"update_frequency": 16},  # a student step within the three batches
}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_a_batch_on_another_device_is_refused_and_changes_nothing(qcnn, digits):
    x = digits[1].x[:32]
    run = qtta_plugins.adapt(qcnn["w4a4"], None, "zoa")
    run.step(x)
    model_before = copy.deepcopy(run.model.state_dict())
    state_before = run.method._copy_state()
    with pytest.raises(BadBatchError, match=r"batch is on meta, the model on cpu"):
        run.step(x.to("meta"))
    after = run.model.state_dict()
    assert all(torch.equal(model_before[k], after[k]) for k in model_before)
    assert torch.equal(run.method.eps, state_before["eps"])
    assert run.batches == 1 and run.predictions.shape == (32,)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["torchao", "brevitas", "nncf"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_on_the_models_device(float_cnn, calib, digits_stream, backend, method):
    pytest.importorskip(backend)
    qmodel = qtta_plugins.quantize(float_cnn, backend, "w8a8", calib)
    batches = [(b.x, b.y) for b in digits_stream][:3]
    cpu_run = qtta_plugins.adapt(qmodel, batches, method, **OPTIONS.get(method, {}))
    gpu_model = copy.deepcopy(qmodel).to("cuda")
    run = qtta_plugins.adapt(gpu_model, None, method, **OPTIONS.get(method, {}))
    for x, y in batches:  # CPU batches, as a data loader yields them
        logits = run.step(x, y)
        assert logits.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in run.model.parameters())
    for value in run.method.state_dict().values():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert value.device.type == "cuda"
    # the same run, up to float arithmetic on another device
    agree = (run.predictions == cpu_run.predictions).float().mean()
    assert agree >= 0.95, float(agree)
    other = torch.device("cuda", 1) if torch.cuda.device_count() > 1 else None
    if other is not None:
        with pytest.raises(BadBatchError, match="batch is on cuda:1"):
            run.step(batches[0][0].to(other))

"""The conformance kit (:mod:`qtta_plugins.conformance`) on every installed backend adapter and
two model families, trained / real inputs; plus what only our own adapters promise.

Everything the kit checks goes through the public API and the uniform view only, so a new adapter
is checked by the same assertions as ours (``pytest --qtta-backend=NAME`` runs them on random
models; tests/test_pytest_plugin.py checks that route).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

import qtta_plugins
from qtta_plugins import conformance
from qtta_plugins.models import SmallBNCNN, TinyViT

BACKENDS = [b for b in ("torchao", "brevitas", "nncf") if importlib.util.find_spec(b) is not None]
PT2E = ("torchao", "bncnn")  # the case quantized through torchao's pt2e (a prepared fx graph)


@pytest.fixture(scope="module")
def float_models(float_cnn):
    torch.manual_seed(0)
    return {"bncnn": float_cnn, "vit": TinyViT().eval()}


@pytest.fixture(
    scope="module",
    params=[(b, f) for b in BACKENDS for f in conformance.FAMILIES],
    ids="-".join,
)
def case(request, float_models, digits) -> conformance.Case:
    backend, family = request.param
    train, test = digits
    calib = [train.x[i : i + 32] for i in range(0, 128, 32)]
    return conformance.make_case(
        backend, family, model=float_models[family], calib=calib, x=test.x[:64]
    )


@pytest.mark.parametrize(
    "check", conformance.CHECKS, ids=[c.__name__.removeprefix("check_") for c in conformance.CHECKS]
)
def test_conformance(check, case):
    if check is conformance.check_export_keeps_predictions and case.backend == "torchao":
        # ~25 s for the two torchao cases; torchao's export after adaptation is checked in
        # tests/test_torchao_export.py and tests/test_architectures.py, and the kit's check
        # itself on Brevitas here
        pytest.skip("torchao's export is checked in tests/test_torchao_export.py")
    check(case)


def test_scales_train_where_the_backend_allows(case):
    """Brevitas, NNCF and torchao's eager path make quantizer scales trainable; torchao's pt2e
    FakeQuantize keeps scale / zero point as observer buffers and its fake_quantize op has no
    gradient for them, so every one of its quantizers refuses, none is skipped silently."""
    qmodel, view = case.fresh()
    quantizers = view.quantizers()
    offered, refused = [], []
    for q in quantizers:
        try:
            offered += q.set_trainable(True)
        except NotImplementedError:
            refused.append(q)
    if (case.backend, case.family) == PT2E:
        assert isinstance(qmodel, torch.fx.GraphModule)
        assert not offered and len(refused) == len(quantizers)
        assert all(not isinstance(q.params()["scale"], nn.Parameter) for q in refused)
    else:
        assert offered, "no quantizer of this backend has a trainable scale"


def test_zoa_takes_source_statistics_from_the_quantized_model(case):
    run = qtta_plugins.adapt(case.fresh()[0], None, "zoa")
    assert run.method.source_stats is not None and run.method.recorder.shift_target is not None


def test_families_are_what_they_claim():
    assert any(isinstance(m, nn.BatchNorm2d) for m in SmallBNCNN().modules())
    vit = TinyViT()
    assert not any(isinstance(m, nn.Conv2d) for m in vit.modules())
    assert any(isinstance(m, nn.LayerNorm) for m in vit.modules())

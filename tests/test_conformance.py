"""One conformance suite for every installed backend adapter and two model families.

Everything here goes through the public API and the uniform view only, so a new adapter is checked
by the same assertions as ours: layers in forward order, quantizers with the right bit-widths,
quantization off reproduces the float model, bit-widths round-trip, snapshot / restore is exact,
gradients reach the norm parameters (and the scales where the backend allows), forward-only works.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from conftest import assert_snapshot_restores_exactly
from torch import nn

import qtta_plugins
from qtta_plugins.models import SmallBNCNN, TinyViT
from qtta_plugins.plugins import available_backends

BACKENDS = [b for b in ("torchao", "brevitas", "nncf") if importlib.util.find_spec(b) is not None]
FAMILIES = ("bncnn", "vit")
BITS = (4, 4)  # weight, activation bits of the inner layers; first / last stay at 8
PT2E = ("torchao", "bncnn")  # the case quantized through torchao's pt2e (a prepared fx graph)
TRACKED = "num_batches_tracked"


def forward_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Names of the conv / linear modules in the order the float model calls them."""
    order: list[str] = []
    hooks = [
        m.register_forward_hook(lambda mod, i, o, name=name: order.append(name))
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return list(dict.fromkeys(order))


@pytest.fixture(scope="module")
def inputs(digits):
    train, test = digits
    return [train.x[i : i + 32] for i in range(0, 128, 32)], test.x[:64]


@pytest.fixture(scope="module")
def float_models(float_cnn):
    torch.manual_seed(0)
    return {"bncnn": float_cnn, "vit": TinyViT().eval()}


@pytest.fixture(scope="module", params=[(b, f) for b in BACKENDS for f in FAMILIES], ids="-".join)
def case(request, float_models, inputs):
    backend, family = request.param
    if backend not in available_backends():
        pytest.fail(f"{backend} is installed but no qtta_plugins adapter for it is registered")
    calib, _ = inputs
    model = float_models[family]
    qmodel = qtta_plugins.quantize(model, backend, BITS, calib)
    return backend, family, model, qmodel


def fresh(case):
    """A copy of the quantized model and its view, on source statistics."""
    qmodel = copy.deepcopy(case[3])
    view = qtta_plugins.quant_view(qmodel)
    view.set_norm_mode("source")
    return qmodel, view


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_view_is_of_the_backend(case):
    backend, *_ = case
    _, view = fresh(case)
    assert view.backend == backend
    assert view.can_backprop


def test_layers_in_forward_order(case, inputs):
    _, _, model, _ = case
    _, x = inputs
    _, view = fresh(case)
    assert [layer.name for layer in view.layers()] == forward_order(model, x)


def test_quantizers_found_with_their_bit_widths(case):
    _, view = fresh(case)
    layers = view.layers()
    for i, layer in enumerate(layers):
        expected_w = 8 if i in (0, len(layers) - 1) else BITS[0]
        assert layer.weight_quantizer is not None, layer.name
        assert layer.weight_quantizer.role == "weight"
        assert layer.weight_quantizer.bits == expected_w, layer.name
        assert layer.weight_quantizer.ch_axis is not None, "weights are per channel"
    inner_acts = [
        layer.input_quantizer for layer in layers[1:-1] if layer.input_quantizer is not None
    ]
    assert inner_acts, "activation quantizers were found"
    assert {q.bits for q in inner_acts} == {BITS[1]}
    assert all(q.role == "act" for q in inner_acts)


def test_quantization_off_reproduces_the_float_model(case, inputs):
    _, _, model, _ = case
    _, x = inputs
    qmodel, view = fresh(case)
    with torch.no_grad():
        quantized = rel_error(qmodel(x), model(x))
        for q in view.quantizers():
            q.enabled = False
        off = rel_error(qmodel(x), model(x))
    assert quantized > 1e-3, "the model was quantized at all"
    assert off < 1e-4, off


def test_bit_width_round_trips_and_changes_the_function(case, inputs):
    _, x = inputs
    qmodel, view = fresh(case)
    handle = view.layers()[1].weight_quantizer
    with torch.no_grad():
        before = qmodel(x)
        handle.bits = 3
        assert view.layers()[1].weight_quantizer.bits == 3
        after3 = qmodel(x)
        handle.bits = BITS[0]
        assert view.layers()[1].weight_quantizer.bits == BITS[0]
        back = qmodel(x)
    assert not torch.allclose(before, after3)
    assert torch.allclose(before, back, atol=1e-5)


def test_snapshot_and_restore_are_exact(case, inputs):
    _, x = inputs
    qmodel, view = fresh(case)
    assert_snapshot_restores_exactly(qmodel, view, x, bits=2)


def test_gradients_reach_norms_and_scales(case, inputs):
    _, x = inputs
    qmodel, view = fresh(case)
    view.set_norm_mode("batch")
    view.freeze()
    norms = view.norm_parameters()
    assert norms
    for p in norms:
        p.requires_grad_(True)
    quantizers = view.quantizers()
    assert quantizers
    scales, refused = [], []
    for q in quantizers:
        try:
            params = q.set_trainable(True)
        except NotImplementedError:
            refused.append(q)
            continue
        assert params, f"{q.name}: set_trainable returned no parameter"
        scales += params
    qmodel(x).logsumexp(1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in norms)
    assert sum(float(p.grad.abs().sum()) for p in norms) > 0
    if case[:2] == PT2E:
        # torchao's pt2e FakeQuantize keeps scale / zero point as observer buffers and its
        # fake_quantize op has no gradient for them: every quantizer says so, none is skipped
        assert isinstance(qmodel, torch.fx.GraphModule)
        assert not scales and len(refused) == len(quantizers)
        assert all(not isinstance(q.params()["scale"], nn.Parameter) for q in refused)
    else:
        assert scales, "no quantizer of this backend has a trainable scale"
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in scales)
    assert not scales or sum(float(p.grad.abs().sum()) for p in scales) > 0


def test_forward_only_needs_no_autograd(case, inputs):
    """Under ``inference_mode`` (no autograd at all) the model computes what it computes with
    autograd on, and changes no state of its own (no observer or running statistic updates)."""
    _, x = inputs
    qmodel, view = fresh(case)
    view.freeze()
    for p in view.norm_parameters():
        p.requires_grad_(True)
    # torchao's train-mode pt2e export keeps ``num_batches_tracked.add_(1)`` in the graph: every
    # forward counts, in any mode (the counter is unused with a set momentum), so it is left out
    before = {k: v.clone() for k, v in qmodel.state_dict().items() if TRACKED not in k}
    with torch.inference_mode():
        out = qmodel(x)
    assert torch.isfinite(out).all()
    after = {k: v for k, v in qmodel.state_dict().items() if TRACKED not in k}
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in after.items())
    reference = qmodel(x)
    assert reference.requires_grad, "with autograd on, the norm parameters reach the output"
    assert torch.allclose(out, reference.detach(), rtol=1e-5, atol=1e-5 * float(out.abs().max()))


def test_adapt_runs_unchanged(case, inputs):
    _, x = inputs
    qmodel, _ = fresh(case)
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    run = qtta_plugins.adapt(qmodel, [x[:32], x[32:]])
    assert len(run.predictions) == len(x)
    assert all(torch.equal(before[k], v) for k, v in qmodel.state_dict().items())


def test_zoa_is_forward_only_and_adapts_on_every_backend(case, inputs):
    """Two forward passes per batch, no autograd, norm affines move; BN CNNs and LN transformers."""
    _, x = inputs
    qmodel, _ = fresh(case)
    # whole passes: the default pass 2 runs only the graph's suffix (tests/test_prefix.py)
    run = qtta_plugins.adapt(qmodel, None, "zoa", reuse_prefix=False)
    passes, grad = [0], []

    def count(module, args):
        passes[0] += 1
        grad.append(torch.is_grad_enabled())

    run.model.register_forward_pre_hook(count)
    before = [p.detach().clone() for p in run.method.params]
    for batch in (x[:32], x[32:]):
        run.step(batch)
    assert passes[0] == 4 and not any(grad)
    assert any(not torch.equal(a, p) for a, p in zip(before, run.method.params, strict=True))
    # Source statistics came from the calibration sample quantize() kept on the model.
    assert run.method.source_stats is not None and run.method.recorder.shift_target is not None


def test_families_are_what_they_claim():
    assert any(isinstance(m, nn.BatchNorm2d) for m in SmallBNCNN().modules())
    vit = TinyViT()
    assert not any(isinstance(m, nn.Conv2d) for m in vit.modules())
    assert any(isinstance(m, nn.LayerNorm) for m in vit.modules())


def test_a_new_view_puts_back_the_source_momentum(case):
    """Batch mode sets momentum 0; leaving it through another view of the model restores it."""
    qmodel, view = fresh(case)
    view.set_norm_mode("batch")
    qtta_plugins.quant_view(qmodel).set_norm_mode("source")
    modules = [m for m in qmodel.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    nodes = (
        [
            n
            for n in getattr(qmodel, "graph", None).nodes
            if n.op == "call_function" and n.target is torch.ops.aten.batch_norm.default
        ]
        if isinstance(qmodel, torch.fx.GraphModule)
        else []
    )
    assert all(m.momentum == 0.1 and not m.training for m in modules)
    assert all(n.args[6] == 0.1 and n.args[5] is False for n in nodes)
    if case[1] == "bncnn":
        assert modules or nodes

"""Low-bit PTQ on every backend (issue 14, part 1), at the small CNN's scale.

torchao's weight ranges come from the shared MSE search (as Brevitas' and NNCF's do), W6A6 is a
setting every backend takes, and the backends' clean accuracies agree: the same targets as the
ResNet-18 benchmark (``benchmarks/configs/lowbit_ptq_resnet18.yaml``), checked on the digits
CNN (W2A4 needs a long reconstruction, so its check is marked slow).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import qtta_plugins
from qtta_plugins.models import accuracy
from qtta_plugins.ranges import mse_symmetric_thresholds

BACKENDS = [b for b in ("torchao", "brevitas", "nncf") if importlib.util.find_spec(b) is not None]


@pytest.fixture(scope="module")
def held_out(digits):
    _, test = digits
    return test.x[:400], test.y[:400]


def test_torchao_weight_ranges_are_the_least_error_thresholds(float_cnn, calib) -> None:
    qmodel = qtta_plugins.quantize(float_cnn, "torchao", "w2a4", calib)
    view = qtta_plugins.quant_view(qmodel)
    checked = 0
    for layer in view.layers():
        handle = layer.weight_quantizer
        assert handle is not None
        _, qmax = handle.qrange
        if handle.bits != 2:
            continue  # first and last layers keep 8 bit
        w = view.weight_quantizer_input(layer)
        expected = mse_symmetric_thresholds(w, qmax) / qmax
        torch.testing.assert_close(handle.grid().scale.flatten(), expected, rtol=1e-5, atol=1e-8)
        # min-max would be absmax / qmax: the search clips at 2 bit, in every channel but a few
        absmax = w.reshape(w.shape[0], -1).abs().amax(1) / qmax
        assert (handle.grid().scale.flatten() < absmax - 1e-8).float().mean() > 0.5
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_w6a6_quantizes_on_every_backend(backend, float_cnn, calib, held_out) -> None:
    qmodel = qtta_plugins.quantize(float_cnn, backend, "w6a6", calib)
    view = qtta_plugins.quant_view(qmodel)
    bits = sorted({layer.weight_quantizer.bits for layer in view.layers()})
    assert bits == [6, 8]  # first and last layers at 8 bit, as configured
    x, y = held_out
    assert accuracy(qmodel, x, y) >= accuracy(float_cnn, x, y) - 1.5


def test_backends_agree_at_w4a4(float_cnn, calib, held_out) -> None:
    """W4A4 after ``quantize``: each backend within 2 points of the best (measured on the shipped
    model: torchao 97.75, Brevitas 97.5, NNCF 97.75 on these 400 images; W6A6 99.75 on all three)."""
    if len(BACKENDS) < 2:
        pytest.skip("needs two backends")
    x, y = held_out
    w4 = {b: accuracy(qtta_plugins.quantize(float_cnn, b, "w4a4", calib), x, y) for b in BACKENDS}
    assert max(w4.values()) - min(w4.values()) <= 2.0, w4
    assert min(w4.values()) >= 96.0, w4


@pytest.mark.slow
def test_backends_agree_at_w2a4_after_qdrop(float_cnn, calib, held_out) -> None:
    """Issue 14's W2A4 target at the small CNN's scale: after ``qdrop`` (200 iterations per block)
    every backend within 5 points of the best. With min-max weight ranges torchao stayed at chance
    (9 %); with per-backend activation rules torchao and NNCF ended 9.5 and 18.3 points below
    Brevitas. Measured with the shared ranges (benchmarks/lowbit_ptq.py at 18fa82c, now
    benchmarks/configs/lowbit_ptq_bncnn.yaml; 1024 calibration images, 3 seeds): Brevitas 67.8,
    NNCF 69.1, torchao 69.1 %."""
    if len(BACKENDS) < 2:
        pytest.skip("needs two backends")
    x, y = held_out
    w2 = {}
    for backend in BACKENDS:
        base = qtta_plugins.quantize(float_cnn, backend, "w2a4", calib)
        rec = qtta_plugins.reconstruct(base, float_cnn, calib, "qdrop", iters=200, seed=0)
        w2[backend] = accuracy(rec, x, y)
    assert max(w2.values()) - min(w2.values()) <= 5.0, w2
    assert min(w2.values()) >= 45.0, w2  # far above chance (10 %) and min-max (18-19 %)


def _layer_inputs(model: torch.nn.Module, names: list[str], batches: list[torch.Tensor]) -> dict:
    """Per named module of the float ``model``, its input on each of ``batches``."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    modules = dict(model.named_modules())
    hooks = [
        modules[n].register_forward_pre_hook(lambda m, a, _n=n: seen[_n].append(a[0].detach()))
        for n in names
    ]
    try:
        with torch.no_grad():
            for b in batches:
                model(b)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_bit_activation_ranges_follow_the_shared_percentile_rule(
    backend, float_cnn, calib
) -> None:
    """Below 8 bit every backend's layer-input range is the per-batch 99.999th percentile averaged
    over the calibration batches (qtta_plugins.ranges), not the min-max over all of them."""
    from qtta_plugins.ranges import ActivationRange

    # the rule alone: quantize's default then searches per quantizer (tests/test_ranges.py)
    qmodel = qtta_plugins.quantize(float_cnn, backend, "w4a4", calib, act_ranges="percentile")
    view = qtta_plugins.quant_view(qmodel)
    low = [layer for layer in view.layers() if layer.input_quantizer.bits < 8]
    assert len(low) >= 4
    inputs = _layer_inputs(float_cnn, [layer.name for layer in low], list(calib[:8]))
    for layer in low:
        stats = ActivationRange()
        for x in inputs[layer.name]:
            stats.update(x)
        grid = layer.input_quantizer.grid()
        top = float(grid.scale.flatten()[0]) * (grid.qmax - float(grid.zero_point.flatten()[0]))
        # within 5 %: torchao calibrates with its weight fake-quantizers on, so a layer sees the
        # quantized upstream layers' output, not exactly the float model's (3 % apart here)
        assert top == pytest.approx(float(stats.threshold()), rel=0.05), layer.name
        # the rule clips: min-max over the calibration set would be wider
        largest = max(float(x.max()) for x in inputs[layer.name])
        assert top < largest, layer.name


def test_nncf_puts_weights_on_the_grids_the_other_backends_use(float_cnn, calib) -> None:
    """Every conv / linear weight, the 8-bit first layer's too, on the shared least-error grid:
    NNCF's default overflow fix (half the 8-bit range on the first layer) is off, and tensors no
    layer reads (batch-norm outputs before residual sums, the pooled feature) keep 8 bit."""
    pytest.importorskip("nncf")
    pytest.importorskip("brevitas")
    grids = {}
    for backend in ("nncf", "brevitas"):
        view = qtta_plugins.quant_view(qtta_plugins.quantize(float_cnn, backend, "w4a4", calib))
        grids[backend] = {layer.name: layer.weight_quantizer.grid() for layer in view.layers()}
        if backend == "nncf":
            inputs = {id(layer.input_quantizer) for layer in view.layers()}
            extra = [q for q in view.quantizers() if q.role == "act" and id(q) not in inputs]
            assert len(extra) >= 3 and all(q.bits == 8 for q in extra)
    assert grids["nncf"].keys() == grids["brevitas"].keys()
    for name, grid in grids["nncf"].items():
        other = grids["brevitas"][name]
        assert (grid.qmin, grid.qmax) == (other.qmin, other.qmax), name
        torch.testing.assert_close(grid.scale, other.scale, rtol=1e-5, atol=0.0, msg=name)

"""The uniform integer grid (``Grid``, ``fake_quantize``, ``QuantizerHandle.grid/set_grid``) and
weight write-back (``QuantView.set_layer_weight``), checked against each backend's own forward.

Every comparison runs the backend's quantizer module itself (torchao ``FakeQuantize`` /
``IntxFakeQuantizer``, Brevitas' quant proxy, NNCF's quantizer hook) or the model's forward, never
our own re-implementation of it. Where a backend multiplies by ``1 / step`` (torch, torchao, NNCF)
it may round the other way than ``round(x / step)`` for inputs within ~1e-5 steps of a tie: such an
element may differ by exactly one step, and nowhere else (:func:`assert_quantizes_like`).
"""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")

import pytest
import torch
from torch import nn

import qtta_plugins
from qtta_plugins.view import Grid, QuantizerHandle, QuantView, fake_quantize

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*fast_hadamard_transform.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*children_specs.*:FutureWarning"),
]

TIE = 1e-4  # how close to a .5 tie (in steps) a one-step disagreement may lie
REL = 1e-6  # float32 rounding of the dequantized value, relative to scale and to the value


# --- helpers -----------------------------------------------------------------------------------
def assert_quantizes_like(y: torch.Tensor, x: torch.Tensor, grid: Grid) -> int:
    """``y`` (a backend's output for ``x``) is ``fake_quantize(x, grid)`` to float32 rounding
    (``REL`` of the step and of the value), except for elements within ``TIE`` steps of a
    rounding tie, which may be one step off. Returns how many were."""
    ref = fake_quantize(x, grid)
    s = grid.along(grid.scale, x.ndim)
    zp = grid.along(grid.zero_point, x.ndim)
    diff = (y.detach() - ref).abs()
    tol = REL * (s + ref.abs())
    off = diff > tol
    position = x / s + zp
    tie = ((position - position.floor()) - 0.5).abs() < TIE
    one_step = (diff - s).abs() <= tol
    bad = off & ~(tie & one_step)
    assert not bad.any(), (
        f"{int(bad.sum())} of {x.numel()} elements differ: max {float((diff / s)[bad].max()):.3g} "
        "steps, not at a tie"
    )
    return int(off.sum())


def assert_on_grid_exactly(used: torch.Tensor, target: torch.Tensor, grid: Grid) -> None:
    """A quantizer's output for a tensor already on ``grid`` is that tensor, to float32 rounding
    of the dequantized value (NNCF computes ``k / (1 / step)``, one ulp off ``k * step``)."""
    scale = grid.along(grid.scale, target.ndim)
    assert ((used - target).abs() <= REL * (scale + target.abs())).all()


def run_quantizer(handle: QuantizerHandle, x: torch.Tensor) -> torch.Tensor:
    """The backend's own quantizer module applied to ``x``."""
    with torch.no_grad():
        if hasattr(handle, "proxy"):  # Brevitas: the proxy returns a QuantTensor or a tensor
            out = handle.proxy(x)
            return getattr(out, "value", out)
        return handle.module(x)


def spanning(grid: Grid, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random values over the grid's range and 20 % beyond each end (per channel on axis 0)."""
    gen = torch.Generator().manual_seed(seed)
    s = grid.along(grid.scale, len(shape))
    zp = grid.along(grid.zero_point, len(shape))
    lo, hi = (grid.qmin - zp) * s, (grid.qmax - zp) * s
    u = torch.rand(shape, generator=gen) * 1.4 - 0.2
    return lo + u * (hi - lo)


def snapped(
    w: torch.Tensor, grid: Grid, fraction: float = 0.2, keep_extremes: bool = False, seed: int = 0
) -> torch.Tensor:
    """``w`` rounded onto ``grid`` with ``fraction`` of the elements moved one step up or down,
    inside ``[qmin, qmax]`` (what AdaRound's learned rounding does). ``keep_extremes``: elements at
    ``qmin`` / ``qmax`` stay (the precondition of stats-based weight scales)."""
    gen = torch.Generator().manual_seed(seed)
    s = grid.along(grid.scale, w.ndim)
    zp = grid.along(grid.zero_point, w.ndim)
    k = torch.clamp(torch.round(w / s) + zp, grid.qmin, grid.qmax)
    step = torch.randint(0, 2, w.shape, generator=gen) * 2 - 1
    move = torch.rand(w.shape, generator=gen) < fraction
    if keep_extremes:
        move &= (k > grid.qmin) & (k < grid.qmax)
    k = torch.clamp(k + move * step, grid.qmin, grid.qmax)
    return (k - zp) * s


def quantized_weights(view: QuantView, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What each layer's weight quantizer outputs during one forward of the model."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for layer in view.layers():
        handle = layer.weight_quantizer
        module = handle.proxy if hasattr(handle, "proxy") else handle.module

        def keep(_m, _args, out, name=layer.name):
            seen.setdefault(name, getattr(out, "value", out).detach().clone())

        hooks.append(module.register_forward_hook(keep))
    try:
        with torch.no_grad():
            view.model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def is_asymmetric(handle: QuantizerHandle) -> bool:
    """Quantizers with a settable zero point in these tests (torchao affine activations, NNCF
    asymmetric quantizers)."""
    module = getattr(handle, "module", None)
    if getattr(module, "qscheme", None) in (torch.per_tensor_affine, torch.per_channel_affine):
        return True
    return getattr(handle, "symmetric", True) is False


# --- models ------------------------------------------------------------------------------------
# W4A4 keeps the first and last layer at 8 bit (QuantConfig.first_last_bits), so it has weight and
# activation quantizers at both 8 and 4 bits (checked below); torchao's W8A8 comes free with the
# session's `qcnn`, the other backends' would only cost time.
MODELS = (("torchao", "w8a8"), ("torchao", "w4a4"), ("brevitas", "w4a4"), ("nncf", "w4a4"))


@pytest.fixture(scope="module")
def images(digits):
    _, test = digits
    return test.x[:16]


@pytest.fixture(scope="module")
def originals(request, float_cnn, calib):
    """(backend, bits) -> a quantized copy of the digits BN-CNN (do not mutate: copy first)."""
    built: dict[tuple[str, str], nn.Module] = {}

    def get(backend: str, bits: str) -> nn.Module:
        if backend == "torchao":
            return request.getfixturevalue("qcnn")[bits]  # the session's, built on first use
        if (backend, bits) not in built:
            if backend == "brevitas":
                pytest.importorskip("brevitas")
                model = qtta_plugins.quantize(float_cnn, "brevitas", bits, calib[:2])
            else:
                pytest.importorskip("nncf")
                model = qtta_plugins.quantize(float_cnn, "nncf", bits, calib, calib_batches=2)
            built[backend, bits] = model
        return built[backend, bits]

    return get


@pytest.fixture(params=MODELS, ids=lambda p: "-".join(p))
def qmodel(request, originals):
    backend, bits = request.param
    if backend == "torchao":
        pytest.importorskip("torchao")
    model = qtta_plugins.view.copy_model(originals(backend, bits))
    return backend, bits, model


# --- the core ----------------------------------------------------------------------------------
def test_fake_quantize_is_the_formula_per_tensor_and_per_channel():
    # x / 0.5 = -8, -2.5, 0.5, 1.5, 2.5, 3.5, 18: rounded half to even -8, -2, 0, 2, 2, 4, 18;
    # + 2 and clamped to [0, 7]: 0, 0, 2, 4, 4, 6, 7
    x = torch.tensor([-4.0, -1.25, 0.25, 0.75, 1.25, 1.75, 9.0])
    grid = Grid(torch.tensor(0.5), torch.tensor(2.0), 0, 7, None)
    expected = (torch.tensor([0.0, 0.0, 2.0, 4.0, 4.0, 6.0, 7.0]) - 2.0) * 0.5
    assert torch.equal(fake_quantize(x, grid), expected)

    w = torch.tensor([[0.3, -0.3, 0.9], [0.3, -0.3, 0.9]])
    per_channel = Grid(torch.tensor([0.2, 0.4]), torch.zeros(2), -2, 2, 0)
    assert torch.allclose(
        fake_quantize(w, per_channel),
        torch.tensor([[0.4, -0.4, 0.4], [0.4, -0.4, 0.8]]),
        atol=1e-7,
    )
    # the channel axis of a grid runs along that axis of the tensor, whatever its rank
    w3 = w.T.reshape(3, 2, 1)
    along1 = Grid(per_channel.scale, per_channel.zero_point, -2, 2, 1)
    assert torch.equal(fake_quantize(w3, along1).reshape(3, 2).T, fake_quantize(w, per_channel))


def test_grid_checks_what_it_holds():
    with pytest.raises(ValueError, match="same shape"):
        Grid(torch.ones(3), torch.zeros(()), -7, 7, 0)
    with pytest.raises(ValueError, match="ch_axis"):
        Grid(torch.ones(3), torch.zeros(3), -7, 7, None)
    grid = Grid(torch.ones(3), torch.zeros(3), -7, 7, 0)
    with pytest.raises(ValueError, match="shape"):
        grid.with_values(torch.ones(4))
    with pytest.raises(ValueError, match="positive"):
        grid.with_values(torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="integer"):
        grid.with_values(torch.ones(3), torch.full((3,), 0.5))
    with pytest.raises(ValueError, match=r"\[-7, 7\]"):
        grid.with_values(torch.ones(3), torch.full((3,), 8.0))
    assert torch.equal(grid.with_values(torch.full((3,), 2.0)).zero_point, grid.zero_point)


def test_the_base_handle_says_it_cannot():
    class Bare(QuantizerHandle):
        name, role = "bare", "act"
        bits = enabled = qrange = ch_axis = None  # type: ignore[assignment]

        def params(self) -> dict[str, torch.Tensor]:
            return {}

    with pytest.raises(NotImplementedError, match="Bare"):
        Bare().grid()
    with pytest.raises(NotImplementedError, match="Bare"):
        Bare().set_grid(torch.tensor(1.0))


# --- 1. grid() is what the backend's quantizer applies ------------------------------------------
def test_grid_is_what_the_backend_quantizer_applies(qmodel):
    backend, bits, model = qmodel
    view = qtta_plugins.quant_view(model)
    widths = {(h.role, h.bits) for h in view.quantizers()}
    if bits == "w4a4":
        assert widths == {("weight", 8), ("weight", 4), ("act", 8), ("act", 4)}
    flips = 0
    for layer in view.layers():
        handle = layer.weight_quantizer
        grid = handle.grid()
        assert (grid.qmin, grid.qmax) == handle.qrange
        assert grid.ch_axis == 0 and grid.scale.shape == (layer.weight.shape[0],)
        assert (grid.zero_point == 0).all()  # symmetric weights on every backend here
        w = view.weight_quantizer_input(layer)
        flips += assert_quantizes_like(run_quantizer(handle, w), w, grid)
        x = spanning(grid, tuple(w.shape))
        flips += assert_quantizes_like(run_quantizer(handle, x), x, grid)
    for handle in view.quantizers():
        if handle.role != "act":
            continue
        grid = handle.grid()
        assert grid.ch_axis is None and grid.scale.shape == ()
        assert grid.qmax - grid.qmin + 1 == 2**handle.bits
        x = spanning(grid, (4, 2500))
        flips += assert_quantizes_like(run_quantizer(handle, x), x, grid)
    if backend == "brevitas":  # divides by the scale, rounds with torch.round: bit-exact
        assert flips == 0


# --- 2. set_grid() writes a grid the backend's forward then applies ----------------------------
def test_set_grid_round_trip(qmodel):
    backend, _, model = qmodel
    view = qtta_plugins.quant_view(model)
    shapes = {layer.weight_quantizer.name: tuple(layer.weight.shape) for layer in view.layers()}
    shifted_some = False
    for handle in view.quantizers():
        before = handle.grid()
        zp = before.zero_point
        if is_asymmetric(handle):
            zp = torch.clamp(zp + 3, before.qmin, before.qmax)
            shifted_some = True
        else:
            with pytest.raises(NotImplementedError, match="zero point"):
                handle.set_grid(before.scale * 1.3, torch.clamp(zp + 1, before.qmin, before.qmax))
            assert torch.equal(handle.grid().scale, before.scale)  # refused: nothing written
        handle.set_grid(before.scale * 1.3, zp)
        after = handle.grid()
        assert torch.allclose(after.scale, before.scale * 1.3, rtol=1e-6, atol=0)
        assert torch.equal(after.zero_point, zp)
        assert (after.qmin, after.qmax, after.ch_axis) == (before.qmin, before.qmax, before.ch_axis)
        shape = shapes.get(handle.name, (4, 2500))
        x = spanning(after, shape, seed=1)
        assert_quantizes_like(run_quantizer(handle, x), x, after)
    assert shifted_some == (backend == "torchao")  # torchao's activations are affine here


# --- 3. weight write-back is exact -------------------------------------------------------------
def test_snapped_weights_are_what_the_backend_forward_uses(qmodel, images):
    _, _, model = qmodel
    view = qtta_plugins.quant_view(model)
    grids, targets = {}, {}
    for layer in view.layers():
        grid = grids[layer.name] = layer.weight_quantizer.grid()
        targets[layer.name] = snapped(view.weight_quantizer_input(layer), grid)
        view.set_layer_weight(layer, targets[layer.name])
    used = quantized_weights(view, images)
    for layer in view.layers():
        target, grid = targets[layer.name], grids[layer.name]
        assert torch.equal(layer.weight_quantizer.grid().scale, grid.scale)
        assert_on_grid_exactly(used[layer.name], target, grid)
        # the weight itself is the snapped one (up to the inverse of a folded norm, an ulp)
        assert torch.allclose(view.weight_quantizer_input(layer), target, rtol=1e-6, atol=0)


def test_set_layer_weight_checks_the_shape(qmodel):
    _, _, model = qmodel
    view = qtta_plugins.quant_view(model)
    layer = view.layers()[1]
    with pytest.raises(ValueError, match="shape"):
        view.set_layer_weight(layer, torch.zeros(3, 3))


# --- 4. the whole model after write-back, and snapshot / restore -------------------------------
def test_model_after_write_back_and_restore(qmodel, images):
    _, _, model = qmodel
    view = qtta_plugins.quant_view(model)
    view.set_norm_mode("source")
    with torch.no_grad():
        original_out = model(images)
    original_grids = {h.name: h.grid() for h in view.quantizers()}
    original_weights = {x.name: view.weight_quantizer_input(x) for x in view.layers()}
    snap = view.snapshot()

    for layer in view.layers():
        view.set_layer_weight(
            layer, snapped(original_weights[layer.name], layer.weight_quantizer.grid())
        )
    for handle in view.quantizers():
        if handle.role == "act":
            handle.set_grid(handle.grid().scale * 1.3)
    with torch.no_grad():
        changed_out = model(images)
    assert not torch.allclose(changed_out, original_out)

    # Reference: the weights are on their grids, so the model with its weight quantizers switched
    # off computes the same (activation quantizers off in both runs: no tie can amplify an ulp).
    acts = [h for h in view.quantizers() if h.role == "act"]
    weights = [layer.weight_quantizer for layer in view.layers()]
    for h in acts:
        h.enabled = False
    with torch.no_grad():
        quantized_w = model(images)
        for h in weights:
            h.enabled = False
        float_w = model(images)
    assert torch.allclose(quantized_w, float_w, rtol=1e-5, atol=1e-5 * float(float_w.abs().max()))
    for h in acts + weights:
        h.enabled = True

    view.restore(snap)
    for handle in view.quantizers():
        grid, before = handle.grid(), original_grids[handle.name]
        assert torch.equal(grid.scale, before.scale) and torch.equal(
            grid.zero_point, before.zero_point
        )
    for layer in view.layers():
        assert torch.equal(view.weight_quantizer_input(layer), original_weights[layer.name])
    with torch.no_grad():
        assert torch.equal(model(images), original_out)


# --- backend specifics ---------------------------------------------------------------------------
def test_torchao_qat_graph_weight_is_folded_with_its_batch_norm(qcnn):
    """The QAT graph quantizes ``w * gamma / sqrt(var + eps)``, not the conv weight itself."""
    view = qtta_plugins.quant_view(qtta_plugins.view.copy_model(qcnn["w4a4"]))
    layer = next(x for x in view.layers() if x.name == "layer1.conv1")
    assert not torch.allclose(view.weight_quantizer_input(layer), layer.weight)
    target = snapped(view.weight_quantizer_input(layer), layer.weight_quantizer.grid())
    view.set_layer_weight(layer, target)
    assert not torch.allclose(layer.weight, target)  # stored unfolded
    used = run_quantizer(layer.weight_quantizer, view.weight_quantizer_input(layer))
    assert torch.equal(used, target)


def test_torchao_set_grid_switches_the_observer_off_and_sets_its_range(qcnn, images):
    model = qtta_plugins.view.copy_model(qcnn["w8a8"])
    view = qtta_plugins.quant_view(model)
    handle = view.layers()[1].input_quantizer
    handle.module.enable_observer()
    grid = handle.grid()
    handle.set_grid(grid.scale * 1.3)
    with torch.no_grad():
        model(images * 3)  # an observer left on would re-derive the scale from this batch
    assert torch.allclose(handle.grid().scale, grid.scale * 1.3, rtol=1e-6)
    # convert_pt2e reads its quantize parameters from the observer, not the buffers.
    for h in (handle, view.layers()[1].weight_quantizer):
        g = h.grid()
        h.set_grid(g.scale * 0.7, g.zero_point if h.ch_axis is not None else g.zero_point + 3)
        scale, zero_point = h.module.calculate_qparams()
        assert torch.allclose(scale.float().reshape(g.scale.shape), h.grid().scale, rtol=1e-6)
        assert torch.equal(zero_point.float().reshape(g.zero_point.shape), h.grid().zero_point)


def converted_graph() -> torch.fx.GraphModule:
    """A conv in the layout ``convert_pt2e`` gives (checked against its output on torchao 0.18):
    ``quantize_per_tensor(x, scale, zp, qmin, qmax, dtype)`` -> ``dequantize_per_tensor`` on the
    input, ``dequantize_per_channel(int8 weight, scales, zps, axis, qmin, qmax, dtype)`` on the
    weight. Built by hand: ``convert_pt2e`` itself takes ~30 s here, even on a one-conv model."""
    pytest.importorskip("torchao")
    import torchao.quantization.pt2e  # noqa: F401  (registers the quantized_decomposed ops)

    qd = torch.ops.quantized_decomposed
    gen = torch.Generator().manual_seed(0)
    root = nn.Module()
    root.register_buffer("w_int", torch.randint(-7, 8, (4, 2, 3, 3), generator=gen).to(torch.int8))
    root.register_buffer("w_scale", torch.rand(4, generator=gen) * 0.1 + 0.01)
    root.register_buffer("w_zp", torch.zeros(4, dtype=torch.int64))
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    act = (0.05, 3, 0, 15, torch.uint8)
    q = graph.call_function(qd.quantize_per_tensor.default, (x, *act))
    dq = graph.call_function(qd.dequantize_per_tensor.default, (q, *act))
    w_args = tuple(graph.get_attr(n) for n in ("w_int", "w_scale", "w_zp"))
    w = graph.call_function(qd.dequantize_per_channel.default, (*w_args, 0, -7, 7, torch.int8))
    graph.output(graph.call_function(torch.ops.aten.conv2d.default, (dq, w)))
    return torch.fx.GraphModule(root, graph)


def test_torchao_converted_graph_grids_are_read_only():
    gm = converted_graph()
    view = qtta_plugins.quant_view(gm)
    assert type(view).__name__ == "ConvertedView"
    (layer,) = view.layers()
    grid = layer.weight_quantizer.grid()
    assert (grid.qmin, grid.qmax, grid.ch_axis) == (-7, 7, 0)
    w = view.weight_quantizer_input(layer)
    assert torch.equal(w, (gm.w_int.float() * gm.w_scale.reshape(4, 1, 1, 1)))
    assert torch.equal(fake_quantize(w, grid), w)
    with pytest.raises(NotImplementedError, match="convert_pt2e"):
        view.set_layer_weight(layer, w)

    handle = layer.input_quantizer
    grid = handle.grid()
    assert float(grid.scale) == pytest.approx(0.05, rel=1e-7)  # float32 of the graph's double
    assert (float(grid.zero_point), grid.qmin, grid.qmax) == (3, 0, 15)
    q, dq = handle.node.args[0], handle.node
    x = spanning(grid, (4, 2500))
    y = dq.target(q.target(x, *q.args[1:]), *dq.args[1:])  # the graph's own ops
    assert_quantizes_like(y, x, grid)
    for handle in (layer.weight_quantizer, layer.input_quantizer):
        with pytest.raises(NotImplementedError, match="convert_pt2e"):
            handle.set_grid(handle.grid().scale)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_torchao_qat_linear_weight_grid_and_write_back():
    pytest.importorskip("torchao")
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    model = qtta_plugins.quantize(MLP().eval(), "torchao", "w4a4", [x])
    view = qtta_plugins.quant_view(model)
    layer = view.layers()[1]  # the inner layer: 4 bit
    handle = layer.weight_quantizer
    assert handle.bits == 4
    grid = handle.grid()
    assert_quantizes_like(run_quantizer(handle, layer.weight.detach()), layer.weight.detach(), grid)
    handle.set_grid(grid.scale * 1.3)
    assert torch.allclose(handle.grid().scale, grid.scale * 1.3, rtol=1e-6)
    target = snapped(layer.weight.detach(), handle.grid())
    view.set_layer_weight(layer, target)
    assert torch.equal(run_quantizer(handle, layer.weight.detach()), target)
    with pytest.raises(NotImplementedError, match="zero point"):
        handle.set_grid(grid.scale, torch.ones_like(grid.zero_point))
    # per-token activations get their scale from each input: no grid to read or write
    with pytest.raises(NotImplementedError, match="dynamic"):
        layer.input_quantizer.grid()
    with pytest.raises(NotImplementedError, match="dynamic"):
        layer.input_quantizer.set_grid(torch.tensor(1.0))


class BrevitasDefaults(nn.Module):
    """Brevitas' default quantizers: weight scales recomputed from the weight on every call
    (per-tensor abs-max by default, per-channel abs-max for ``conv2``)."""

    def __init__(self) -> None:
        super().__init__()
        import brevitas.nn as qnn
        from brevitas.quant import Int8WeightPerChannelFloat

        self.conv = qnn.QuantConv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = qnn.QuantReLU()
        self.conv2 = qnn.QuantConv2d(8, 8, 3, padding=1, weight_quant=Int8WeightPerChannelFloat)
        self.relu2 = qnn.QuantReLU()
        self.fc = qnn.QuantLinear(8, 10, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu2(self.conv2(self.relu(self.bn(self.conv(x))))).mean((2, 3)))


@pytest.mark.parametrize("bits", [8, 4])
def test_brevitas_stats_based_weight_scale(bits, images):
    """grid() works, set_grid() cannot, and write-back is exact while each channel's extreme
    element stays at its grid extreme (the recomputed abs-max scale is then unchanged)."""
    pytest.importorskip("brevitas")
    torch.manual_seed(0)
    model = BrevitasDefaults().eval()
    view = qtta_plugins.quant_view(model)
    layers = view.layers()
    assert [x.weight_quantizer.grid().scale.shape for x in layers] == [(), (8,), ()]
    for layer in layers:
        layer.weight_quantizer.bits = bits
    for layer in layers:
        handle = layer.weight_quantizer
        grid = handle.grid()
        w = layer.weight.detach()
        assert_quantizes_like(run_quantizer(handle, w), w, grid)
        with pytest.raises(NotImplementedError, match="recomputes its scale"):
            handle.set_grid(grid.scale * 1.3)

        target = snapped(w, grid, fraction=0.3, keep_extremes=True)
        view.set_layer_weight(layer, target)
        assert torch.allclose(handle.grid().scale, grid.scale, rtol=1e-6, atol=0)
        scale = grid.along(grid.scale, w.ndim)
        used = layer.weight_quantizer.proxy(layer.weight).value
        assert_on_grid_exactly(used, target, grid)

        # the precondition matters: with the extremes moved in one step, the recomputed scale
        # shrinks by (qmax - 1) / qmax and every snapped value moves with it
        extreme = (target / scale).round().abs() == grid.qmax
        view.set_layer_weight(
            layer, torch.where(extreme, target * (grid.qmax - 1) / grid.qmax, target)
        )
        ratio = handle.grid().scale / grid.scale
        assert torch.allclose(ratio, torch.full_like(ratio, (grid.qmax - 1) / grid.qmax), rtol=1e-5)

    # the activation quantizer (runtime statistics, a learned threshold once materialised) can
    relu = layers[-1].input_quantizer
    grid = relu.grid()
    relu.set_grid(grid.scale * 1.3)
    x = spanning(relu.grid(), (4, 2500))
    assert_quantizes_like(run_quantizer(relu, x), x, relu.grid())


@pytest.mark.parametrize("half_range", [False, True], ids=["full", "half-range"])
@pytest.mark.parametrize("log_storage", [False, True], ids=["linear", "log"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
@pytest.mark.parametrize("bits", [8, 4])
def test_nncf_quantizer_storages(symmetric, log_storage, bits, half_range):
    """NNCF's two quantizers, each with its linear and its log-domain storage, per channel, with
    and without NNCF's overflow fix (``half_range``: a user's own ``nncf.quantize`` model may have
    it; the forward then uses one bit less, which ``grid()`` must describe)."""
    pytest.importorskip("nncf")
    from qtta_nncf._backend import nncf_module
    from qtta_nncf.view import NNCFQuantizerHandle

    layers = nncf_module("nncf.torch.quantization.layers")
    mode = nncf_module("nncf.common.quantization.structs").QuantizationScheme
    spec = layers.PTQuantizerSpec(
        num_bits=bits,
        mode=mode.SYMMETRIC if symmetric else mode.ASYMMETRIC,
        signedness_to_force=True,
        narrow_range=False,
        half_range=half_range,
        scale_shape=(6, 1),
        logarithm_scale=log_storage,
    )
    quantizer = (layers.SymmetricQuantizer if symmetric else layers.AsymmetricQuantizer)(spec)
    assert quantizer._half_range == half_range
    with torch.no_grad():  # some calibrated-looking ranges
        if symmetric:
            quantizer.scale = nn.Parameter(torch.linspace(0.5, 2.0, 6).reshape(6, 1))
        else:
            quantizer.input_low.copy_(torch.linspace(-1.0, -0.3, 6).reshape(6, 1))
            quantizer.input_range = nn.Parameter(torch.linspace(1.5, 3.0, 6).reshape(6, 1))
    assert quantizer.is_using_log_scale_storage == log_storage
    handle = NNCFQuantizerHandle("q", quantizer, "weight")
    assert handle.symmetric == symmetric

    grid = handle.grid()
    assert grid.qmax - grid.qmin + 1 == 2 ** (bits - half_range)  # the levels the forward uses
    assert grid.ch_axis == 0 and grid.scale.shape == (6,)
    x = spanning(grid, (6, 4000))
    assert_quantizes_like(run_quantizer(handle, x), x, grid)

    new_zp = (
        grid.zero_point if symmetric else torch.clamp(grid.zero_point + 5, grid.qmin, grid.qmax)
    )
    handle.set_grid(grid.scale * 1.3, new_zp)
    after = handle.grid()
    assert torch.allclose(after.scale, grid.scale * 1.3, rtol=1e-6, atol=0)
    assert torch.equal(after.zero_point, new_zp)
    storage = quantizer._scale_param_storage if symmetric else quantizer._input_range_param_storage
    threshold = quantizer.scale if symmetric else quantizer.input_range
    expected = after.scale * (quantizer.level_high if symmetric else quantizer.levels - 1)
    assert torch.allclose(threshold.flatten(), expected, rtol=1e-6)
    if log_storage:
        assert torch.allclose(storage.flatten(), expected.log(), rtol=1e-6)
    x = spanning(after, (6, 4000), seed=1)
    assert_quantizes_like(run_quantizer(handle, x), x, after)

    # write-back through the quantizer: a weight on the grid comes back exactly
    target = snapped(spanning(after, (6, 64), seed=2), after)
    used = run_quantizer(handle, target)
    assert_on_grid_exactly(used, target, after)


def test_nncf_log_storage_in_a_model_is_restored(originals, images):
    """A quantizer with log-domain storage (NNCF's ``logarithm_scale``) put into a quantized model:
    its grid is set, and snapshot / restore puts it back (NNCF's state dict holds only a copy)."""
    from qtta_nncf._backend import nncf_module

    model = qtta_plugins.view.copy_model(originals("nncf", "w4a4"))
    view = qtta_plugins.quant_view(model)
    old_handle = view.layers()[1].weight_quantizer
    old = old_handle.module
    layers = nncf_module("nncf.torch.quantization.layers")
    mode = nncf_module("nncf.common.quantization.structs").QuantizationScheme
    spec = layers.PTQuantizerSpec(
        old.num_bits, mode.SYMMETRIC, True, old.level_low == -old.level_high, False,
        tuple(old.scale_shape), True,
    )  # fmt: skip
    log_q = layers.SymmetricQuantizer(spec)
    log_q.scale = nn.Parameter(old.scale.detach().clone())
    parent, _, child = old_handle.name.rpartition(".")
    setattr(model.get_submodule(parent), child, log_q)
    with torch.no_grad():
        expected = model(images)
    handle = next(h for h in view.quantizers() if h.name == old_handle.name)
    assert handle.module is log_q and log_q.is_using_log_scale_storage
    before = handle.grid()
    assert torch.allclose(before.scale, old_handle.grid().scale, rtol=1e-6)
    snap = view.snapshot()
    handle.set_grid(before.scale * 1.3)
    assert torch.allclose(handle.grid().scale, before.scale * 1.3, rtol=1e-6)
    view.restore(snap)
    assert torch.equal(handle.grid().scale, before.scale)
    with torch.no_grad():
        assert torch.equal(model(images), expected)


def test_nncf_range_with_zero_off_the_grid():
    """NNCF's TuneRange leaves a range alone when its zero point rounds to 0 (here -input_low is
    0.3 steps): grid() warns that NNCF rounds with an offset; set_grid() writes an aligned range
    that NNCF then applies exactly."""
    pytest.importorskip("nncf")
    from qtta_nncf._backend import nncf_module
    from qtta_nncf.view import NNCFQuantizerHandle

    layers = nncf_module("nncf.torch.quantization.layers")
    mode = nncf_module("nncf.common.quantization.structs").QuantizationScheme
    spec = layers.PTQuantizerSpec(4, mode.ASYMMETRIC, None, False, False, (1,), False)
    quantizer = layers.AsymmetricQuantizer(spec)
    with torch.no_grad():
        quantizer.input_low.fill_(-0.06)
        quantizer.input_range = nn.Parameter(torch.tensor([3.0]))
    handle = NNCFQuantizerHandle("q", quantizer, "act")
    with pytest.warns(RuntimeWarning, match="off the grid"):
        grid = handle.grid()
    assert float(grid.zero_point) == 0.0
    x = spanning(grid, (4, 2500))
    with pytest.raises(AssertionError, match="not at a tie"):
        assert_quantizes_like(run_quantizer(handle, x), x, grid)
    handle.set_grid(grid.scale, grid.zero_point)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        after = handle.grid()
    assert torch.allclose(after.scale, grid.scale, rtol=1e-6)
    assert_quantizes_like(run_quantizer(handle, x), x, after)


def test_a_grid_is_a_copy(qcnn):
    view = qtta_plugins.quant_view(qcnn["w8a8"])
    handle = view.layers()[0].weight_quantizer
    grid = handle.grid()
    grid.scale.mul_(2)
    assert not torch.equal(handle.grid().scale, grid.scale)

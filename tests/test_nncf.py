"""The NNCF adapter: quantization at low bit-widths, backend detection and the uniform view."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings

# NNCF compiles a C++ extension on first use (~60 s on 2 cores): no time limit on that build.
os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")

import pytest
import torch

import qtta_plugins
from qtta_plugins.models import TinyViT

nncf = pytest.importorskip("nncf")


@pytest.fixture(scope="module", autouse=True)
def nncf_plugin():
    """The adapter as installed: registered through the ``qtta_plugins`` entry point."""
    import qtta_nncf.plugin as plugin

    from qtta_plugins.plugins import plugin_manager

    assert plugin_manager().is_registered(plugin), (
        "qtta_nncf.plugin is not registered by its entry point"
    )
    return plugin


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


@pytest.fixture(scope="module")
def clean_batch(digits):
    _, test = digits
    return test.x[:128]


@pytest.fixture(scope="module")
def small_batch(digits):
    _, test = digits
    return test.x[:32]


@pytest.fixture(scope="module")
def nqcnn(float_cnn, calib, nncf_plugin):
    """bits tag -> NNCF model from ``qtta_plugins.quantize`` (do not mutate: copy first)."""
    return {
        bits: qtta_plugins.quantize(float_cnn, "nncf", bits, calib, calib_batches=2)
        for bits in ("w8a8", "w4a4", "w2a4")
    }


@pytest.fixture(scope="module")
def user_qcnn(float_cnn, calib):
    """A model quantized with NNCF's own API, as a user would (do not mutate: copy first)."""
    return nncf.quantize(float_cnn, nncf.Dataset(calib[:2]), subset_size=2)


@pytest.fixture(scope="module")
def shifted(digits):
    """Two batches of a shifted domain (noise + contrast change) of the digits test split."""
    _, test = digits
    gen = torch.Generator().manual_seed(0)
    x = 0.6 * test.x[200:264] + 0.3 * torch.randn(64, *test.x.shape[1:], generator=gen)
    return [(x[i : i + 32].clamp(0, 1), test.y[200 + i : 232 + i]) for i in (0, 32)]


@pytest.fixture(scope="module")
def nqvit(nncf_plugin):
    torch.manual_seed(0)
    model = TinyViT().eval()
    calib = [torch.rand(32, 1, 32, 32)]
    return model, {
        bits: qtta_plugins.quantize(model, "nncf", bits, calib) for bits in ("w8a8", "w4a4")
    }


# --- plugin ----------------------------------------------------------------------------------
def test_importing_the_plugin_does_not_import_nncf():
    code = (
        "import sys, qtta_nncf.plugin as p; "
        "assert p.qtta_backends() == ['nncf']; "
        "assert 'nncf' not in sys.modules, 'nncf imported'"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_a_missing_nncf_names_the_extra(monkeypatch):
    from qtta_nncf._backend import nncf_module

    monkeypatch.setitem(sys.modules, "nncf_not_installed_here", None)
    with pytest.raises(qtta_plugins.BackendNotInstalledError, match=r"qtta-plugins\[nncf\]"):
        nncf_module("nncf_not_installed_here")


def test_torch_fallback_runs_without_building_the_extension(tmp_path):
    """QTTA_NNCF_TORCH_FALLBACK=1: NNCF's pure-torch kernels, nothing compiled."""
    code = (
        "import torch, qtta_plugins\n"
        "from qtta_plugins.plugins import plugin_manager\n"
        "import qtta_nncf.plugin as p\n"
        "pm = plugin_manager(); pm.is_registered(p) or pm.register(p, name='nncf')\n"
        "torch.manual_seed(0)\n"
        "from qtta_plugins.models import SmallBNCNN\n"
        "m = SmallBNCNN(width=4).eval()\n"
        "x = torch.rand(8, 1, 32, 32)\n"
        "q = qtta_plugins.quantize(m, 'nncf', 'w4a4', [x])\n"
        "q(x).sum().backward()\n"
        "from nncf.torch.quantization.extensions import QuantizedFunctionsCPU as F\n"
        "assert 'EagerReference' in F._loaded_namespace.__qualname__\n"
    )
    ext_dir = tmp_path / "torch_extensions"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(sys.path),
        "QTTA_NNCF_TORCH_FALLBACK": "1",
        "TORCH_EXTENSIONS_DIR": str(ext_dir),
        "OMP_NUM_THREADS": "1",
    }
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
    assert not list(ext_dir.rglob("*.so"))  # nothing was built


def test_float_models_are_not_claimed(float_cnn):
    with pytest.raises(
        qtta_plugins.UnknownBackendError, match=r"no installed backend adapter recognises"
    ):
        qtta_plugins.quant_view(float_cnn)
    assert "nncf" in qtta_plugins.available_backends()
    seq = torch.nn.Sequential(torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"top-level nn.Sequential"):
        qtta_plugins.quantize(seq, "nncf", "w8a8", [torch.rand(2, 4)])


# --- quantization ----------------------------------------------------------------------------
def test_cnn_error_against_float_is_bounded_and_grows_as_bits_drop(float_cnn, nqcnn, clean_batch):
    with torch.no_grad():
        ref = float_cnn(clean_batch)
        errors = {bits: rel_error(qm(clean_batch), ref) for bits, qm in nqcnn.items()}
        agree = (nqcnn["w8a8"](clean_batch).argmax(1) == ref.argmax(1)).float().mean()
    # measured (2 calibration batches): w8a8 0.043, w4a4 0.31, w2a4 1.12
    assert errors["w8a8"] < 0.08, errors
    assert errors["w4a4"] < 0.6, errors
    assert errors["w8a8"] < errors["w4a4"] < errors["w2a4"], errors
    assert agree > 0.97


def test_quantize_leaves_the_float_model_untouched(float_cnn, nqcnn):
    from qtta_plugins.models import train_source_model

    pristine = train_source_model("bncnn", "digits", seed=0, progress=False).state_dict()
    now = float_cnn.state_dict()  # after nqcnn quantized it three times
    assert set(pristine) == set(now) and all(torch.equal(pristine[k], now[k]) for k in now)
    assert not float_cnn.training and "__nncf_hooks" not in float_cnn._modules
    assert not float_cnn._forward_pre_hooks and "forward" not in float_cnn.__dict__
    qm = nqcnn["w4a4"]
    assert type(qm) is type(float_cnn)  # NNCF keeps the model's class
    # BatchNorm is not folded, and with bias correction off no parameter of the float model
    # moved: the quantized model holds the float model's conv weights and BN state
    qsd = qm.state_dict()
    assert all(torch.equal(pristine[k], qsd[k]) for k in pristine)


def test_bit_widths_are_as_configured(nqcnn):
    view = qtta_plugins.quant_view(nqcnn["w4a4"])
    assert view.backend == "nncf" and view.sample_shape is None
    layers = view.layers()
    assert len(layers) == 10  # 9 convs (stem, 2 per block, 2 shortcuts) + fc
    inner, edges = layers[1:-1], (layers[0], layers[-1])
    assert {layer.weight_quantizer.bits for layer in inner} == {4}
    assert {layer.input_quantizer.bits for layer in inner} == {4}
    assert {layer.weight_quantizer.bits for layer in edges} == {8}  # first / last kept at 8 bit
    assert {layer.input_quantizer.bits for layer in edges} == {8}
    assert layers[0].weight_quantizer.ch_axis == 0 and layers[1].input_quantizer.ch_axis is None
    assert layers[1].weight_quantizer.qrange == (-7, 7)
    assert layers[1].input_quantizer.qrange == (0, 15)  # after a ReLU: unsigned
    # NNCF also quantizes tensors no layer reads (the residual branches' BN outputs before the
    # add, signed, and the pooled feature): they keep 8 bit, so that A4 means the layers' inputs
    # as on torchao and Brevitas
    layer_inputs = {id(layer.input_quantizer) for layer in layers}
    others = [q for q in view.quantizers() if q.role == "act" and id(q) not in layer_inputs]
    assert len(others) >= 5 and {q.bits for q in others} == {8}
    assert any(q.qrange == (-128, 127) for q in others)
    w2 = qtta_plugins.quant_view(nqcnn["w2a4"]).layers()[1]
    assert (w2.weight_quantizer.bits, w2.input_quantizer.bits) == (2, 4)
    assert w2.weight_quantizer.qrange == (-1, 1)


def test_first_and_last_layers_follow_the_others_when_asked(float_cnn, calib):
    qm = qtta_plugins.quantize(
        float_cnn, "nncf", "w4a4", calib, calib_batches=1, first_last_bits=None
    )
    layers = qtta_plugins.quant_view(qm).layers()
    assert {layer.weight_quantizer.bits for layer in layers} == {4}
    assert {layer.input_quantizer.bits for layer in layers} == {4}


def test_layers_are_in_forward_order_with_native_names(nqcnn):
    view = qtta_plugins.quant_view(nqcnn["w8a8"])
    layers = view.layers()
    names = [layer.name for layer in layers]
    assert names[0] == "stem.0" and names[-1] == "fc"
    assert names.index("layer1.conv1") < names.index("layer2.conv1") < names.index("layer3.conv2")
    assert layers[0].weight is nqcnn["w8a8"].stem[0].weight
    # the two convs fed by one tensor share its quantizer (one handle)
    by_name = {layer.name: layer for layer in layers}
    assert by_name["layer2.conv1"].input_quantizer is by_name["layer2.shortcut.0"].input_quantizer
    handle = layers[1].weight_quantizer
    assert handle.name == "__nncf_hooks.pre_hooks.layer1/conv1/conv2d/0__1.0"
    assert set(handle.params()) == {"scale"}
    assert [b.name for b in view.blocks()] == ["stem", "layer1", "layer2", "layer3", "fc"]


@pytest.mark.parametrize("bits", ["w4a4", "w2a4"])
def test_quantizers_really_quantize_at_their_width(nqcnn, clean_batch, bits):
    qm = nqcnn[bits]
    view = qtta_plugins.quant_view(qm)
    with torch.no_grad():
        for layer in view.layers():
            q = layer.weight_quantizer
            wq = q.module(layer.weight)
            levels = max(len(torch.unique(row)) for row in wq.flatten(1))
            assert levels <= 2**q.bits - 1, (layer.name, q.bits, levels)  # narrow range
        seen = {}
        acts = [q for q in view.quantizers() if q.role == "act"]
        hooks = [
            q.module.register_forward_hook(lambda m, a, out, _n=q.name: seen.__setitem__(_n, out))
            for q in acts
        ]
        try:
            qm(clean_batch[:50])
        finally:
            for h in hooks:
                h.remove()
    for q in acts:
        assert len(torch.unique(seen[q.name])) <= 2**q.bits, q


def test_quantizers_off_reproduce_the_float_model(float_cnn, nqcnn, clean_batch):
    qm = copy.deepcopy(nqcnn["w4a4"])
    view = qtta_plugins.quant_view(qm)
    for q in view.quantizers():
        q.enabled = False
    assert not any(q.enabled for q in view.quantizers())
    with torch.no_grad():
        assert rel_error(qm(clean_batch), float_cnn(clean_batch)) < 1e-5


def test_setting_bits_round_trips(nqcnn, small_batch):
    qm = copy.deepcopy(nqcnn["w8a8"])
    view = qtta_plugins.quant_view(qm)
    with torch.no_grad():
        ref = qm(small_batch)
    handle = view.layers()[3].weight_quantizer
    scale8 = handle.params()["scale"].detach().clone()
    handle.bits = 4
    assert handle.bits == 4 and handle.qrange == (-7, 7)
    # NNCF's scale is the clipping threshold: it stays, the step grows by 127 / 7
    assert torch.equal(handle.params()["scale"], scale8)
    with torch.no_grad():
        assert not torch.equal(qm(small_batch), ref)
    handle.bits = 8
    assert handle.qrange == (-127, 127)
    with torch.no_grad():
        assert torch.equal(qm(small_batch), ref)
    with pytest.raises(ValueError, match=r"bit-width"):
        handle.bits = 1


def test_snapshot_restore_is_exact(nqcnn, small_batch):
    qm = copy.deepcopy(nqcnn["w4a4"])
    view = qtta_plugins.quant_view(qm)
    momentum = qm.stem[1].momentum
    snap = view.snapshot()
    assert len(snap["quantizers"]) == len(view.quantizers()) == 24  # 10 weights, 14 activations
    with torch.no_grad():
        ref = qm(small_batch)
        for p in view.norm_parameters():
            p.add_(0.3)
    quantizers = view.quantizers()
    quantizers[3].bits = 2
    quantizers[5].enabled = False
    quantizers[-1].bits = 3
    view.set_norm_mode("batch")
    assert qm.stem[1].momentum == 0.0
    with torch.no_grad():
        assert not torch.equal(qm(small_batch), ref)
    view.restore(snap)
    with torch.no_grad():
        assert torch.equal(qm(small_batch), ref)
    assert view.norm_mode == "source" and qm.stem[1].momentum == momentum
    assert {q.name: (q.bits, q.enabled) for q in view.quantizers()} == snap["quantizers"]
    # a fresh view sees the same state
    fresh = qtta_plugins.quant_view(qm)
    assert {q.name: (q.bits, q.enabled) for q in fresh.quantizers()} == snap["quantizers"]


def test_batch_mode_uses_batch_statistics_and_keeps_running_ones(nqcnn, small_batch):
    qm = copy.deepcopy(nqcnn["w4a4"])
    view = qtta_plugins.quant_view(qm)
    running = [n.running_mean.clone() for n in view.norms()]
    view.set_norm_mode("batch")
    with torch.no_grad():
        full = qm(small_batch)
        half = qm(small_batch[:16])
    assert not torch.allclose(full[:16], half, atol=1e-4)
    assert all(torch.equal(a, n.running_mean) for a, n in zip(running, view.norms(), strict=True))


def test_gradients_reach_norm_parameters_and_scales(nqcnn, small_batch):
    qm = copy.deepcopy(nqcnn["w4a4"])
    view = qtta_plugins.quant_view(qm)
    assert view.can_backprop
    norms = view.norm_parameters()
    assert len(norms) == 18  # 9 batch norms x (gamma, beta)
    view.freeze()
    for p in norms:
        p.requires_grad_(True)
    scales = [p for q in view.quantizers() for p in q.set_trainable(True)]
    assert len(scales) == 24 and all(p.requires_grad for p in scales)
    view.set_norm_mode("batch")
    qm(small_batch).logsumexp(1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in norms)
    assert all(p.grad is not None for p in scales)
    assert sum(float(p.grad.abs().sum()) > 0 for p in scales) > 20
    # quantizers toggled off and on keep the trainable flags (NNCF's own switch would reset them)
    q = view.quantizers()[4]
    q.set_trainable(False)
    q.enabled = False
    q.enabled = True
    assert not any(p.requires_grad for p in q.set_trainable(False))
    with torch.no_grad():
        out = qm(small_batch)
    assert not out.requires_grad and torch.isfinite(out).all()


# --- models quantized with NNCF's own API ----------------------------------------------------
def test_deepcopy_of_an_nncf_model_is_independent(user_qcnn, small_batch):
    twin = copy.deepcopy(user_qcnn)
    with torch.no_grad():
        ref = user_qcnn(small_batch)
        assert torch.equal(twin(small_batch), ref)
        twin.stem[1].weight.add_(1.0)
        qtta_plugins.quant_view(twin).quantizers()[2].bits = 2
        assert not torch.equal(twin(small_batch), ref)
        assert torch.equal(user_qcnn(small_batch), ref)


def test_tent_and_norm_adapt_a_users_nncf_model(user_qcnn, shifted, small_batch):
    before = copy.deepcopy(user_qcnn.state_dict())
    training = {name: m.training for name, m in user_qcnn.named_modules()}
    with torch.no_grad():
        ref = user_qcnn(small_batch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = qtta_plugins.adapt(user_qcnn, shifted, "tent")
    assert not [w for w in caught if "example input" in str(w.message)]  # Tent needs no trace
    assert run.predictions.shape == (64,) and "stream" in run.errors()
    adapted = run.model
    assert adapted is not user_qcnn and qtta_plugins.quant_view(adapted).backend == "nncf"
    view = qtta_plugins.quant_view(adapted)
    affine = {f"{n.name}.{k}" for n in view.norms() for k in ("weight", "bias")}
    state = adapted.state_dict()
    changed = {
        k
        for k in before
        if not k.endswith("num_batches_tracked") and not torch.equal(state[k], before[k])
    }
    assert changed and changed <= affine, changed - affine
    # reset puts the model back exactly
    run.reset()
    assert all(torch.equal(adapted.state_dict()[k], before[k]) for k in before)

    norm_run = qtta_plugins.adapt(user_qcnn, shifted, "norm")
    assert norm_run.predictions.shape == (64,)
    state = norm_run.model.state_dict()
    assert all(torch.equal(state[k], before[k]) for k in before if "num_batches" not in k)

    # the user's model is untouched: state, outputs, no hooks or attributes added
    after = user_qcnn.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not user_qcnn._forward_pre_hooks
    assert "_qtta_example_input" not in user_qcnn.__dict__
    assert {name: m.training for name, m in user_qcnn.named_modules()} == training
    with torch.no_grad():
        assert torch.equal(user_qcnn(small_batch), ref)


def test_users_model_view_traces_once_it_has_seen_an_input(user_qcnn, clean_batch):
    qm = copy.deepcopy(user_qcnn)
    view = qtta_plugins.quant_view(qm)
    with pytest.warns(UserWarning, match=r"without an example input"):
        static = view.layers()
    # from hook names alone: the weight quantizers and module names are right
    assert [layer.name for layer in static][:2] == ["stem.0", "layer1.conv1"]
    assert all(layer.weight_quantizer is not None for layer in static)
    with torch.no_grad():
        qm(clean_batch[:8])  # the first call leaves an example on the model
    assert not qm._forward_pre_hooks
    traced = view.layers()
    assert [layer.name for layer in traced] == [layer.name for layer in static]
    assert all(layer.input_quantizer is not None for layer in traced)
    assert traced[0].input_quantizer.name == "__nncf_hooks.post_hooks.x__0.0"


# --- transformers ----------------------------------------------------------------------------
def test_tinyvit_is_quantized_and_adapts(nqvit):
    model, qms = nqvit
    x = torch.rand(16, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    qm = qms["w4a4"]
    view = qtta_plugins.quant_view(qm)
    layers = view.layers()
    # NNCF names ops inside a ModuleList without the list scope ("qkv/linear/1"); the view
    # reports module paths
    assert layers[0].name == "embed" and layers[-1].name == "head"
    assert "blocks.1.qkv" in [layer.name for layer in layers]
    assert {layer.weight_quantizer.bits for layer in layers[1:-1]} == {4}
    assert {layer.input_quantizer.bits for layer in layers[1:-1]} == {4}
    assert layers[0].weight_quantizer.bits == layers[-1].input_quantizer.bits == 8
    # transformer preset: asymmetric activations (NNCF's input_low / input_range)
    assert set(layers[1].input_quantizer.params()) == {"input_low", "input_range"}
    assert [n.kind for n in view.norms()] == ["layer"] * 5
    with torch.no_grad():
        ref = model(x)
        e8 = rel_error(qms["w8a8"](x), ref)
        e4 = rel_error(qm(x), ref)
    assert e8 < e4 < 0.5, (e8, e4)
    # gradients reach the LayerNorms and both kinds of quantizer parameters
    qm = copy.deepcopy(qm)
    view = qtta_plugins.quant_view(qm)
    view.freeze()
    params = view.norm_parameters()
    for p in params:
        p.requires_grad_(True)
    params += [p for q in view.quantizers() for p in q.set_trainable(True)]
    qm(x).logsumexp(1).mean().backward()
    assert all(p.grad is not None for p in params)
    for q in view.quantizers():
        q.enabled = False
    with torch.no_grad():
        assert rel_error(qm(x), ref) < 1e-5  # SmoothQuant's rescaling is exact in float
    run = qtta_plugins.adapt(qms["w4a4"], [x[:8], x[8:]], "tent")
    assert run.predictions.shape == (16,)

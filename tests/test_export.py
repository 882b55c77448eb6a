"""``qtta_plugins.export``: one call, each backend's own deployment path, after every method.

The exported model must predict what the adapted model predicts on running statistics (norm mode
``"source"``), within the bounds of the backends' own export tests (tests/test_*_export.py), and
the model handed to ``export`` must be left exactly as it was.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect

import pytest
import torch
from torch import nn

import qtta_plugins
from qtta_plugins import hookspecs
from qtta_plugins.conformance import run_exported
from qtta_plugins.exporting import UnsupportedExportError
from qtta_plugins.models import TinyViT

BACKENDS = [b for b in ("torchao", "brevitas", "nncf") if importlib.util.find_spec(b) is not None]
METHODS = ("quantize", "tent", "norm", "zoa", "foa")
# FOA: 5 passes per batch instead of 28; predict="incumbent" so that the prompt exported is one of
# CMA-ES's candidates (the default lets the first incumbent, a zero image prompt on a CNN, win
# every batch of a short stream, and a zero prompt shows nothing about its export)
OPTIONS = {"foa": {"population": 4, "predict": "incumbent"}}
# Each export pays the backend's path: torchao's convert_pt2e traces its 96 conv-bn fold patterns
# (~10 s on 2 cores; once per process inside our export: qtta_torchao/patterns.py), Brevitas' ONNX
# exporter ~3 s, NNCF's strip ~1 s. The default run
# covers each backend's distinct cases (FOA's input prompt is a hook on the model, the one thing a
# copy can lose; the other methods change parameters and the norm mode only, which tent shows);
# `-m slow` runs every (backend, method) pair. The torchao model straight from quantize is
# checked by test_torchao_converted_model_compile_and_zoa.
# torchao's convert after adaptation is checked by default in tests/test_torchao_export.py and
# tests/test_architectures.py; its row here is slow (18 s)
FAST = {("brevitas", "foa"), *(("nncf", m) for m in METHODS)}
TO_FILE = {("brevitas", "tent"), ("nncf", "tent")}  # a path: the ONNX file


def bounds(backend: str) -> tuple[float, float]:
    """(share of identical predictions, max |logit difference| / max |logit|) of the backend's
    own export test."""
    if backend == "brevitas":
        mod = pytest.importorskip("test_brevitas_export")  # skips without onnx / onnxruntime
        return mod.AGREEMENT, mod.LOGIT_RTOL
    if backend == "nncf":
        mod = pytest.importorskip("test_nncf_export")
        return mod.AGREEMENT, mod.LOGIT_TOL
    return 0.99, 0.05  # tests/test_torchao_export.py


def state(model: nn.Module) -> dict[str, object]:
    """What export could disturb on the caller's model."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "hooks": [
            (type(m._forward_pre_hooks), dict(m._forward_pre_hooks)) for m in model.modules()
        ],
        "dict": set(model.__dict__),
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert before["tensors"].keys() == after["tensors"].keys()
    changed = [k for k, v in before["tensors"].items() if not torch.equal(v, after["tensors"][k])]
    assert not changed, changed
    for key in ("training", "hooks", "dict"):
        assert before[key] == after[key], key


def compare(out: torch.Tensor, ref: torch.Tensor, backend: str) -> None:
    agreement_bound, logit_bound = bounds(backend)
    agreement = float((out.argmax(1) == ref.argmax(1)).float().mean())
    diff = float((out - ref).abs().max() / ref.abs().max())
    assert agreement >= agreement_bound, agreement
    assert diff < logit_bound, diff


@pytest.fixture(scope="module")
def data(digits):
    """Calibration, two noisy adaptation batches of 16, and 128 held-out test images."""
    train, test = digits
    gen = torch.Generator().manual_seed(0)
    noisy = (train.x[:32] + 0.3 * torch.randn(train.x[:32].shape, generator=gen)).clamp(0, 1)
    return [train.x[64:128], train.x[128:192]], [noisy[:16], noisy[16:]], test.x[:128]


@pytest.fixture(scope="module")
def quantized(float_cnn, data):
    """backend -> the W8A8 model from qtta_plugins.quantize (built once; tests do not mutate it).

    The trained source CNN (cached), not a freshly initialised one: an untrained CNN predicts one
    class for every image, and its logits differ by little, so agreement would prove nothing."""
    calib, _, _ = data
    cache: dict[str, nn.Module] = {}

    def get(backend: str) -> nn.Module:
        if backend not in cache:
            cache[backend] = qtta_plugins.quantize(float_cnn, backend, "w8a8", calib)
        return cache[backend]

    return get


@pytest.mark.parametrize(
    ("backend", "method"),
    [
        pytest.param(b, m, marks=() if (b, m) in FAST else pytest.mark.slow)
        for b in BACKENDS
        for m in METHODS
    ],
)
def test_export_after_each_method_predicts_what_the_adapted_model_does(
    backend, method, quantized, data, tmp_path
):
    _, batches, x = data
    qmodel = quantized(backend)
    if method == "quantize":
        model, view = qmodel, qtta_plugins.quant_view(qmodel)
    else:
        before = [p.detach().clone() for p in qtta_plugins.quant_view(qmodel).norm_parameters()]
        run = qtta_plugins.adapt(qmodel, batches, method, **OPTIONS.get(method, {}))
        model, view = run.model, run.view
        moved = any(
            not torch.equal(a, b) for a, b in zip(before, view.norm_parameters(), strict=True)
        )
        assert moved or method in ("norm", "foa"), "the method changed nothing to export"
    if method == "foa":
        assert model._forward_pre_hooks, "FOA's input prompt"
    # the reference: the adapted model on running statistics (FOA's model, whose method holds
    # the CMA-ES package, cannot be deep-copied: switch it there and back)
    mode = view.norm_mode
    view.set_norm_mode("source")
    with torch.no_grad():
        ref = model(x)
        if method == "foa":  # the prompt matters: without it, the predictions are another's
            hooks = dict(model._forward_pre_hooks)
            model._forward_pre_hooks.clear()
            assert float((model(x) - ref).abs().max() / ref.abs().max()) > 0.1
            model._forward_pre_hooks.update(hooks)
    view.set_norm_mode(mode)  # exported from the mode the method left it in

    snapshot = state(model)
    if (backend, method) in TO_FILE:
        exported = qtta_plugins.export(model, tmp_path / "m.onnx")
        assert exported == tmp_path / "m.onnx" and exported.is_file()
    else:
        exported = qtta_plugins.export(model)
        if backend == "brevitas":
            assert type(exported).__name__ == "ModelProto"  # no path: the ONNX graph in memory
        else:
            assert isinstance(exported, nn.Module) and exported is not model
    assert_same_state(snapshot, state(model))
    compare(run_exported(exported, x), ref, backend)


@pytest.mark.skipif("torchao" not in BACKENDS, reason="torchao not installed")
def test_torchao_converted_model_compile_and_zoa(quantized, data, monkeypatch):
    """The model straight from quantize exports to convert_pt2e's graph; compile=True compiles
    it with inductor's freezing for that model only (the process's setting is left as it was);
    a converted model adapted by ZOA exports as a copy."""
    import torch._inductor.config as inductor_config
    import torch._inductor.freezing as inductor_freezing

    calib, batches, x = data
    qmodel = quantized("torchao")
    with torch.no_grad():
        ref = qmodel(x)  # a pt2e QAT graph counts num_batches_tracked up on every forward
    snapshot = state(qmodel)
    converted = qtta_plugins.export(qmodel)
    assert_same_state(snapshot, state(qmodel))
    assert type(qtta_plugins.quant_view(converted)).__name__ == "ConvertedView"
    with torch.no_grad():
        eager = converted(x)
    compare(eager, ref, "torchao")

    frozen = []
    freeze = inductor_freezing.freeze
    monkeypatch.setattr(
        inductor_freezing, "freeze", lambda *a, **k: frozen.append(1) or freeze(*a, **k)
    )
    setting = inductor_config.freezing
    compiled = qtta_plugins.export(converted, compile=True)  # a converted model: copied
    with torch.no_grad():
        out = compiled(x)  # traced and compiled here, lazily
    assert frozen, "inductor did not freeze the weights"
    assert inductor_config.freezing == setting
    assert torch.equal(out.argmax(1), eager.argmax(1))
    # inductor may fuse the Q/DQ arithmetic differently (bound of test_torchao_export)
    assert float((out - eager).abs().max()) <= 0.05 * float(eager.abs().max())

    before = [p.detach().clone() for p in qtta_plugins.quant_view(converted).norm_parameters()]
    run = qtta_plugins.adapt(converted, batches, "zoa", source_data=calib)
    after = run.view.norm_parameters()
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    mode = run.view.norm_mode
    run.view.set_norm_mode("source")
    with torch.no_grad():
        adapted = run.model(x)
    run.view.set_norm_mode(mode)
    snapshot = state(run.model)
    exported = qtta_plugins.export(run.model)
    assert exported is not run.model
    assert_same_state(snapshot, state(run.model))
    with torch.no_grad():
        assert torch.equal(exported(x), adapted)


@pytest.mark.slow
@pytest.mark.skipif("torchao" not in BACKENDS, reason="torchao not installed")
def test_torchao_export_to_a_file(quantized, data, tmp_path):
    """A path: torch.export.save of the converted graph, loaded back by torch.export.load."""
    _, _, x = data
    qmodel = quantized("torchao")
    path = qtta_plugins.export(qmodel, tmp_path / "m.pt2")
    assert path == tmp_path / "m.pt2"
    loaded = torch.export.load(path).module()
    with torch.no_grad():
        compare(loaded(x), qmodel(x), "torchao")


@pytest.mark.skipif("torchao" not in BACKENDS, reason="torchao not installed")
def test_unknown_options_and_unsupported_models_are_clear_errors(quantized, float_cnn):
    qmodel = quantized("torchao")
    snapshot = state(qmodel)
    with pytest.raises(
        TypeError, match=r"unknown export option\(s\) 'bogus' for the torchao backend"
    ):
        qtta_plugins.export(qmodel, bogus=1)
    with pytest.raises(TypeError, match=r"'freeze' applies to compile=True only"):
        qtta_plugins.export(qmodel, freeze=False)
    assert_same_state(snapshot, state(qmodel))
    with pytest.raises(qtta_plugins.UnknownBackendError, match="no installed backend adapter"):
        qtta_plugins.export(float_cnn)
    torch.manual_seed(0)
    vit = qtta_plugins.quantize(TinyViT().eval(), "torchao", "w8a8", [torch.rand(8, 1, 32, 32)])
    with pytest.raises(UnsupportedExportError, match=r"convert_pt2e does not apply"):
        qtta_plugins.export(vit)


@pytest.mark.skipif("nncf" not in BACKENDS, reason="nncf not installed")
def test_nncf_strip_below_8_bits_is_unsupported_and_changes_nothing(quantized):
    """NNCF converts 8-bit quantizers only; export names each one that is not, before anything."""
    from nncf.torch.quantization.strip import SUPPORTED_NUM_BITS_FOR_STRIP_MODEL
    from qtta_nncf.export import STRIP_BITS

    assert [STRIP_BITS] == SUPPORTED_NUM_BITS_FOR_STRIP_MODEL  # what NNCF really supports
    qmodel = copy.deepcopy(quantized("nncf"))
    view = qtta_plugins.quant_view(qmodel)
    inner = view.layers()[1]
    inner.weight_quantizer.bits = 4
    snapshot = state(qmodel)
    with pytest.raises(UnsupportedExportError, match=r"8-bit quantizers only") as info:
        qtta_plugins.export(qmodel)
    assert "1 enabled quantizer(s)" in str(info.value) and "(4 bit)" in str(info.value)
    assert_same_state(snapshot, state(qmodel))
    with pytest.raises(TypeError, match=r"unknown export option\(s\) 'compile' for the nncf"):
        qtta_plugins.export(qmodel, compile=True)


class _NoExportView(qtta_plugins.QuantView):
    backend = "noexport"

    def layers(self):
        return []

    def norms(self):
        return []

    @property
    def can_backprop(self):
        return True

    def _apply_norm_mode(self, mode):
        pass


class _NoExportAdapter:
    """A backend adapter that implements no qtta_export."""

    @qtta_plugins.hookimpl
    def qtta_backends(self):
        return ["noexport"]

    @qtta_plugins.hookimpl
    def qtta_quant_view(self, model):
        return _NoExportView(model) if getattr(model, "noexport", False) else None


def test_an_adapter_without_export_is_named():
    pm = qtta_plugins.plugins.plugin_manager()
    adapter = _NoExportAdapter()
    pm.register(adapter, name="noexport-test")
    try:
        model = nn.Linear(2, 2)
        model.noexport = True
        with pytest.raises(
            UnsupportedExportError, match=r"'noexport' adapter implements no export"
        ):
            qtta_plugins.export(model)
    finally:
        pm.unregister(adapter)


def test_export_hook_states_its_contract():
    doc = inspect.getdoc(hookspecs.qtta_export) or ""
    assert len(doc.split()) >= 20
    assert "qtta_export" in qtta_plugins.plugins.plugin_manager().hook.__dict__
    assert qtta_plugins.export.__doc__

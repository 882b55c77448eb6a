"""Brevitas -> ONNX (QCDQ) through Brevitas' own exporter, after Tent has adapted the model.

The exported file, run by onnxruntime, must predict what the adapted Brevitas model predicts in
eval mode (batch norms on their running statistics, with Tent's affine parameters). Logits agree
to float precision except where a one-ulp difference in the float ops before a quantizer lands on
the other side of a rounding boundary and moves that activation by one quantization step: torch
itself does that when its input is scaled by (1 + 1e-7), so the bound on the logits is a few
activation steps, not float epsilon.
"""

from __future__ import annotations

import copy
import sys
from collections import Counter

import pytest
import torch

import qtta_plugins
from qtta_plugins.errors import BackendNotInstalledError
from qtta_plugins.models import TinyViT

pytest.importorskip("brevitas")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxoptimizer")  # Brevitas runs it on every ONNX export
pytest.importorskip("onnxscript")  # torch's dynamo exporter, the default route

from qtta_brevitas.export import export_onnx_qcdq  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*fast_hadamard_transform.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*children_specs.*:FutureWarning"),
]

# One flipped activation step moves a logit by up to a few hundredths (measured after Tent on 400
# held-out digits, max |logit| ~7.5: max diff 0.0125 at W8A8, 0.045 at W4A4; medians 5e-7).
LOGIT_RTOL = 0.05  # of the largest |logit|
AGREEMENT = 0.995


@pytest.fixture(scope="module", autouse=True)
def brevitas_plugin():
    """The adapter as installed: registered through the ``qtta_plugins`` entry point."""
    import qtta_brevitas.plugin as plugin

    from qtta_plugins.plugins import plugin_manager

    assert plugin_manager().is_registered(plugin), (
        "qtta_brevitas.plugin is not registered by its entry point"
    )
    return plugin


@pytest.fixture(scope="module")
def stream_split(digits_stream):
    """Six Tent batches of 32 (two from each of three corruptions) and held-out corrupted
    images: batches of the same and of an unseen corruption that Tent never saw."""
    batches = list(digits_stream)
    per_domain = len(batches) // len(digits_stream.domains)
    adapt = [batches[d * per_domain + i].x[:32] for d in range(3) for i in range(2)]
    held_out = [batches[d * per_domain + 2].x for d in (0, 1, 2, 5)]
    return adapt, held_out


def run_onnx(path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"input": x.numpy()})
    return torch.from_numpy(out)


def quantized_matmuls(path) -> int:
    """Conv / Gemm / MatMul nodes whose data and weight inputs both come out of a
    DequantizeLinear (through layout-only ops): the QCDQ form of a quantized layer."""
    graph = onnx.load(str(path)).graph
    producer = {out: node for node in graph.node for out in node.output}

    def dequantized(name: str) -> bool:
        node = producer.get(name)
        while node is not None and node.op_type in ("Transpose", "Reshape", "Identity"):
            node = producer.get(node.input[0])
        return node is not None and node.op_type == "DequantizeLinear"

    return sum(
        node.op_type in ("Conv", "Gemm", "MatMul") and all(map(dequantized, node.input[:2]))
        for node in graph.node
    )


def op_counts(path) -> Counter:
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def tent(qmodel, batches):
    """Tent on ``batches``, checked to have moved every norm affine parameter; the adapted model
    in eval mode with source statistics, and its number of quantized layers."""
    before = [p.detach().clone() for p in qtta_plugins.quant_view(qmodel).norm_parameters()]
    run = qtta_plugins.adapt(qmodel, batches, "tent")
    view = qtta_plugins.quant_view(run.model)
    after = view.norm_parameters()
    assert len(after) == len(before) > 0
    changed = sum(not torch.equal(a.detach(), b) for a, b in zip(after, before, strict=True))
    assert changed == len(before), "Tent left some norm affine parameters unchanged"
    view.set_norm_mode("source")
    return run.model.eval(), len(view.layers())


def export_and_run(model, images, path, **export_kwargs):
    """The model's logits on ``images``, and those of its ONNX export run by onnxruntime."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    with torch.no_grad():
        ref = model(images)
    out_path = export_onnx_qcdq(model, images[:8], path, **export_kwargs)
    assert out_path == path and path.is_file()
    # export works on a copy: the model is untouched
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert modes == [m.training for m in model.modules()]
    return ref, run_onnx(path, images)


def assert_same(ref: torch.Tensor, out: torch.Tensor) -> None:
    assert out.shape == ref.shape
    agreement = (out.argmax(1) == ref.argmax(1)).float().mean().item()
    diff = (out - ref).abs().amax(1)
    assert agreement >= AGREEMENT, f"argmax agreement {agreement:.4f}"
    bound = LOGIT_RTOL * ref.abs().max().item()
    assert diff.max().item() < bound, f"max |logit diff| {diff.max().item():.4g} >= {bound:.3g}"
    # most images agree to float precision: the differences are isolated rounding flips
    assert diff.median().item() < 1e-4, f"median |logit diff| {diff.median().item():.3g}"


@pytest.fixture(scope="module")
def adapted(float_cnn, calib, stream_split):
    """bits -> (Tent-adapted Brevitas CNN, number of quantized layers), built once per bits."""
    adapt_batches, _ = stream_split
    cache: dict = {}

    def get(bits: str):
        if bits not in cache:
            qmodel = qtta_plugins.quantize(float_cnn, "brevitas", bits, calib[:1])
            cache[bits] = tent(qmodel, adapt_batches)
        return cache[bits]

    return get


@pytest.fixture(scope="module")
def images(digits, stream_split):
    """200 clean held-out digits and 200 corrupted ones Tent never saw."""
    _, test = digits
    return torch.cat([test.x[:200], *stream_split[1]])


@pytest.mark.parametrize("bits", ["w8a8", "w4a4"])
def test_cnn_export_after_tent_matches(bits, adapted, images, tmp_path):
    model, n_layers = adapted(bits)
    path = tmp_path / "m.onnx"
    ref, out = export_and_run(model, images, path)

    assert_same(ref, out)
    # QCDQ: every quantized layer reads a dequantized input and a dequantized weight
    assert quantized_matmuls(path) == n_layers
    ops = op_counts(path)
    assert ops["QuantizeLinear"] > 0 and ops["Clip"] > 0  # narrow-range / sub-8-bit grids clip
    assert ops["BatchNormalization"] > 0  # the adapted norms stay norms
    # the batch axis is dynamic
    assert run_onnx(path, images[:3]).shape == (3, 10)


def test_torchscript_route_and_batch_mode(adapted, images, tmp_path):
    """``dynamo=False`` (Brevitas' TorchScript route) stores integer weights and gives the same
    numbers; a model left in norm mode "batch" (as Tent runs it) is exported as it behaves in
    eval mode, on its running statistics, and keeps its own mode."""
    model, n_layers = adapted("w4a4")
    batch_mode = copy.deepcopy(model)
    qtta_plugins.quant_view(batch_mode).set_norm_mode("batch")
    path = tmp_path / "ts.onnx"
    export_onnx_qcdq(batch_mode, images[:1], path, dynamo=False)
    bns = [m for m in batch_mode.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.training for m in bns)

    with torch.no_grad():
        ref = model(images)  # eval mode: running statistics
    assert_same(ref, run_onnx(path, images))
    assert quantized_matmuls(path) == n_layers
    int8 = onnx.TensorProto.INT8
    weights = [t for t in onnx.load(str(path)).graph.initializer if t.data_type == int8]
    assert len(weights) >= n_layers


def test_tinyvit_export_after_tent_matches(tmp_path):
    torch.manual_seed(0)
    vit = TinyViT().eval()
    qvit = qtta_plugins.quantize(vit, "brevitas", "w4a4", [torch.rand(32, 1, 32, 32)])
    model, n_layers = tent(qvit, [torch.rand(8, 1, 32, 32) for _ in range(2)])
    path = tmp_path / "v.onnx"
    ref, out = export_and_run(model, torch.rand(64, 1, 32, 32), path)

    assert_same(ref, out)
    assert quantized_matmuls(path) == n_layers


class HandBuilt(torch.nn.Module):
    """What a Brevitas user writes: Brevitas' default quantizers, quant tensors between layers and
    Int32Bias, which Brevitas' dynamo route refuses (the default then takes the TorchScript one)."""

    def __init__(self) -> None:
        super().__init__()
        import brevitas.nn as qnn
        from brevitas.quant import Int32Bias, Uint8ActPerTensorFloat

        self.inp = qnn.QuantIdentity(return_quant_tensor=True)
        self.conv = qnn.QuantConv2d(1, 8, 3, padding=1, bias_quant=Int32Bias)
        self.bn = torch.nn.BatchNorm2d(8)
        self.relu = qnn.QuantReLU()
        self.fc = qnn.QuantLinear(8, 10, input_quant=Uint8ActPerTensorFloat, bias_quant=Int32Bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.bn(self.conv(self.inp(x)))).mean((2, 3)))


def test_hand_built_model_with_int32_bias(tmp_path):
    torch.manual_seed(0)
    model = HandBuilt().train()
    with torch.no_grad():  # collect activation and BN statistics
        for _ in range(3):
            model(torch.randn(16, 1, 8, 8))
    model.eval()
    path = tmp_path / "h.onnx"
    ref, out = export_and_run(model, torch.randn(64, 1, 8, 8), path)

    assert_same(ref, out)
    assert quantized_matmuls(path) == 2
    int32 = onnx.TensorProto.INT32
    biases = [t for t in onnx.load(str(path)).graph.initializer if t.data_type == int32 and t.dims]
    assert sorted(tuple(t.dims) for t in biases) == [(8,), (10,)]  # the biases, as int32


def test_missing_onnx_names_the_install(tmp_path, monkeypatch):
    model = HandBuilt().eval()
    monkeypatch.setitem(sys.modules, "onnx", None)  # import fails with ImportError
    with pytest.raises(BackendNotInstalledError, match=r"pip install onnx .*onnxruntime"):
        export_onnx_qcdq(model, torch.zeros(2, 1, 8, 8), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()

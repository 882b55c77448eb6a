"""On a GPU (issue 35, part 4): every method, ``reconstruct`` (qdrop, ttaq), RTF-Q bank training
and selection, and ``qtta_plugins.export``, on a CUDA model, each compared with the same run on
the CPU. Every test is marked ``cuda`` and skipped without a CUDA device (``pytest -m cuda`` on a
machine with one).

Data and models: the session's digits BN CNN quantized at W8A8 (W4A4 for the reconstructions) by
torchao, Brevitas and NNCF (NNCF's CUDA quantizers are a C++/CUDA extension compiled with ``nvcc``
on first use: without the CUDA toolkit its tests skip, saying so); batches come from the CPU, as a
data loader yields them.

Tolerances. TF32 is off for these tests, so the GPU computes in float32 as the CPU does, and the
two differ only by float rounding (another summation order). A quantizer turns such a difference
into a whole step where a value sits at a rounding boundary, and an adapting method follows its
own logits, so the comparisons are on predictions, not logits:

* no update (``source``, ``norm``), and the exported model against the adapted one it came from:
  the same prediction on >= 98 % of images;
* adapting methods: >= 95 % (``foa``: >= 90 %, CMA-ES ranks 28 candidates by fitness and a near
  tie can swap the one it keeps);
* ``reconstruct``: the learned hard rounding equal on >= 99 % of weight elements (AdaRound flips
  only where its rounding variable sits at the threshold) and >= 95 % equal predictions on 256
  held-out images;
* RTF-Q: each subnet's accuracy within 3 points of the CPU bank's (on 200 images, 3 steps).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import qtta_plugins
from qtta_plugins.adaptation import check_batch
from qtta_plugins.errors import BadBatchError
from qtta_plugins.view import kept_source_statistics

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

BACKENDS = ["torchao", "brevitas", "nncf"]
METHODS = ["source", "norm", "tent", "eata", "sar", "cotta", "rotta", "foa", "zoa"]
OPTIONS = {
    "foa": {"population": 4},
    "cotta": {"n_augmentations": 2},
    "rotta": {"update_frequency": 16},  # student steps within the stream
}
AGREE = {"source": 0.98, "norm": 0.98, "foa": 0.90}  # else 0.95


@pytest.fixture(autouse=True)
def float32_on_the_gpu() -> Iterator[None]:
    """No TF32: the GPU's float32 matmuls and convolutions round as float32 (see the module doc)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def batches(short_stream) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Three batches of 50 from each of three domains (two domain shifts), on the CPU."""
    return [(b.x, b.y) for b in short_stream]


@pytest.fixture(scope="module")
def held_out(digits) -> tuple[torch.Tensor, torch.Tensor]:
    _, test = digits
    return test.x[:256], test.y[:256]


def on_cuda(model: torch.nn.Module, backend: str) -> torch.nn.Module:
    """A copy of ``model`` on the GPU (its kept source statistics travel with it); NNCF's
    quantizers need their CUDA extension: without ``nvcc`` to build it, the test skips."""
    gpu = qtta_plugins.view.copy_model(model).to("cuda")
    if backend == "nncf":
        import nncf

        shape = kept_source_statistics(model).input_shape
        try:
            with torch.no_grad():
                gpu(torch.zeros(2, *shape, device="cuda"))
        except nncf.InstallationError as exc:  # the CUDA extension could not be compiled
            pytest.skip(f"NNCF's CUDA quantizers are not available here: {exc}")
    return gpu


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.cpu() == b.cpu()).float().mean())


def all_on_cuda(model: torch.nn.Module) -> bool:
    tensors = [*model.parameters(), *model.buffers()]
    return all(t.device.type == "cuda" for t in tensors)


# --- every method -----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_adapts_a_cuda_model_as_on_the_cpu(
    qcnn_by_backend, batches, backend, method
) -> None:
    qmodel = qcnn_by_backend(backend)
    options = OPTIONS.get(method, {})
    cpu = qtta_plugins.adapt(qmodel, batches, method, **options)
    run = qtta_plugins.adapt(on_cuda(qmodel, backend), None, method, **options)
    for x, y in batches:  # CPU batches, moved by the core
        assert run.step(x, y).device.type == "cuda"
    assert all_on_cuda(run.model)
    for key, value in run.method.state_dict().items():
        if method == "foa" and key == "theta":
            continue  # the prompt vector lives with CMA-ES on the host; each pass moves it
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.ndim:
            assert value.device.type == "cuda", key
    agree = agreement(run.predictions, cpu.predictions)
    assert agree >= AGREE.get(method, 0.95), (method, backend, agree)
    assert abs(run.errors()["mean"] - cpu.errors()["mean"]) <= 100 * (1 - AGREE.get(method, 0.95))


def test_a_pinned_loader_batch_reaches_the_gpu_without_a_host_sync() -> None:
    """check_batch checks a CPU batch on the host and copies a pinned one asynchronously: no
    device sync, even with CUDA's sync debugging set to raise on one."""
    device = torch.device("cuda", torch.cuda.current_device())
    x = torch.rand(8, 1, 32, 32).pin_memory()
    bad = x.clone().pin_memory()
    bad[3, 0, 1, 1] = float("nan")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        moved = check_batch(x, (1, 32, 32), device)
        with pytest.raises(BadBatchError, match="1 NaN or Inf"):
            check_batch(bad, (1, 32, 32), device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert moved.device == device and torch.equal(moved.cpu(), x)


# --- reconstruct ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["qdrop", "ttaq"])
def test_reconstruct_on_cuda_learns_what_the_cpu_learns(
    qcnn_on, float_cnn, calib, held_out, backend, method
) -> None:
    qmodel = qcnn_on(backend, "w4a4")
    options = {"iters": 20, "seed": 0}
    cpu = qtta_plugins.reconstruct(qmodel, float_cnn, calib[:2], method, **options)
    # the float model and the calibration batches stay on the CPU: reconstruct moves copies
    gpu = qtta_plugins.reconstruct(
        on_cuda(qmodel, backend), float_cnn, calib[:2], method, **options
    )
    assert all_on_cuda(gpu)
    assert all(p.device.type == "cpu" for p in float_cnn.parameters())
    w_cpu = [layer.weight.detach() for layer in qtta_plugins.quant_view(cpu).layers()]
    w_gpu = [layer.weight.detach().cpu() for layer in qtta_plugins.quant_view(gpu).layers()]
    same = sum(int((a == b).sum()) for a, b in zip(w_cpu, w_gpu, strict=True))
    assert same >= 0.99 * sum(a.numel() for a in w_cpu), same
    x, _ = held_out
    with torch.no_grad():
        agree = agreement(cpu(x).argmax(1), gpu(x.cuda()).argmax(1))
    assert agree >= 0.95, agree


# --- RTF-Q --------------------------------------------------------------------------------------------
def test_rtfq_bank_trains_evaluates_and_materializes_on_cuda(float_cnn, digits) -> None:
    from qtta_plugins.methods.rtfq import RTFQConfig, SubnetBank, train_bank

    train, test = digits
    cfg = RTFQConfig(
        widths=(0.5, 1.0),
        resolutions=(24, 32),
        bits=(8, 4),
        recalib_images=128,
        train_steps=3,
        batch_size=32,
        progress=False,
    )
    source = DataLoader(TensorDataset(train.x[:256], train.y[:256]), batch_size=32)
    target = DataLoader(TensorDataset(train.x[256:512]), batch_size=32)
    rows = {}
    for device in ("cpu", "cuda"):
        model = copy.deepcopy(float_cnn).to(device)
        bank = SubnetBank(model, train.x[:128], cfg)  # CPU images: the bank moves its copy
        train_bank(bank, source, target)
        rows[device] = bank.evaluate(test.x[:200], test.y[:200])
    assert all_on_cuda(bank)
    for a, b in zip(rows["cpu"], rows["cuda"], strict=True):
        assert a["name"] == b["name"] and abs(a["accuracy"] - b["accuracy"]) <= 3.0, (a, b)
    chosen = qtta_plugins.select_subnet(bank, macs=rows["cuda"][-1]["macs"])
    assert all_on_cuda(chosen)
    row = chosen.qtta_subnet.row
    x, y = test.x[:200].cuda(), test.y[:200].cuda()
    with torch.no_grad():
        accuracy = 100.0 * float((chosen(x).argmax(1) == y).float().mean())
    assert abs(accuracy - row["accuracy"]) <= 3.0, (accuracy, row["accuracy"])


# --- export -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_export_of_a_model_adapted_on_cuda(qcnn_by_backend, batches, held_out, backend) -> None:
    qmodel = qcnn_by_backend(backend)
    x, _ = held_out
    cpu = qtta_plugins.adapt(qmodel, batches, "tent")
    run = qtta_plugins.adapt(on_cuda(qmodel, backend), batches, "tent")
    with torch.no_grad():
        adapted = run.model(x.cuda()).argmax(1)
        if backend == "brevitas":  # an ONNX graph, run by onnxruntime on the CPU
            ort = pytest.importorskip("onnxruntime")
            onnx_model = qtta_plugins.export(run.model, example=x[:2].cuda())
            session = ort.InferenceSession(
                onnx_model.SerializeToString(), providers=["CPUExecutionProvider"]
            )
            name = session.get_inputs()[0].name
            exported = torch.from_numpy(session.run(None, {name: x.numpy()})[0]).argmax(1)
        else:
            exported_model = qtta_plugins.export(run.model)
            assert all_on_cuda(exported_model)
            exported = exported_model(x.cuda()).argmax(1)
        on_cpu = cpu.model(x).argmax(1)
    assert agreement(exported, adapted) >= 0.98
    assert agreement(exported, on_cpu) >= 0.95

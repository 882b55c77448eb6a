"""Shared fixtures: one trained source model and its quantized versions per session.

Threads are pinned to 2 (oversubscribing small CPU machines slows tiny models many-fold). Trained
models and corrupted sets go to the user cache (``QTTA_CACHE_DIR`` or ``~/.cache/qtta-plugins``), so
a second run of the suite reuses them.

The digits BN CNN (seed 0) that most tests use is shipped (``tests/fixtures``) and put in the cache
under ``train_source_model``'s own file name before the first test, replacing a model this machine
trained: training ends elsewhere on another CPU type, and the suite's measured bounds hold for the
model they were measured on (``tests/fixtures/make_source_model.py`` says how it was made).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("QTTA_QUIET", "1")

import pytest
import torch

# two threads in one process; one per process under pytest-xdist (`-n 2`), so that two processes on
# two cores never oversubscribe. The README runs one process: measured on this 2-core machine,
# `-n 2 --dist load` rebuilt the module-scoped fixtures in both workers (40 minutes from an empty
# cache) and `--dist loadfile` waited on its largest files at the end (no faster than one process)
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
warnings.filterwarnings("ignore", category=FutureWarning)

SEED = 0
SHIPPED_SOURCE_MODEL = Path(__file__).parent / "fixtures" / "bncnn-digits-s0.pt"


@pytest.fixture(scope="session", autouse=True)
def shipped_source_model() -> Path:
    """The cache file of ``train_source_model("bncnn", "digits", seed=0)``, holding the shipped
    model (copied there when missing or different)."""
    from qtta_plugins.models import source_model_path

    path = source_model_path("bncnn", "digits", seed=SEED)
    shipped = SHIPPED_SOURCE_MODEL.read_bytes()
    if not path.exists() or path.read_bytes() != shipped:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".shipped.tmp")
        tmp.write_bytes(shipped)
        tmp.replace(path)
    return path


@pytest.fixture(scope="session")
def digits():
    from qtta_plugins.data import load_source

    return load_source("digits", seed=SEED)


@pytest.fixture(scope="session")
def calib(digits):
    train, _ = digits
    return [train.x[i : i + 64] for i in range(0, 512, 64)]


@pytest.fixture(scope="session")
def float_cnn(shipped_source_model):
    from qtta_plugins.models import train_source_model

    return train_source_model("bncnn", "digits", seed=SEED, progress=False)


@pytest.fixture(scope="session")
def qcnn(float_cnn, calib):
    """bits tag -> torchao pt2e fake-quant model (do not mutate: tests that adapt work on copies)."""
    import qtta_plugins

    return {
        bits: qtta_plugins.quantize(float_cnn, "torchao", bits, calib)
        for bits in ("w8a8", "w4a4", "w2a4")
    }


@pytest.fixture(scope="session")
def converted_qcnn(qcnn):
    """``convert_pt2e`` of the W8A8 model: torchao's integer graph, forward-only, converted by
    torchao's own function as a user calls it (not inside our ``patterns_traced_once``: tests
    compare against it). Do not mutate."""
    import copy

    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    return convert_pt2e(copy.deepcopy(qcnn["w8a8"]))


@pytest.fixture(scope="session")
def converted_w4a4(qcnn):
    """``qtta_torchao.export.convert`` of the W4A4 model (with the folded norms' stand-ins), once
    per session. Do not mutate (adapt works on copies)."""
    from qtta_torchao.export import convert

    return convert(qcnn["w4a4"])


@pytest.fixture(scope="session")
def digits_stream():
    from qtta_plugins.data import continual_stream

    return continual_stream("digits", severity=5, batch_size=50, seed=SEED, progress=False)


@pytest.fixture(scope="session")
def stream_excerpt(digits_stream):
    """``stream_excerpt(n)``: the first ``n`` batches of three domains (0, 3, 11) of the digits-C
    stream, in stream order: a short continual stream with two domain shifts."""
    batches = list(digits_stream)
    per_domain = len(batches) // len(digits_stream.domains)

    def excerpt(n: int) -> list:
        return [b for d in (0, 3, 11) for b in batches[d * per_domain : d * per_domain + n]]

    return excerpt


@pytest.fixture(scope="session")
def short_stream(stream_excerpt):
    """Three batches each from three domains of the digits-C stream."""
    return stream_excerpt(3)


@pytest.fixture(scope="session")
def domain_batches(stream_excerpt):
    """Three input batches of 16, one from each of three domains of the digits-C stream."""
    return [b.x[:16] for b in stream_excerpt(1)]


@pytest.fixture(scope="session")
def demo_result(tmp_path_factory):
    """The full ``qtta demo`` run (torchao W4A4, source / norm / tent), computed once."""
    from qtta_plugins.app.demo import run_demo

    plot = tmp_path_factory.mktemp("demo") / "demo.png"
    result = run_demo("torchao", "w4a4", plot=plot, progress=False, echo=False, seed=SEED)
    return result, plot


@pytest.fixture
def export_logits(tmp_path):
    """``export_logits(backend, model, x)``: ``model``'s logits on ``x`` through the backend's own
    export path (torchao ``convert_pt2e``, NNCF ``strip``, Brevitas QCDQ ONNX run by onnxruntime)."""

    def run(backend: str, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if backend == "torchao":
                from qtta_torchao.export import convert

                return convert(model)(x)
            if backend == "nncf":
                from qtta_nncf.export import strip

                return strip(model)(x)
        pytest.importorskip("onnxruntime")
        import onnxruntime as ort
        from qtta_brevitas.export import export_onnx_qcdq

        path = export_onnx_qcdq(model, x[:8], tmp_path / f"{backend}.onnx")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

    return run


def x86_qat_prepare(model: torch.nn.Module, calib: list[torch.Tensor]) -> torch.fx.GraphModule:
    """torchao's own W8A8 QAT flow as a user writes it: a strict export, ``prepare_qat_pt2e`` with
    ``X86InductorQuantizer``, eval mode, calibration, observers off (``model`` is not modified)."""
    import copy

    from qtta_torchao.quantize import (
        batchnorm_hyperparameters,
        restore_batchnorm_hyperparameters,
    )
    from torchao.quantization.pt2e import disable_observer, move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    # strict=True: torchvision's blocks call one ReLU module twice; a non-strict export gives
    # both calls one source partition, which X86InductorQuantizer rejects ("Input partition
    # has more than one output node", test_x86_inductor_quantizer_needs_a_strict_export).
    exported = torch.export.export(
        copy.deepcopy(model).train(),
        (calib[0],),
        dynamic_shapes=({0: torch.export.Dim.DYNAMIC},),
        strict=True,
    ).module()
    quantizer = X86InductorQuantizer().set_global(
        get_default_x86_inductor_quantization_config(is_qat=True)
    )
    saved = batchnorm_hyperparameters(exported)  # prepare_qat_pt2e drops eps / momentum
    prepared = prepare_qat_pt2e(exported, quantizer)
    move_exported_model_to_eval(prepared)
    restore_batchnorm_hyperparameters(prepared, saved)
    with torch.no_grad():
        for x in calib:
            prepared(x)
    prepared.apply(disable_observer)
    return prepared


@pytest.fixture(scope="session")
def qcnn_on(request, float_cnn, calib):
    """``qcnn_on(backend, bits="w4a4")``: the ``bncnn`` quantized by ``backend`` (torchao's are
    the ``qcnn`` fixture's), built on first use and shared by the session (do not mutate: adapt
    works on copies). Skips when the backend is not installed."""
    import importlib.util

    import qtta_plugins

    cache: dict[tuple[str, str], torch.nn.Module] = {}

    def get(backend: str, bits: str = "w4a4") -> torch.nn.Module:
        if importlib.util.find_spec(backend) is None:
            pytest.skip(f"{backend} is not installed")
        if (backend, bits) not in cache:
            if backend == "torchao":
                cache[backend, bits] = request.getfixturevalue("qcnn")[bits]
            else:
                cache[backend, bits] = qtta_plugins.quantize(float_cnn, backend, bits, calib[:2])
        return cache[backend, bits]

    return get


@pytest.fixture(scope="session")
def qcnn_by_backend(qcnn_on):
    """``get(backend)``: the session's CNN quantized at W8A8 by ``backend``."""
    return lambda backend: qcnn_on(backend, "w8a8")

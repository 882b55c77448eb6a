"""What a careful user trips over (issue 16, part 4): each test fails on the code before its fix.

The calibration images stay out of the model by default (statistics travel instead); a saved state
that would unpickle arbitrary objects is refused; labels of shape (N, 1) are refused; adapt and
reconstruct leave the global RNGs alone; a stream that fails partway keeps the run; a snapshot is
checked before restore writes; NNCF is quiet under QTTA_QUIET; the README's code blocks only use
names they define.
"""

from __future__ import annotations

import ast
import builtins
import copy
import logging
import random
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import qtta_plugins
from qtta_plugins.errors import BadBatchError, UnsafeStateError
from qtta_plugins.view import SOURCE_SAMPLE_SIZE, kept_source_statistics, source_sample

pytest.importorskip("torchao")

ROOT = Path(__file__).resolve().parents[1]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _no_source_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "no clean source data" in str(w.message)]


# --- 1. the calibration images stay out of the model -------------------------------------------
class _SmallCNN(nn.Module):
    """Four conv blocks with batch norms, untrained: enough structure for zoa / foa, and fast."""

    def __init__(self) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()
            )

        self.stem = block(1, 8)
        self.layer1 = block(8, 8)
        self.layer2 = block(8, 16)
        self.layer3 = block(16, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.head(x.mean((2, 3)))


@pytest.fixture(scope="module")
def small():
    """``(float model, calibration batches)``: running statistics set on the calibration data,
    so batch norms behave as a trained model's do."""
    gen = torch.Generator().manual_seed(0)
    torch_model = _SmallCNN()
    with torch.no_grad():
        for p in torch_model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    batches = [torch.rand(64, 1, 8, 8, generator=gen) for _ in range(4)]
    torch_model.train()
    for m in torch_model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # a cumulative average over the batches
    with torch.no_grad():
        for x in batches:
            torch_model(x)
    for m in torch_model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1  # torch's default again (torch.export traces it)
    return torch_model.eval(), batches


def test_quantize_keeps_statistics_not_the_calibration_images(qcnn, calib):
    qmodel = qcnn["w4a4"]
    assert source_sample(qmodel) is None
    stats = kept_source_statistics(qmodel)
    assert stats is not None
    assert stats.images == SOURCE_SAMPLE_SIZE and stats.input_shape == tuple(calib[0].shape[1:])
    kept = [
        t
        for measured in stats.measured
        for tables in (measured.features, measured.detector)
        for table in tables.values()
        for pair in table.values()
        for t in pair
    ]
    assert kept and all(t.ndim == 1 for t in kept)  # per-channel statistics, no image
    assert kept_source_statistics(copy.deepcopy(qmodel)) is not None  # they travel with copies


@pytest.mark.parametrize("backend", ["torchao", "brevitas", "nncf"])
def test_the_kept_statistics_are_those_the_images_give(small, backend):
    pytest.importorskip(backend)
    model, batches = small
    default, with_sample = (
        qtta_plugins.quantize(model, backend, "w8a8", batches, keep_calibration_sample=keep)
        for keep in (False, True)
    )
    assert source_sample(with_sample).shape[0] == 256
    assert kept_source_statistics(with_sample) is None and source_sample(default) is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = qtta_plugins.adapt(default, None, "zoa").method
        measured = qtta_plugins.adapt(with_sample, None, "zoa").method
        qtta_plugins.adapt(default, None, "foa", population=4)  # the input shape is kept too
    assert not _no_source_warnings(caught)
    for a, b in zip(kept.source_stats, measured.source_stats, strict=True):
        assert torch.allclose(a.mean, b.mean, atol=1e-6) and torch.allclose(a.std, b.std, atol=1e-6)
    for a, b in zip(kept.source_detector, measured.source_detector, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(kept.recorder.shift_target, measured.recorder.shift_target, atol=1e-6)


def test_a_model_changed_since_needs_clean_data(small):
    """Statistics hold only for the model they were measured on: ZOA on a model edited since
    (or converted: another model, tests/test_zoa.py) says what to pass instead."""
    model, batches = small
    qmodel = qtta_plugins.quantize(model, "torchao", "w8a8", batches)
    edited = copy.deepcopy(qmodel)
    with torch.no_grad():
        qtta_plugins.quant_view(edited).norm_parameters()[0].add_(0.5)
    with pytest.warns(UserWarning, match=r"no clean source data.*differs.*keep_calibration"):
        run = qtta_plugins.adapt(edited, None, "zoa")
    assert run.method.source_stats is None and run.method.recorder.shift_target is None
    run = qtta_plugins.adapt(edited, None, "zoa", source_data=torch.cat(batches))
    assert run.method.source_stats is not None
    with pytest.raises(ValueError, match=r"source_batch_size=32.*batches of 64"):
        qtta_plugins.adapt(qmodel, None, "zoa", source_batch_size=32)


def test_running_the_quantized_model_keeps_its_statistics_valid(small):
    """torchao's pt2e graph counts every forward in ``num_batches_tracked``; a counter is not the
    model's function, so using the model (as any user does before adapting it) must not cost it
    its source statistics (it did: the full suite's shared model lost them, test order decided)."""
    model, batches = small
    qmodel = qtta_plugins.quantize(model, "torchao", "w8a8", batches)
    tracked = {k: v.clone() for k, v in qmodel.state_dict().items() if "num_batches" in k}
    with torch.no_grad():
        qmodel(batches[0])
    assert any(not torch.equal(v, qmodel.state_dict()[k]) for k, v in tracked.items()), (
        "the forward counted nothing: this test no longer covers the counter"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = qtta_plugins.adapt(qmodel, None, "zoa")
    assert not _no_source_warnings(caught) and run.method.recorder.shift_target is not None


def test_reconstruct_measures_the_statistics_again(small):
    model, batches = small
    qmodel = qtta_plugins.quantize(model, "torchao", "w4a4", batches)
    rebuilt = qtta_plugins.reconstruct(qmodel, model, batches[:1], "ttaq", iters=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = qtta_plugins.adapt(rebuilt, None, "zoa")
    assert not _no_source_warnings(caught) and run.method.source_stats is not None


def test_a_model_that_cannot_be_copied_keeps_no_feature_statistics_and_says_so(small, monkeypatch):
    """The one failure measuring the source statistics expects: no copy of the model to measure
    on (``copy.deepcopy`` refuses an object in it). quantize still returns the model, warns with
    what is lost, and ZOA then asks for clean data instead of running without it unannounced."""
    from qtta_plugins import features

    model, batches = small

    def refuse(model: nn.Module) -> nn.Module:
        raise TypeError("cannot pickle '_thread.lock' object")

    monkeypatch.setattr(features, "copy_model", refuse)
    with pytest.warns(UserWarning, match=r"could not copy the model.*_thread\.lock.*alignment"):
        qmodel = qtta_plugins.quantize(model, "torchao", "w8a8", batches)
    monkeypatch.undo()
    stats = kept_source_statistics(qmodel)
    assert stats is not None and not stats.measured
    with pytest.warns(UserWarning, match=r"could not measure source statistics"):
        run = qtta_plugins.adapt(qmodel, None, "zoa")
    assert run.method.recorder.shift_target is None


def test_a_fault_while_measuring_the_source_statistics_is_raised(small, monkeypatch):
    """Any other failure is a fault and surfaces: it used to become a warning, and ZOA / FOA
    quietly lost their alignment and output shift."""
    from qtta_plugins import features

    model, batches = small

    def fault(*args: object) -> None:
        raise RuntimeError("a fault in the feature recorder")

    monkeypatch.setattr(features, "_measure_features", fault)
    with pytest.raises(RuntimeError, match=r"a fault in the feature recorder"):
        qtta_plugins.quantize(model, "torchao", "w8a8", batches)


def test_the_tour_says_when_zoa_adapts_the_fake_quantized_model(small, monkeypatch):
    """The demo's ZOA part adapts what the backend deploys; where that is not a model our view
    adapts, it falls back to the fake-quantized model and says so. A fault in the export is
    raised, not taken for a backend without an integer model."""
    from qtta_plugins.app import tour
    from qtta_plugins.exporting import UnsupportedExportError

    model, batches = small
    qmodel = qtta_plugins.quantize(model, "torchao", "w8a8", batches)

    def unsupported(m: nn.Module) -> object:
        raise UnsupportedExportError("strip supports 8-bit quantizers only")

    for export, why in [
        (unsupported, r"does not take this model \(strip supports 8-bit"),
        (lambda m: b"an ONNX graph", r"gives a bytes, not a torch module"),
        (lambda m: nn.Linear(2, 2), r"no installed adapter recognises"),
    ]:
        monkeypatch.setattr(tour, "export", export)
        with pytest.warns(UserWarning, match=r"adapts the fake-quantized model.*" + why):
            deployed, what = tour._deployable(qmodel)
        assert deployed is qmodel and what == "the fake-quantized model"

    def fault(m: nn.Module) -> object:
        raise RuntimeError("a fault in the exporter")

    monkeypatch.setattr(tour, "export", fault)
    with pytest.raises(RuntimeError, match=r"a fault in the exporter"):
        tour._deployable(qmodel)


def test_nncf_recalibrates_from_the_kept_measurements(small):
    """Running variances far from any batch's leave NNCF's activation ranges, calibrated under
    them, too narrow for batch statistics: adapt recalibrates them from what quantize measured,
    to the same ranges as from the images themselves."""
    pytest.importorskip("nncf")
    model, batches = small
    lagging = copy.deepcopy(model)
    for m in lagging.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.mul_(30.0)
    models = [
        qtta_plugins.quantize(lagging, "nncf", "w8a8", batches, keep_calibration_sample=keep)
        for keep in (False, True)
    ]
    assert source_sample(models[0]) is None and kept_source_statistics(models[0]).adapter
    states = []
    for qmodel in models:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run = qtta_plugins.adapt(qmodel, [batches[0][:16]], "norm")
        assert [w for w in caught if "recalibrated" in str(w.message)]
        states.append(_state(run.model))
    assert _same(*states)  # the same ranges as measuring on the images at adapt time


# --- 2. loading a state runs no code -----------------------------------------------------------
def _mark() -> str:
    _Payload.ran = True
    return "payload"


class _Payload:
    ran = False

    def __reduce__(self):
        return (_mark, ())


def test_load_refuses_a_file_that_would_unpickle_arbitrary_objects(qcnn, digits, tmp_path):
    run = qtta_plugins.adapt(qcnn["w4a4"], [digits[1].x[:16]], "tent")
    state = run.state_dict()
    state["note"] = _Payload()
    torch.save(state, tmp_path / "crafted.pt")
    before, batches = _state(run.model), run.batches
    with pytest.raises(UnsafeStateError, match=r"refusing to load.*trusted=True"):
        run.load(tmp_path / "crafted.pt")
    assert not _Payload.ran
    assert _same(before, _state(run.model)) and run.batches == batches
    run.save(tmp_path / "plain.pt")
    run.load(tmp_path / "plain.pt")  # a state of tensors and containers loads as before


def test_a_foa_state_loads_when_the_caller_trusts_it(qcnn, digits, tmp_path):
    run = qtta_plugins.adapt(qcnn["w4a4"], [digits[1].x[:16]], "foa", population=4)
    run.save(tmp_path / "foa.pt")
    with pytest.raises(UnsafeStateError, match=r"foa"):
        run.load(tmp_path / "foa.pt")
    run.load(tmp_path / "foa.pt", trusted=True)


# --- 3. labels ---------------------------------------------------------------------------------
def test_labels_of_shape_n_by_1_are_refused_naming_the_shapes(qcnn, digits):
    x, y = digits[1].x[:8], digits[1].y[:8]
    run = qtta_plugins.adapt(qcnn["w4a4"], None, "norm")
    with pytest.raises(BadBatchError, match=r"labels have shape \(8, 1\); expected \(8,\)"):
        run.step(x, y[:, None])
    assert run.batches == 0 and run.predictions.numel() == 0 and not run.results
    with pytest.raises(BadBatchError, match=r"\(8, 1\)"):
        qtta_plugins.adapt(qcnn["w4a4"], [(x, y[:, None])], "norm")
    logits = run.step(x, y)
    # the error counts exactly the predictions that differ from these labels
    expected = 100.0 * float((logits.argmax(1) != y).sum()) / len(y)
    assert run.errors() == {"stream": expected, "mean": expected}
    assert run.results["stream"].n == len(y)


# --- 4. the global RNGs --------------------------------------------------------------------------
def test_adapt_and_reconstruct_leave_the_global_rngs_alone(small):
    model, batches = small
    qmodel = qtta_plugins.quantize(model, "torchao", "w4a4", batches)
    torch.manual_seed(1234)
    random.seed(1234)
    torch.rand(3), random.random()
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    qtta_plugins.adapt(qmodel, [batches[0][:16]], "tent")
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state
    qtta_plugins.reconstruct(qmodel, model, batches[:1], "ttaq", iters=2)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state


# --- 5. a stream that fails partway ------------------------------------------------------------
def test_a_stream_that_fails_partway_keeps_the_run_and_the_model_restorable(qcnn, digits):
    x, y = digits[1].x, digits[1].y

    def stream():
        for i in range(3):
            yield x[16 * i : 16 * (i + 1)], y[16 * i : 16 * (i + 1)]
        raise OSError("the data source went away")

    qmodel = copy.deepcopy(qcnn["w4a4"])
    before, mode = _state(qmodel), qtta_plugins.quant_view(qmodel).norm_mode
    with pytest.raises(OSError, match=r"went away") as info:
        qtta_plugins.adapt(qmodel, stream(), "tent", inplace=True)
    run = info.value.adaptation
    assert run.batches == 3 and run.predictions.shape == (48,) and "mean" in run.errors()
    if sys.version_info >= (3, 11):  # exception notes
        assert any("err.adaptation" in note for note in info.value.__notes__)
    assert not _same(before, _state(qmodel))  # adapted in place, three batches
    run.restore_model()
    assert _same(before, _state(qmodel))
    assert qtta_plugins.quant_view(qmodel).norm_mode == mode
    with pytest.raises(RuntimeError, match=r"restore_model"):
        run.step(x[:16])


# --- 6. restore checks before it writes ----------------------------------------------------------
def test_restore_checks_the_snapshot_before_writing(qcnn):
    qmodel = copy.deepcopy(qcnn["w4a4"])
    view = qtta_plugins.quant_view(qmodel)
    snap = view.snapshot()
    view.layers()[1].weight_quantizer.bits = 3  # the model moves on after the snapshot
    with torch.no_grad():
        view.norm_parameters()[0].add_(1.0)
    bits = {q.name: q.bits for q in view.quantizers()}
    current = _state(qmodel)
    first = next(iter(snap["tensors"]))
    renamed = dict(
        snap, tensors={("x." + k if k == first else k): v for k, v in snap["tensors"].items()}
    )
    reshaped = dict(snap, tensors={**snap["tensors"], first: snap["tensors"][first][:1]})
    dropped = dict(snap, quantizers=dict(list(snap["quantizers"].items())[1:]))
    for bad, says in (
        (renamed, "differing keys"),
        (reshaped, "tensor shapes"),
        (dropped, "differing quantizer names"),
    ):
        with pytest.raises(ValueError, match=says):
            view.restore(bad)
        assert {q.name: q.bits for q in view.quantizers()} == bits
        assert _same(current, _state(qmodel))
    view.restore(snap)
    assert view.layers()[1].weight_quantizer.bits == 4


# --- 7. NNCF under QTTA_QUIET --------------------------------------------------------------------
class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize("quiet", [True, False])
def test_nncf_prints_nothing_under_qtta_quiet(monkeypatch, capfd, quiet):
    pytest.importorskip("nncf")
    import rich

    if quiet:
        monkeypatch.setenv("QTTA_QUIET", "1")
    else:
        monkeypatch.delenv("QTTA_QUIET", raising=False)
    logger = logging.getLogger("nncf")
    levels = (logger.level, [h.level for h in logger.handlers], rich.get_console().quiet)
    calib = [torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    capfd.readouterr()
    qtta_plugins.quantize(_Tiny().eval(), "nncf", "w8a8", calib)
    out, err = capfd.readouterr()
    printed = out + err
    if quiet:
        assert "INFO" not in printed and "Statistics collection" not in printed, printed
    else:  # what quiet hides: NNCF's progress bar (a check that this test can fail)
        assert "Statistics collection" in printed, printed
    # the NNCF logger and rich's console are as they were
    assert (logger.level, [h.level for h in logger.handlers], rich.get_console().quiet) == levels


# --- 8. the README -------------------------------------------------------------------------------
def _names(block: str) -> tuple[set[str], list[str]]:
    """Names a code block binds, and those it reads (in source order)."""
    tree = ast.parse(block)
    bound: set[str] = set()
    read: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (bound.add if isinstance(node.ctx, ast.Store) else read.append)(node.id)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return bound, read


def test_readme_code_blocks_use_only_names_they_define():
    text = (ROOT / "README.md").read_text()
    known = set(dir(builtins))
    undefined = []
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        bound, read = _names(block)
        known |= bound
        undefined += [name for name in read if name not in known]
    assert not undefined, undefined
    # constraints.txt pins a version, not the CPU build: the README says how to get that wheel
    assert "download.pytorch.org/whl/cpu" in text
    assert "pins torch to the CPU build" not in text

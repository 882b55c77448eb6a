"""Conformance over the architectures users ship, on every installed backend, by both routes.

The real torchvision ResNet-18, MobileNetV2, MobileNetV3-Small (depthwise convs, squeeze-excitation,
hardswish) and a timm VisionTransformer, quantized by ``qtta_plugins.quantize`` and by each
toolchain's own API (torchao ``prepare_qat_pt2e`` + ``X86InductorQuantizer``, Brevitas
``layerwise_quantize``, ``nncf.quantize``). Each combination: layers and norms in forward order,
quantizers off == float, snapshot / restore exact, the user's model untouched, every applicable
``adapt`` method runs, and export after adaptation through the backend's own path agrees with
``run.model``.

The default suite builds each family at ``scale="small"`` (one block per ResNet stage, MobileNets
at width 0.25 / 0.5, a 2-block ViT of width 64: the same library classes and layer kinds);
``pytest -m slow tests/test_architectures.py`` runs every check on the full-size models too.
"""

from __future__ import annotations

import copy
import importlib.util
import warnings

import pytest
import torch
from conftest import x86_qat_prepare
from torch import nn

import qtta_plugins
from qtta_plugins.conformance import (
    assert_snapshot_restores_exactly,
    forward_order,
    rel_error,
    source_statistics,
)
from qtta_plugins.data import to_channels
from qtta_plugins.models.zoo import import_timm
from qtta_plugins.plugins import available_backends

import_timm()  # the [vision] extra, part of [all]: torchvision and timm, through our import shim

BACKENDS = [b for b in ("torchao", "brevitas", "nncf") if importlib.util.find_spec(b) is not None]
FAMILIES = ("resnet18", "mobilenet_v2", "mobilenet_v3_small", "timm-vit")
ROUTES = ("quantize", "toolchain")


def is_subsequence(part: list[str], whole: list[str]) -> bool:
    it = iter(whole)
    return all(name in it for name in part)


# --- models ------------------------------------------------------------------------------------
def build_float(family: str, scale: str, calib: list[torch.Tensor]) -> nn.Module:
    """A freshly initialised family member whose batch norms hold the statistics of ``calib``
    (so source and batch statistics differ as they do for a trained model)."""
    from qtta_plugins.models import build

    torch.manual_seed(0)
    model = build(family, scale=scale)
    source_statistics(model, calib)
    return model


def quantize_with_toolchain(backend: str, model: nn.Module, calib: list[torch.Tensor]):
    """W8A8 by the toolchain's own API, as a user of that toolchain writes it."""
    model = copy.deepcopy(model)
    if backend == "torchao":
        return x86_qat_prepare(model, calib)
    if backend == "brevitas":
        from brevitas.graph.calibrate import calibration_mode
        from brevitas.graph.quantize import layerwise_quantize

        qmodel = layerwise_quantize(model.eval())
        with torch.no_grad(), calibration_mode(qmodel):
            for x in calib:
                qmodel(x)
        return qmodel.eval()
    import nncf
    from qtta_nncf.view import release_norm_parameters

    qmodel = nncf.quantize(model.eval(), nncf.Dataset(calib), subset_size=len(calib))
    # what adapt's warning tells the user (test_nncf_quantizers_on_norm_parameters_are_named)
    release_norm_parameters(qmodel)
    return qmodel


@pytest.fixture(scope="module")
def rgb(digits):
    """Calibration batches and test images: the digits, replicated to RGB."""
    train, test = digits
    calib = [to_channels(train.x[i : i + 32], 3) for i in range(0, 128, 32)]
    return calib, to_channels(test.x[:48], 3), test.y[:48]


@pytest.fixture(scope="module")
def float_models(rgb):
    calib, _, _ = rgb
    return {f: build_float(f, "small", calib) for f in FAMILIES}


class Case(tuple):
    """``(family, backend, route, float model, quantized model)``; ``.scale`` says which size."""

    scale: str


_FULL_MODELS: dict[str, nn.Module] = {}


# the default suite's cases: each backend by each route once, every family at least once
DEFAULT_CASES = {
    ("resnet18", "torchao", "toolchain"),
    ("mobilenet_v2", "torchao", "quantize"),
    ("timm-vit", "brevitas", "toolchain"),
    ("mobilenet_v3_small", "brevitas", "quantize"),
    ("mobilenet_v3_small", "nncf", "toolchain"),
    ("mobilenet_v2", "nncf", "quantize"),
}


def in_default_suite(family: str, backend: str, route: str, scale: str) -> bool:
    """Which cases of the matrix the default suite runs; the rest run under ``-m slow``.

    Each backend quantized by each route once (by ``qtta_plugins.quantize`` and by the
    toolchain's own API), every family at least once: 6 of the 24 small cases. The whole small
    matrix and the full-size models run under ``pytest -m slow`` (issue 36: the default suite
    under 12 minutes from an empty cache on 2 cores; the other 18 small cases cost about
    3 minutes there)."""
    return scale == "small" and (family, backend, route) in DEFAULT_CASES


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(
            (f, b, r, scale),
            marks=[] if in_default_suite(f, b, r, scale) else [pytest.mark.slow],
        )
        for scale in ("small", "full")
        for f in FAMILIES
        for b in BACKENDS
        for r in ROUTES
    ],
    ids="-".join,
)
def case(request, float_models, rgb):
    family, backend, route, scale = request.param
    if backend not in available_backends():
        pytest.fail(f"{backend} is installed but no qtta_plugins adapter for it is registered")
    calib, _, _ = rgb
    if scale == "small":
        model = float_models[family]
    else:
        if family not in _FULL_MODELS:
            _FULL_MODELS[family] = build_float(family, "full", calib)
        model = _FULL_MODELS[family]
    before = copy.deepcopy(model.state_dict())
    if route == "quantize":
        qmodel = qtta_plugins.quantize(model, backend, "w8a8", calib)
    else:
        qmodel = quantize_with_toolchain(backend, model, calib)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), (
        "quantizing changed the float model"
    )
    result = Case((family, backend, route, model, qmodel))
    result.scale = scale
    return result


def fresh(case):
    qmodel = copy.deepcopy(case[4])
    view = qtta_plugins.quant_view(qmodel)
    view.set_norm_mode("source")
    return qmodel, view


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


# --- the checks ---------------------------------------------------------------------------------
def test_layers_and_norms_in_forward_order(case, rgb):
    family, backend, _, model, _ = case
    _, x, _ = rgb
    _, view = fresh(case)
    assert view.backend == backend
    layers = [layer.name for layer in view.layers()]
    convs_linears = forward_order(model, x[:4], (nn.Conv2d, nn.Linear))
    # NNCF leaves MobileNetV3's squeeze-excitation convs in float; everything else is quantized
    assert is_subsequence(layers, convs_linears), (layers, convs_linears)
    skipped = set(convs_linears) - set(layers)
    if backend == "nncf" and family == "mobilenet_v3_small":
        assert skipped and all(".fc" in name for name in skipped), skipped
    else:
        assert not skipped, skipped
    norms = [n.name for n in view.norms()]
    expected = forward_order(model, x[:4], (nn.BatchNorm2d, nn.LayerNorm))
    assert sorted(norms) == sorted(expected)
    # A residual block's two branches (conv path, downsample) have no order between them: a
    # graph may list either first. Blocks come in forward order.
    assert blocks_of(norms) == blocks_of(expected)


def blocks_of(names: list[str]) -> list[str]:
    """``layer2.0.downsample.1`` -> ``layer2.0``, consecutive repeats merged."""
    keys = [".".join(n.split(".")[:2]) for n in names]
    return [k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k]


def float_function(case) -> nn.Module:
    """The float model the quantized one holds. ``nncf.quantize`` (defaults) runs fast bias
    correction, which rewrites conv / linear biases: its float function has those biases."""
    _, backend, route, model, qmodel = case
    if (backend, route) != ("nncf", "toolchain"):
        return model
    ref = copy.deepcopy(model)
    corrected = qmodel.state_dict()
    ref.load_state_dict({k: corrected.get(k, v) for k, v in ref.state_dict().items()}, strict=True)
    return ref


def test_quantizers_off_reproduce_the_float_model(case, rgb):
    _, x, _ = rgb
    qmodel, view = fresh(case)
    with torch.no_grad():
        ref = float_function(case)(x)
        quantized = rel_error(qmodel(x), ref)
        for q in view.quantizers():
            q.enabled = False
        off = rel_error(qmodel(x), ref)
    assert quantized > 1e-4, "the model was quantized at all"
    assert off < 1e-4, off


def test_snapshot_and_restore_are_exact(case, rgb):
    _, x, _ = rgb
    qmodel, view = fresh(case)
    assert_snapshot_restores_exactly(qmodel, view, x, bits=3)


def methods_for(model: nn.Module) -> list[tuple[str, dict]]:
    methods = [("source", {}), ("tent", {}), ("tent", {"abl": True}), ("zoa", {}), ("foa", {})]
    if has_batch_norm(model):
        methods.insert(1, ("norm", {}))
    return methods


def test_every_method_does_what_it_is_for_and_the_users_model_is_untouched(case, rgb):
    """Every applicable method runs, leaves the user's model alone, and does what it is for:
    ``source`` computes what the model computes on its running statistics; ``norm`` normalises
    with the test batch's statistics, so its logits move off source's; Tent and ZOA move norm
    affines; Tent + ABL adapts otherwise than Tent (the same first step: ABL's statistics start
    uniform; its second differs); FOA moves its prompt or its output shift."""
    _, _, route, model, qmodel = case
    calib, x, y = rgb
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    stream = [(x[:16], y[:16]), (x[16:32], y[16:32])]
    logits, runs = {}, {}
    for method, options in methods_for(model):
        batches = stream
        if method == "foa":  # 28 forward passes a batch (CMA-ES): one batch says it runs
            batches = stream[:1]
            if route == "toolchain":  # no calibration sample is kept on a toolchain's model
                options = {"source_data": calib}
        name = method + ("+abl" if options.get("abl") else "")
        run = qtta_plugins.adapt(qmodel, None, method, **options)
        if method == "foa":
            prompt = run.method.theta.clone()
            assert run.method.recorder.applied_shift is None  # no shift before the first batch
        out = torch.cat([run.step(bx, by).detach() for bx, by in batches])
        logits[name], runs[name] = out, run
        assert run.predictions.shape == (16 * len(batches),), name
        assert torch.equal(run.predictions, out.argmax(1)), name
        assert run.model is not qmodel
        if method in ("tent", "zoa"):
            moved = [
                not torch.equal(a, b)
                for a, b in zip(
                    qtta_plugins.quant_view(qmodel).norm_parameters(),
                    run.view.norm_parameters(),
                    strict=True,
                )
            ]
            assert any(moved), f"{name} adapted nothing"
        if method == "foa":
            shift = run.method.recorder.applied_shift
            moved_shift = shift is not None and bool(shift.abs().sum() > 0)
            assert moved_shift or not torch.equal(run.method.theta, prompt), "foa adapted nothing"
    plain, _ = fresh(case)  # the user's model on its running statistics
    with torch.no_grad():
        expected = torch.cat([plain(bx) for bx, _ in stream])
    scale = float(expected.abs().max())
    torch.testing.assert_close(logits["source"], expected, rtol=1e-5, atol=1e-5 * scale)
    if "norm" in logits:
        # test-batch statistics are not the running ones: BN-adapt computes another function
        assert rel_error(logits["norm"], logits["source"]) > 1e-3
    abl_moved = [
        not torch.equal(a, b)
        for a, b in zip(
            runs["tent"].view.norm_parameters(),
            runs["tent+abl"].view.norm_parameters(),
            strict=True,
        )
    ]
    assert any(abl_moved), "Tent + ABL adapted exactly as Tent"
    after = qmodel.state_dict()
    assert set(after) == set(before)
    # torchao's pt2e QAT graphs count num_batches_tracked on every forward (docs/design.md)
    assert all(torch.equal(before[k], after[k]) for k in before if "num_batches" not in k)


@pytest.mark.parametrize("method", ["tent", "eata", "sar"])
def test_the_default_step_follows_the_norms_it_adapts(case, method):
    """Tent's, EATA's and SAR's lr=None: 1e-2 where they adapt batch norms, 1e-3 on layer norms
    (chosen for Tent on a dev stream of each kind of model, docs/zoa.md); an explicit lr is kept."""
    from qtta_plugins.methods import eata, sar, tent

    cls, config = {
        "tent": (tent.Tent, qtta_plugins.TentConfig),
        "eata": (eata.EATA, qtta_plugins.EATAConfig),
        "sar": (sar.SAR, qtta_plugins.SARConfig),
    }[method]
    model = case[3]
    _, view = fresh(case)
    assert cls(view, config()).optimizer.param_groups[0]["lr"] == (
        1e-2 if has_batch_norm(model) else 1e-3
    )
    _, view = fresh(case)
    assert cls(view, config(lr=5e-4)).optimizer.param_groups[0]["lr"] == 5e-4


def test_norm_is_refused_clearly_without_batch_norms(case, rgb):
    *_, model, qmodel = case
    _, x, _ = rgb
    if has_batch_norm(model):
        pytest.skip("the family has batch norms")
    with pytest.raises(ValueError, match="needs batch-norm layers"):
        qtta_plugins.adapt(qmodel, [x[:16]], "norm")


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("method", ["tent", "zoa"])
def test_export_after_adaptation_agrees_with_the_adapted_model(case, rgb, export_logits, method):
    """The backend's own export of an adapted model computes what ``run.model`` computes: it
    differs from it by less than the adaptation changed it, and less than quantization does.
    After ``zoa`` the model carries no hook of ours: its norms hold the adapted affine and the
    last layer's bias the output shift."""
    family, backend, route, *_ = case
    small = case.scale == "small"
    if small and method == "zoa" and backend != "nncf":
        # ~13 s a case: zoa's export on the small models once by default (NNCF's strip), the
        # rest under -m slow; tests/test_export.py exports zoa's model on every backend
        pytest.skip("zoa's export of this case runs under -m slow")
    if small and backend == "torchao" and (family, route) != ("resnet18", "toolchain"):
        # ~13 s a case on a torchvision model: one torchao case by default, every one under
        # -m slow
        pytest.skip("torchao export of this case runs under -m slow")
    if small and backend == "brevitas" and family.startswith("mobilenet"):
        pytest.skip("Brevitas' ONNX export of a MobileNet takes ~20 s: under -m slow")
    calib, x, y = rgb
    qmodel, _ = fresh(case)
    hooks_before = hook_count(qmodel)
    batches = [(x[:24], y[:24]), (x[24:], y[24:])]
    # the toolchain routes keep no calibration sample: give zoa its source data (the shift)
    options = {"source_data": torch.cat(calib)} if method == "zoa" else {}
    run = qtta_plugins.adapt(qmodel, batches, method, **options)
    model, view = run.model, run.view
    assert hook_count(model) == hooks_before, "adaptation left hooks on the model"
    if method == "zoa":
        head = run.method.recorder.head
        assert head is not None and not torch.equal(head.bias, head.base), "no shift in the bias"
    view.set_norm_mode("source")  # exported graphs run on running statistics: compare so
    with torch.no_grad():
        before = model(x)
        for norm in view.norms():  # a strongly adapted model: the export must carry it
            if norm.weight is not None:
                norm.weight.mul_(1.25)
        ours = model(x)
        # What ulp-level input noise (float model: ~1e-6 relative) does to the quantized model:
        # the rounding decisions it flips are the kind an export's arithmetic (x / s against
        # x * (1 / s)) flips. An export cannot be asked to agree more closely than that.
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
        floor = rel_error(model(x * (1 + 1e-6 * noise)), ours)
        switched = [q for q in view.quantizers() if q.enabled]
        for q in switched:
            q.enabled = False
        unquantized = model(x)
        for q in switched:
            q.enabled = True
        if method == "zoa":  # what the output shift alone does
            head.write(None)
            unshifted = model(x)
            head.write(run.method.recorder.applied_shift)
    exported = export_logits(backend, model, x)
    assert exported.shape == ours.shape
    error = rel_error(exported, ours)
    if method == "zoa":  # the export carries the shift
        shifted_by = rel_error(ours, unshifted)
        assert error < max(0.5 * shifted_by, 2 * floor), (error, shifted_by, floor)
    # Untrained small models have nearly tied logits: a rounding tie the export breaks the other
    # way (x / s against x * (1 / s), NNCF's zero point rounded onto the integer grid) moves them
    # visibly. The trained full-size models of docs/architectures.md are held tighter.
    # The untrained full-size ViT is that sensitive on NNCF: its residual-sum quantizers decide
    # its nearly tied logits, and ulp noise moves them ~4.5% (docs/architectures.md).
    adapted_by, quantized_by = rel_error(ours, before), rel_error(ours, unquantized)
    assert floor < 0.5 * quantized_by, "the model's rounding noise is as large as its quantization"
    assert error < max(0.5 * adapted_by, 2 * floor), (error, adapted_by, floor)
    assert error < max(0.5 * quantized_by, 2 * floor), (error, quantized_by, floor)
    # near ties (untrained logits) flip: the bound only catches an export that lost the function
    assert float((exported.argmax(1) == ours.argmax(1)).float().mean()) >= 0.75


# --- what a toolchain cannot do -------------------------------------------------------------------
@pytest.mark.skipif("torchao" not in BACKENDS, reason="torchao not installed")
def test_x86_inductor_quantizer_needs_a_strict_export(float_models, rgb):
    """torchvision's BasicBlock calls one ``nn.ReLU`` twice: a non-strict ``torch.export`` (the
    default) puts both calls in one source partition and X86InductorQuantizer refuses it; a strict
    export records one partition per call, and the same quantizer then works."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    calib, _, _ = rgb
    model = copy.deepcopy(float_models["resnet18"]).train()
    exported = torch.export.export(model, (calib[0],)).module()
    quantizer = X86InductorQuantizer().set_global(
        get_default_x86_inductor_quantization_config(is_qat=True)
    )
    with pytest.raises(ValueError, match="more than one output node"):
        prepare_qat_pt2e(exported, quantizer)
    assert quantize_with_toolchain("torchao", float_models["resnet18"], calib) is not None


@pytest.mark.skipif("nncf" not in BACKENDS, reason="nncf not installed")
def test_nncf_quantizers_on_norm_parameters_are_named_and_released(float_models, rgb):
    """On a model with convolutions and LayerNorms (a timm ViT), nncf.quantize also quantizes
    the LayerNorm affine parameters on their source range, which clamps adaptation away: adapt
    names them; release_norm_parameters removes them, and the affines act again."""
    import nncf
    from qtta_nncf.view import norm_parameter_quantizers, release_norm_parameters

    calib, x, _ = rgb
    qmodel = nncf.quantize(
        copy.deepcopy(float_models["timm-vit"]), nncf.Dataset(calib), subset_size=len(calib)
    )
    assert norm_parameter_quantizers(qmodel)
    norm = qmodel.blocks[0].norm1

    def effect_of_scaling_norm1() -> float:
        with torch.no_grad():
            before = qmodel(x)
            norm.weight.mul_(3.0)
            after = qmodel(x)
            norm.weight.div_(3.0)
        return rel_error(after, before)

    assert effect_of_scaling_norm1() == 0.0  # clamped to the source range
    with pytest.warns(UserWarning, match="affine parameters of"):
        qtta_plugins.adapt(qmodel, [x[:16]], "tent")
    released = release_norm_parameters(qmodel)
    assert released and not norm_parameter_quantizers(qmodel)
    assert effect_of_scaling_norm1() > 0.01
    assert not norm_parameter_quantizers(
        qtta_plugins.quantize(float_models["timm-vit"], "nncf", "w8a8", calib)
    )


# --- reconstruction and RTF-Q on these families ----------------------------------------------
# NNCF on the residual model it quantizes differently (the shortcut) and Brevitas on the ViT in
# the default suite; torchao's write-back is checked on the BN CNN (tests/test_ttaq.py); the
# other four pairs under -m slow (issue 36: the suite's time)
RECONSTRUCTION_DEFAULT = {("resnet18", "nncf"), ("timm-vit", "brevitas")}


@pytest.mark.parametrize(
    ("family", "backend"),
    [
        pytest.param(f, b, marks=[] if (f, b) in RECONSTRUCTION_DEFAULT else [pytest.mark.slow])
        for f in ("resnet18", "timm-vit")
        for b in BACKENDS
    ],
)
def test_reconstruction_writes_back_on_shipped_models(family, backend, float_models, rgb):
    """brecq / qdrop / ttaq run on ResNet-18 and the ViT; afterwards the backend's own forward
    computes what the reconstruction simulated, with every weight on its grid."""
    from qtta_plugins.methods.ttaq import TTAQConfig, reconstruct_view, simulation_gap

    calib, x, _ = rgb
    model = float_models[family]
    qmodel = qtta_plugins.quantize(model, backend, "w4a4", calib)
    for method in ("brecq", "qdrop", "ttaq"):
        out = qtta_plugins.reconstruct(qmodel, model, calib[:1], method, iters=2)
        assert qtta_plugins.quant_view(out).backend == backend and out is not qmodel
    view = qtta_plugins.quant_view(qmodel)
    config = TTAQConfig(method="ttaq", iters=4, lr_round=0.5, lr_scale=0.01, shared_inputs=True)
    sim = reconstruct_view(view, model, calib[:1], config)
    for q in view.quantizers():  # NNCF's quantizers the simulation leaves out (and says so)
        if q.name in sim.unsimulated:
            q.enabled = False
    # NNCF on torchvision's ResNet: 2.9% measured (under 1% on our own CNN), not yet explained;
    # torchao under 1% with one machine's source model, 2.6% with an AMD EPYC machine's
    assert simulation_gap(sim, qmodel, x) < (0.05 if backend in ("nncf", "torchao") else 0.01)
    for layer in view.layers():
        q = layer.weight_quantizer
        if q is not None and q.enabled:
            grid, w = q.grid(), view.weight_quantizer_input(layer)
            tol = 1e-5 * float(grid.scale.max())
            assert torch.allclose(qtta_plugins.view.fake_quantize(w, grid), w, atol=tol), layer.name


def write_bank_grids_where_left(bank, subnet, qmodel: nn.Module) -> int:
    """Write the bank's activation grid into each layer-input quantizer ``materialize`` left on
    the backend's own grid (the ones its warning names: the bank's signed symmetric grid against
    torchao's affine one, Brevitas' [-128, 127], NNCF's per-channel ones), where the backend's
    integer range holds the bank's levels: a zero point shifts torchao's [0, 255] to [-127, 128]
    steps, Brevitas' [-128, 127] keeps one level to spare. Returns how many it wrote."""
    written = 0
    for qlayer in qtta_plugins.quant_view(qmodel).layers():
        layer, handle = bank.layers.get(qlayer.name), qlayer.input_quantizer
        if layer is None or handle is None or not handle.enabled:
            continue
        scale, qmin, qmax = layer.act_grid(subnet.bits)
        grid = handle.grid()
        if (grid.qmin, grid.qmax, grid.ch_axis) == (qmin, qmax, None):
            continue  # materialize wrote the bank's grid here
        zero_point = 0 if grid.qmin <= qmin and grid.qmax >= qmax else grid.qmin - qmin
        assert grid.qmax - zero_point >= qmax, handle.name
        handle.set_grid(
            scale.detach().expand_as(grid.scale).clone(),
            torch.full_like(grid.zero_point, zero_point),
        )
        written += 1
    return written


# Relative logit error of the materialized half-width subnet against the bank's own function,
# after write_bank_grids_where_left: measured on this test's models (and, for the bounds, on the
# same families retrained with seeds 1 and 2, since a fresh machine trains its own), max over them:
#   ResNet-18:   torchao 0.0034, Brevitas 0.0000 (nothing is left on another grid), NNCF 0.025
#                (it also quantizes the residual shortcut, which the bank leaves in float)
#   MobileNetV2: torchao 0.137, Brevitas 0.064 (0.44-0.56 before the grids left to the backends are
#                written: the half-width subnet sits at chance and amplifies any change: the bank's
#                own W8A8 is 0.54-0.57 from its float), NNCF 0.47 (what is left was not
#                isolated; on ResNet-18 it is NNCF's quantizer on the residual shortcut)
# A materialized model whose weight step sizes are doubled measured 0.072-0.109 (ResNet-18), 0.61-
# 0.84 (MobileNetV2); the full-width subnet in place of the half-width one 2.7-2.8 (both).
MATERIALIZED_GAP = {
    ("resnet18", "torchao"): 0.01,
    ("resnet18", "brevitas"): 0.01,
    ("resnet18", "nncf"): 0.05,
    ("mobilenet_v2", "torchao"): 0.3,
    ("mobilenet_v2", "brevitas"): 0.3,
    ("mobilenet_v2", "nncf"): 0.7,
}


@pytest.mark.parametrize(
    "family, epochs",
    # MobileNetV2 (depthwise convs; ~40 s: 10 epochs of training, three backends) under -m slow
    [("resnet18", 3), pytest.param("mobilenet_v2", 10, marks=pytest.mark.slow)],
)
def test_rtfq_bank_slices_residual_and_depthwise_models(family, epochs, digits):
    """Width slicing stays consistent through residual adds and depthwise convs (their groups
    follow the channels); every backend materializes a subnet that computes the bank's function.
    (Small versions trained briefly on the digits and cached: an untrained model's logits are too
    close to ties to compare predictions.)"""
    from qtta_plugins.methods.rtfq import RTFQConfig, Subnet, SubnetBank
    from qtta_plugins.models import accuracy, train_source_model

    train, test = digits
    model = train_source_model(family, "digits", epochs=epochs, scale="small", progress=False)
    x, y = to_channels(test.x[:200], 3), test.y[:200]
    config = RTFQConfig(
        widths=(0.5, 1.0), resolutions=(24, 32), bits=(8, 4), recalib_images=128, progress=False
    )
    bank = SubnetBank(model, to_channels(train.x[:128], 3), config)
    bank.set_subnet(None)
    with torch.no_grad():
        assert torch.allclose(bank(x), model(x), atol=1e-4)
    subnet = Subnet(0.5, 32, 8)
    bank.recalibrate(subnet)
    sliced = bank.float_subnet(subnet)
    depthwise = [m for m in sliced.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert bool(depthwise) == (family == "mobilenet_v2")
    assert all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    bank.switch.bits = None  # the subnet's width, resolution and statistics, in float
    with torch.no_grad():
        assert torch.allclose(sliced(x), bank(x), atol=1e-4)
    bank.set_subnet(subnet)
    with torch.no_grad():
        ref = bank(x)
    assert bank.costs(subnet)["macs"] < 0.5 * bank.costs(Subnet(1.0, 32, 8))["macs"]
    # A pretrained model sliced to half width without RTF-Q's joint training can sit at chance
    # (MobileNetV2 at width 0.5: 8.5-10.5% on these 200 digits, measured), so its accuracy says
    # nothing: the half-width subnet is checked by its logits against the bank's (below), the
    # accuracy on the full-width subnet.
    full = Subnet(1.0, 32, 8)
    bank.recalibrate(full)
    bank.set_subnet(full)
    full_row = accuracy(bank, x, y)
    assert full_row > 30.0, full_row
    for backend in BACKENDS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MobileNetV2: the grids the bank cannot share
            materialized = bank.materialize(subnet, backend)
            whole = bank.materialize(full, backend)
        with torch.no_grad():
            out = materialized(x)
            gap = rel_error(out, ref)
        assert out.shape == ref.shape and torch.isfinite(out).all()
        assert abs(accuracy(whole, x, y) - full_row) <= 3.0, backend
        if family == "resnet18" and backend != "nncf":
            # the bank's grids written into the backend's: the same function. NNCF also quantizes
            # the residual shortcut, MobileNetV2's signed bottleneck sums sit on the backends'
            # affine grids, not the bank's symmetric one (docs/architectures.md)
            assert gap < 0.01, (backend, gap)
        # on every family and backend: with the grids materialize leaves to the backend set to
        # the bank's too, the backend computes the bank's function (the bounds: MATERIALIZED_GAP)
        written = write_bank_grids_where_left(bank, subnet, materialized)
        assert (written > 0) == (family == "mobilenet_v2"), (backend, written)
        with torch.no_grad():
            bridged = rel_error(materialized(x), ref)
        assert bridged < MATERIALIZED_GAP[family, backend], (backend, gap, bridged)


# --- what the families need from the adapters -------------------------------------------------
def test_families_have_the_layer_kinds_they_are_chosen_for(float_models):
    kinds = {f: {type(m).__name__ for m in model.modules()} for f, model in float_models.items()}
    assert {"BasicBlock", "BatchNorm2d"} <= kinds["resnet18"]
    depthwise = [
        m
        for m in float_models["mobilenet_v2"].modules()
        if isinstance(m, nn.Conv2d) and m.groups > 1
    ]
    assert depthwise and all(m.groups == m.in_channels for m in depthwise)
    assert {"SqueezeExcitation", "Hardswish"} <= kinds["mobilenet_v3_small"]
    assert {"VisionTransformer", "LayerNorm"} <= kinds["timm-vit"]


@pytest.mark.skipif("torchao" not in BACKENDS, reason="torchao not installed")
def test_torchao_keeps_the_batch_norm_eps_prepare_qat_pt2e_drops(float_models, rgb):
    """MobileNetV3's batch norms use eps 1e-3 and momentum 0.01; torchao's QAT rewrite and its
    eval switch put torch's defaults in; our quantize puts theirs back, in the norm and the fold."""
    calib, _, _ = rgb
    qmodel = qtta_plugins.quantize(float_models["mobilenet_v3_small"], "torchao", "w8a8", calib)
    nodes = [
        n
        for n in qmodel.graph.nodes
        if n.op == "call_function" and n.target is torch.ops.aten.batch_norm.default
    ]
    assert nodes and {n.args[7] for n in nodes} == {1e-3}
    assert {n.meta["qtta_momentum"] for n in nodes} == {0.01}
    folds = [
        n
        for n in qmodel.graph.nodes
        if n.op == "call_function"
        and n.target is torch.ops.aten.add.Tensor
        and isinstance(n.args[1], float)
        and str(getattr(n.args[0], "target", "")).endswith("running_var")
    ]
    assert folds and {n.args[1] for n in folds} == {1e-3}


@pytest.mark.skipif("nncf" not in BACKENDS, reason="nncf not installed")
def test_nncf_ranges_that_batch_statistics_overflow_are_recalibrated(rgb):
    """Running statistics far from any batch's (a briefly trained model, emulated by inflating
    them) leave NNCF's activation ranges, calibrated under them, far too narrow for the batch
    statistics adaptation normalises with: adapt recalibrates them on the source sample and says
    so; a model whose statistics fit is left alone."""
    from qtta_nncf.view import batch_mode_overflow

    from qtta_plugins.models import train_source_model

    calib, x, y = rgb
    model = train_source_model("resnet18", "digits", epochs=3, scale="small", progress=False)
    lagging = copy.deepcopy(model)
    for m in lagging.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.mul_(30.0)
    for float_model, expect_overflow in ((model, False), (lagging, True)):
        qmodel = qtta_plugins.quantize(float_model, "nncf", "w8a8", calib)
        state = {k: v.clone() for k, v in qmodel.state_dict().items()}
        assert bool(batch_mode_overflow(qmodel, calib)) == expect_overflow
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run = qtta_plugins.adapt(qmodel, [(x[:16], y[:16])], "norm")
        said = [str(w.message) for w in caught if "recalibrated" in str(w.message)]
        assert bool(said) == expect_overflow, said
        assert not batch_mode_overflow(run.model, calib)
        changed = [k for k, v in state.items() if not torch.equal(v, qmodel.state_dict()[k])]
        assert not changed, changed
        ranges = {k: v.clone() for k, v in run.model.state_dict().items() if "nncf" in k}
        run.reset()  # the recalibrated ranges are the run's starting point
        assert all(torch.equal(v, run.model.state_dict()[k]) for k, v in ranges.items())


def test_gray_streams_become_rgb_for_these_models():
    from qtta_plugins.data import ContinualStream, ImageSet

    gray = ImageSet(torch.rand(6, 1, 32, 32), torch.arange(6), "toy")
    batch = next(iter(ContinualStream([gray], batch_size=4, channels=3)))
    assert batch.x.shape == (4, 3, 32, 32)
    assert torch.equal(batch.x[:, 0], batch.x[:, 2])
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        ContinualStream([gray], channels=2)
    with pytest.raises(ValueError, match="gray images"):
        to_channels(torch.rand(2, 3, 8, 8), 3)


def test_the_zoo_names_what_it_does_not_know():
    from qtta_plugins.models import build, input_channels

    with pytest.raises(ValueError, match="unknown architecture 'resnet50'"):
        build("resnet50")
    assert input_channels("resnet18") == 3 and input_channels("bncnn") == 1

"""The conformance kit: the checks every backend adapter must pass, importable.

An adapter (``qtta-mybackend``) is checked through the public API and the uniform view only, by the
same assertions as torchao, Brevitas and NNCF: layers in forward order, quantizers with the right
bit-widths, quantization off reproduces the float model, bit-widths round-trip, snapshot / restore
is exact, gradients reach the norm parameters (and the scales where the backend allows), forward-only
works, ``adapt`` (Tent, ZOA) runs without touching the caller's model, and ``export`` (where the
adapter implements it) keeps the predictions.

Run them with the pytest plugin this package declares (``pytest --qtta-backend=mybackend``, see
:mod:`qtta_plugins.pytest_plugin`), or call them yourself::

    from qtta_plugins import conformance

    case = conformance.make_case("mybackend", "bncnn")
    for check in conformance.CHECKS:
        check(case)  # AssertionError naming what does not conform

Each check takes a :class:`Case` and works on copies of its quantized model. A check that does not
apply to the case (a family without batch norms, an export the adapter declares it cannot make)
calls ``pytest.skip``.

Export: an adapter either exports (``qtta_export`` returns the exported model) or *declares* that it
cannot: its ``qtta_export`` raises :class:`~qtta_plugins.exporting.UnsupportedExportError` naming
what its backend's path does not take, for this model (NNCF's ``strip`` below 8 bits) or for any
(``"mybackend has no export path: deploy the quantized model as it is"``). Either way the user of
:func:`qtta_plugins.export` learns why, and the kit skips :func:`check_export_keeps_predictions`
with that reason. An adapter that does not implement ``qtta_export`` for its backend at all fails
that check: an export that was forgotten must not pass as one that cannot exist.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import qtta_plugins

from .models import build
from .plugins import available_backends
from .view import QuantView

#: (weight, activation) bits of the inner layers; the first and last layers stay at 8 bit.
BITS: tuple[int, int] = (4, 4)
#: the model families a case is built on: a BatchNorm CNN and a LayerNorm transformer.
FAMILIES: tuple[str, ...] = ("bncnn", "vit")
#: export bounds: share of identical predictions, and max |logit difference| over max |logit|
#: (those of tests/test_torchao_export.py, the loosest of the three backends' export tests).
EXPORT_AGREEMENT = 0.99
EXPORT_LOGIT_RTOL = 0.05


@dataclass
class Case:
    """A float model, its quantized version from ``backend`` and the inputs the checks use."""

    backend: str
    family: str
    model: nn.Module  # the float model (eval mode)
    qmodel: nn.Module  # qtta_plugins.quantize(model, backend, bits, calib); checks copy it
    calib: list[torch.Tensor]
    x: torch.Tensor  # a test batch of 64
    bits: tuple[int, int] = BITS

    def fresh(self) -> tuple[nn.Module, QuantView]:
        """A copy of the quantized model and its view, on source statistics."""
        qmodel = copy.deepcopy(self.qmodel)
        view = qtta_plugins.quant_view(qmodel)
        view.set_norm_mode("source")
        return qmodel, view


def make_case(
    backend: str,
    family: str = "bncnn",
    *,
    bits: tuple[int, int] = BITS,
    seed: int = 0,
    model: nn.Module | None = None,
    calib: Sequence[torch.Tensor] | None = None,
    x: torch.Tensor | None = None,
) -> Case:
    """A :class:`Case` for ``backend``: a freshly initialised ``family`` model (``"bncnn"`` or
    ``"vit"``, 1x32x32 inputs; or ``model``), quantized by ``qtta_plugins.quantize`` at ``bits``
    on ``calib`` (default: four random batches of 32), and a test batch ``x`` (default: 64 random
    images). Fails with the installed backends named when ``backend`` has no registered adapter.
    """
    backends = available_backends()
    if backend not in backends:
        pytest.fail(
            f"no installed qtta_plugins adapter provides backend {backend!r} (installed: "
            f"{', '.join(backends) or 'none'}): install the distribution that declares it in the "
            "qtta_plugins entry-point group",
            pytrace=False,
        )
    if model is None and family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    generator = torch.Generator().manual_seed(seed)
    if calib is None:
        calib = [torch.rand(32, 1, 32, 32, generator=generator) for _ in range(4)]
    if model is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build(family)
        source_statistics(model, calib)
    if x is None:
        x = torch.rand(64, 1, 32, 32, generator=generator)
    qmodel = qtta_plugins.quantize(model, backend, bits, list(calib))
    return Case(backend, family, model, qmodel, list(calib), x, bits)


def source_statistics(model: nn.Module, batches: Sequence[torch.Tensor]) -> None:
    """Give an untrained model's batch norms the running statistics of ``batches`` (then eval
    mode): with the defaults (mean 0, variance 1) its activations in batch-statistics mode would
    lie far outside the ranges calibrated in eval mode, and every activation quantizer clip."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.eval()


def forward_order(
    model: nn.Module, x: torch.Tensor, kinds: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)
) -> list[str]:
    """Names of the ``kinds`` modules (conv / linear) in the order the float model calls them."""
    order: list[str] = []
    hooks = [
        m.register_forward_hook(lambda mod, i, o, name=name: order.append(name))
        for name, m in model.named_modules()
        if isinstance(m, kinds)
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(order))


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def assert_snapshot_restores_exactly(
    qmodel: nn.Module, view: QuantView, x: torch.Tensor, bits: int
) -> None:
    """Change everything a method may (norm affines, a bit-width, a quantizer switch, the norm
    mode), check the output moved, restore the snapshot taken before, check it is bit-exact."""
    snap = view.snapshot()
    with torch.no_grad():
        ref = qmodel(x)
        for p in view.norm_parameters():
            p.mul_(1.5).add_(0.1)
        view.layers()[1].weight_quantizer.bits = bits
        view.quantizers()[-1].enabled = False
    view.set_norm_mode("batch")
    with torch.no_grad():
        assert not torch.equal(qmodel(x), ref), (
            "changing the model through the view changed nothing"
        )
    view.restore(snap)
    with torch.no_grad():
        assert torch.equal(qmodel(x), ref), "restore(snapshot()) is not bit-exact"


# --- the checks ----------------------------------------------------------------------------------
def check_view_is_of_the_backend(case: Case) -> None:
    _, view = case.fresh()
    assert view.backend == case.backend, f"view.backend is {view.backend!r}"
    assert view.can_backprop, "a model from quantize() must let gradients through"


def check_layers_in_forward_order(case: Case) -> None:
    _, view = case.fresh()
    names = [layer.name for layer in view.layers()]
    expected = forward_order(case.model, case.x)
    assert names == expected, f"view.layers() {names} != the float model's order {expected}"


def check_quantizers_and_bit_widths(case: Case) -> None:
    _, view = case.fresh()
    layers = view.layers()
    w_bits, a_bits = case.bits
    for i, layer in enumerate(layers):
        expected_w = 8 if i in (0, len(layers) - 1) else w_bits
        assert layer.weight_quantizer is not None, f"{layer.name}: no weight quantizer"
        assert layer.weight_quantizer.role == "weight", layer.name
        assert layer.weight_quantizer.bits == expected_w, (
            f"{layer.name}: weight bits {layer.weight_quantizer.bits}, expected {expected_w}"
        )
        assert layer.weight_quantizer.ch_axis is not None, f"{layer.name}: weights per channel"
    inner_acts = [
        layer.input_quantizer for layer in layers[1:-1] if layer.input_quantizer is not None
    ]
    assert inner_acts, "no activation quantizer found on the inner layers"
    assert {q.bits for q in inner_acts} == {a_bits}, {q.name: q.bits for q in inner_acts}
    assert all(q.role == "act" for q in inner_acts)


def check_quantization_off_reproduces_the_float_model(case: Case) -> None:
    qmodel, view = case.fresh()
    with torch.no_grad():
        quantized = rel_error(qmodel(case.x), case.model(case.x))
        for q in view.quantizers():
            q.enabled = False
        off = rel_error(qmodel(case.x), case.model(case.x))
    assert quantized > 1e-3, f"the model is not quantized at all (relative error {quantized:.2g})"
    assert off < 1e-4, f"every quantizer off, the output differs from float by {off:.2g}"


def check_bit_width_round_trips_and_changes_the_function(case: Case) -> None:
    qmodel, view = case.fresh()
    handle = view.layers()[1].weight_quantizer
    with torch.no_grad():
        before = qmodel(case.x)
        handle.bits = 3
        assert view.layers()[1].weight_quantizer.bits == 3, "a new view does not see bits = 3"
        after3 = qmodel(case.x)
        handle.bits = case.bits[0]
        assert view.layers()[1].weight_quantizer.bits == case.bits[0]
        back = qmodel(case.x)
    assert not torch.allclose(before, after3), "3-bit weights compute what 4-bit ones did"
    assert torch.allclose(before, back, atol=1e-5), "bits 4 -> 3 -> 4 does not come back"


def check_snapshot_and_restore_are_exact(case: Case) -> None:
    qmodel, view = case.fresh()
    assert_snapshot_restores_exactly(qmodel, view, case.x, bits=2)


def check_gradients_reach_norms_and_scales(case: Case) -> None:
    """Gradients reach every norm affine parameter; each quantizer either makes its scale
    trainable (and the gradient reaches it) or refuses with ``NotImplementedError``."""
    qmodel, view = case.fresh()
    view.set_norm_mode("batch")
    view.freeze()
    norms = view.norm_parameters()
    assert norms, "the view lists no norm affine parameters"
    for p in norms:
        p.requires_grad_(True)
    scales = []
    for q in view.quantizers():
        try:
            params = q.set_trainable(True)
        except NotImplementedError:
            continue
        assert params, f"{q.name}: set_trainable(True) returned no parameter and did not refuse"
        scales += params
    qmodel(case.x).logsumexp(1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in norms)
    assert sum(float(p.grad.abs().sum()) for p in norms) > 0, "zero gradient on every norm"
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in scales), (
        "set_trainable returned a scale the gradient does not reach"
    )
    assert not scales or sum(float(p.grad.abs().sum()) for p in scales) > 0, (
        "zero gradient on every trainable scale"
    )


#: state-dict entries a forward may change in any mode: torchao's train-mode pt2e export keeps
#: ``num_batches_tracked.add_(1)`` in its graph (the counter is unused with a set momentum)
_COUNTERS = "num_batches_tracked"


def check_forward_only_needs_no_autograd(case: Case) -> None:
    """Under ``inference_mode`` (no autograd at all) the model computes what it computes with
    autograd on, and changes no state of its own (no observer or running statistic updates)."""
    qmodel, view = case.fresh()
    view.freeze()
    for p in view.norm_parameters():
        p.requires_grad_(True)
    before = {k: v.clone() for k, v in qmodel.state_dict().items() if _COUNTERS not in k}
    with torch.inference_mode():
        out = qmodel(case.x)
    assert torch.isfinite(out).all(), "non-finite output under inference_mode"
    after = {k: v for k, v in qmodel.state_dict().items() if _COUNTERS not in k}
    assert after.keys() == before.keys()
    changed = [k for k, v in after.items() if not torch.equal(before[k], v)]
    assert not changed, f"a forward under inference_mode changed the model's state: {changed[:5]}"
    reference = qmodel(case.x)
    assert reference.requires_grad, "with autograd on, the norm parameters do not reach the output"
    assert torch.allclose(out, reference.detach(), rtol=1e-5, atol=1e-5 * float(out.abs().max())), (
        "the output under inference_mode differs from the one with autograd on"
    )


def check_adapt_leaves_the_callers_model_unchanged(case: Case) -> None:
    qmodel, _ = case.fresh()
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    run = qtta_plugins.adapt(qmodel, [case.x[:32], case.x[32:]])
    assert len(run.predictions) == len(case.x)
    changed = [k for k, v in qmodel.state_dict().items() if not torch.equal(before[k], v)]
    assert not changed, f"adapt changed the caller's model: {changed[:5]}"


def check_zoa_is_forward_only_and_adapts(case: Case) -> None:
    """Two forward passes per batch, no autograd, norm affines move."""
    qmodel, _ = case.fresh()
    # whole passes: the default pass 2 runs only the graph's suffix
    run = qtta_plugins.adapt(qmodel, None, "zoa", reuse_prefix=False)
    passes, grad = [0], []

    def count(module: nn.Module, args: tuple) -> None:
        passes[0] += 1
        grad.append(torch.is_grad_enabled())

    run.model.register_forward_pre_hook(count)
    before = [p.detach().clone() for p in run.method.params]
    for batch in (case.x[:32], case.x[32:]):
        run.step(batch)
    assert passes[0] == 4 and not any(grad), (passes[0], grad)
    moved = any(not torch.equal(a, p) for a, p in zip(before, run.method.params, strict=True))
    assert moved, "ZOA moved no norm affine parameter"
    # source statistics came from the calibration sample quantize() kept on the model
    assert run.method.source_stats is not None, "quantize() kept no source sample on the model"


def check_a_new_view_puts_back_the_source_momentum(case: Case) -> None:
    """Batch mode sets momentum 0; leaving it through another view of the model restores it."""
    qmodel, view = case.fresh()
    view.set_norm_mode("batch")
    qtta_plugins.quant_view(qmodel).set_norm_mode("source")
    modules = [m for m in qmodel.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    nodes = (
        [
            n
            for n in qmodel.graph.nodes
            if n.op == "call_function" and n.target is torch.ops.aten.batch_norm.default
        ]
        if isinstance(qmodel, torch.fx.GraphModule)
        else []
    )
    if not (modules or nodes):
        pytest.skip(f"the {case.family} model has no batch norm")
    assert all(m.momentum == 0.1 and not m.training for m in modules)
    assert all(n.args[6] == 0.1 and n.args[5] is False for n in nodes)


def check_export_keeps_predictions(case: Case) -> None:
    """``qtta_plugins.export`` predicts what the model does on running statistics, and leaves
    it untouched; or the adapter declares that it cannot export this model (its ``qtta_export``
    raises ``UnsupportedExportError``: skipped with its reason). No adapter answering
    ``qtta_export`` for the backend fails (see the module docstring)."""
    from .exporting import UnsupportedExportError

    qmodel, _ = case.fresh()
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    try:
        exported = qtta_plugins.export(qmodel)
    except UnsupportedExportError as exc:
        assert adapter_answers_export(qmodel, case.backend), (
            f"the {case.backend!r} adapter implements no qtta_export hook for its backend. "
            "Implement it, or declare that the backend has no export: a qtta_export that raises "
            "qtta_plugins.exporting.UnsupportedExportError saying why (qtta_plugins.conformance)"
        )
        pytest.skip(f"the {case.backend} adapter declares it cannot export this model: {exc}")
    changed = [k for k, v in qmodel.state_dict().items() if not torch.equal(before[k], v)]
    assert not changed, f"export changed the caller's model: {changed[:5]}"
    with torch.no_grad():
        ref = qmodel(case.x)
        out = run_exported(exported, case.x)
    agreement = float((out.argmax(1) == ref.argmax(1)).float().mean())
    diff = float((out - ref).abs().max() / ref.abs().max())
    assert agreement >= EXPORT_AGREEMENT, f"exported predictions agree on {agreement:.3f}"
    assert diff < EXPORT_LOGIT_RTOL, f"max |logit difference| {diff:.3g} of the largest |logit|"


def adapter_answers_export(qmodel: nn.Module, backend: str) -> bool:
    """Whether an installed adapter answers the ``qtta_export`` hook for ``backend`` on
    ``qmodel``: returns an export, or raises ``UnsupportedExportError`` (its declaration that it
    cannot). ``False``: every implementation returned ``None``, i.e. none serves the backend, and
    :func:`qtta_plugins.export` raised its own "implements no export" error. Runs on a copy."""
    from .exporting import UnsupportedExportError
    from .plugins import plugin_manager

    try:
        result = plugin_manager().hook.qtta_export(
            model=copy.deepcopy(qmodel), backend=backend, path=None, options={}
        )
    except UnsupportedExportError:
        return True
    return result is not None


def run_exported(exported: object, x: torch.Tensor) -> torch.Tensor:
    """Logits of what :func:`qtta_plugins.export` returned (a module, or an ONNX ``ModelProto`` /
    file run by onnxruntime) on ``x``."""
    if isinstance(exported, nn.Module):
        with torch.no_grad():
            return exported(x)
    ort = pytest.importorskip("onnxruntime")
    source = exported if isinstance(exported, str | bytes) else None
    if source is None:
        serialize = getattr(exported, "SerializeToString", None)
        source = serialize() if serialize is not None else str(exported)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: x.numpy()})[0])


#: every check, in the order the kit runs them
CHECKS: tuple[Callable[[Case], None], ...] = (
    check_view_is_of_the_backend,
    check_layers_in_forward_order,
    check_quantizers_and_bit_widths,
    check_quantization_off_reproduces_the_float_model,
    check_bit_width_round_trips_and_changes_the_function,
    check_snapshot_and_restore_are_exact,
    check_gradients_reach_norms_and_scales,
    check_forward_only_needs_no_autograd,
    check_adapt_leaves_the_callers_model_unchanged,
    check_zoa_is_forward_only_and_adapts,
    check_a_new_view_puts_back_the_source_momentum,
    check_export_keeps_predictions,
)

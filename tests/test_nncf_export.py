"""Export after adaptation through NNCF's own path: ``nncf.strip`` (NATIVE format, 8 bit).

A Tent pass changes the model first; the stripped model (torch ``FakeQuantize`` in place of NNCF's
quantizers, BatchNorm on running statistics) must then predict what the adapted NNCF model predicts
in source norm mode. The two differ only where a value falls on a rounding midpoint of a quantizer
grid (PyTorch's fake-quantize and NNCF's kernel order the arithmetic differently): a handful of
one-level flips in a forward. Measured (400 held-out images; 6,500 clean + corrupted in brackets):
max |logit difference| 0.032 (0.032) for our CNN and 0.042 (0.043) for a user's ``nncf.quantize``
CNN, both after Tent, on logits up to ~10; 0.009 (0.010) for a random TinyViT after Tent on logits
up to ~1. Predictions agree on 100% of the 400 (6,500: 99.97%, 100%, 99.98%; near-ties flip).
"""

from __future__ import annotations

import copy
import itertools
import os

# NNCF compiles a C++ extension on first use (~60 s on 2 cores): no time limit on that build.
os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")

import pytest
import torch
from torch import nn

import qtta_plugins
from qtta_plugins.errors import UnknownBackendError
from qtta_plugins.models import TinyViT

nncf = pytest.importorskip("nncf")
pytest.importorskip("torchao", reason="nncf.strip imports torchao's observers")

from qtta_nncf.export import strip  # noqa: E402
from qtta_nncf.view import HOOKS_ATTR, quantizer_modules  # noqa: E402

AGREEMENT = 0.995  # share of identical predictions, stripped vs adapted
# max |logit difference| over max |logit|: measured 0.003-0.005 (CNNs), 0.01 (TinyViT)
LOGIT_TOL = 0.03


@pytest.fixture(scope="module", autouse=True)
def nncf_plugin():
    """The adapter as installed: registered through the ``qtta_plugins`` entry point."""
    import qtta_nncf.plugin as plugin

    from qtta_plugins.plugins import plugin_manager

    assert plugin_manager().is_registered(plugin), (
        "qtta_nncf.plugin is not registered by its entry point"
    )
    return plugin


def tent_batches(stream, domains: int, per_domain: int) -> list:
    """The first ``per_domain`` batches of each of the first ``domains`` domains of ``stream``."""
    picked: dict[str, list] = {}
    for batch in stream:
        if batch.domain not in picked and len(picked) == domains:
            break
        group = picked.setdefault(batch.domain, [])
        if len(group) < per_domain:
            group.append(batch)
    return list(itertools.chain.from_iterable(picked.values()))


@pytest.fixture(scope="module")
def held_out(digits, digits_stream):
    """Clean test images and corrupted ones from domains Tent never saw (400 in all)."""
    _, test = digits
    corrupted = [s.x[:50] for s in digits_stream.sets[3:6]]
    return torch.cat([test.x[:250], *corrupted])


def norm_params(model: nn.Module) -> list[torch.Tensor]:
    view = qtta_plugins.quant_view(model)
    return [p.detach().clone() for p in view.norm_parameters()]


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def state(model: nn.Module) -> dict[str, object]:
    """Everything strip could disturb on the caller's model."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": {n: m.training for n, m in model.named_modules()},
        "momentum": {
            n: m.momentum
            for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        },
        "quantizers": {n: type(m) for n, m in quantizer_modules(model).items()},
        "dict_keys": set(model.__dict__),
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert before["tensors"].keys() == after["tensors"].keys()
    for key, value in before["tensors"].items():
        assert torch.equal(value, after["tensors"][key]), key
    for key in ("training", "momentum", "quantizers", "dict_keys"):
        assert before[key] == after[key], key


def compare(adapted: torch.Tensor, stripped: torch.Tensor) -> tuple[float, float]:
    """Share of identical predictions; max |logit difference| relative to the largest |logit|."""
    agreement = float((adapted.argmax(1) == stripped.argmax(1)).float().mean())
    diff = float((adapted - stripped).abs().max() / adapted.abs().max())
    return agreement, diff


@pytest.fixture(scope="module")
def adapted_cnn(float_cnn, calib, digits_stream, held_out):
    """Our NNCF W8A8 CNN after Tent on 4 batches (2 domains), in source norm mode, its held-out
    logits, and its state; then stripped (state taken again after strip)."""
    qmodel = qtta_plugins.quantize(float_cnn, "nncf", "w8a8", calib, calib_batches=2)
    before = norm_params(qmodel)
    run = qtta_plugins.adapt(qmodel, tent_batches(digits_stream, 2, 2), "tent")
    model = run.model
    view = qtta_plugins.quant_view(model)
    view.set_norm_mode("source")
    ref = logits(model, held_out)
    snapshot = state(model)
    stripped = strip(model)
    return {
        "before": before,
        "model": model,
        "ref": ref,
        "state": snapshot,
        "state_after": state(model),
        "ref_after": logits(model, held_out[:64]),
        "stripped": stripped,
        "out": logits(stripped, held_out),
    }


def test_tent_changed_the_norm_affine_parameters(adapted_cnn):
    after = norm_params(adapted_cnn["model"])
    assert len(after) == len(adapted_cnn["before"]) == 18
    changed = [not torch.equal(a, b) for a, b in zip(adapted_cnn["before"], after, strict=True)]
    assert all(changed)


def test_stripped_model_predicts_what_the_adapted_model_predicts(adapted_cnn):
    agreement, diff = compare(adapted_cnn["ref"], adapted_cnn["out"])
    assert agreement >= AGREEMENT, agreement
    assert diff < LOGIT_TOL, diff
    mean_diff = float((adapted_cnn["ref"] - adapted_cnn["out"]).abs().mean())
    assert mean_diff < 1e-2, mean_diff


def test_stripped_model_holds_torch_fake_quantize_not_nncf_quantizers(adapted_cnn):
    stripped = adapted_cnn["stripped"]
    assert type(stripped) is type(adapted_cnn["model"])
    assert quantizer_modules(stripped) == {}
    nncf_modules = {
        type(m).__name__
        for m in stripped.modules()
        if type(m).__module__.startswith("nncf.")
        and not isinstance(m, nncf.torch.function_hook.hook_storage.HookStorage)
    }
    assert nncf_modules == set()
    # NNCF's hook storage stays (the forward is still NNCF's wrapper); its hooks are now PyTorch's
    # own FakeQuantize modules, one for each NNCF quantizer
    hooks = dict(stripped._modules[HOOKS_ATTR].named_hooks())
    assert all(isinstance(h, torch.ao.quantization.FakeQuantize) for h in hooks.values())
    fqs = [m for m in stripped.modules() if isinstance(m, torch.ao.quantization.FakeQuantize)]
    assert len(fqs) == len(hooks) == len(adapted_cnn["state"]["quantizers"]) == 24
    assert all(fq.observer_enabled.item() == 0 and fq.fake_quant_enabled.item() == 1 for fq in fqs)
    assert all(fq.quant_max - fq.quant_min == 255 for fq in fqs)  # 8 bit
    schemes = [fq.qscheme for fq in fqs]
    assert schemes.count(torch.per_channel_symmetric) == 10
    assert schemes.count(torch.per_tensor_symmetric) == 14
    # fixed statistics: eval mode, no batch-mode momentum, no leftover gradients
    assert not any(m.training for m in stripped.modules())
    momentum = {
        n: m.momentum
        for n, m in stripped.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and "_qtta_momentum" not in m.__dict__
    }
    assert momentum == adapted_cnn["state"]["momentum"] and len(momentum) == 9
    assert all(p.grad is None for p in stripped.parameters())
    with pytest.raises(UnknownBackendError):
        qtta_plugins.quant_view(stripped)


def test_strip_leaves_the_callers_adapted_model_unchanged(adapted_cnn, held_out):
    assert_same_state(adapted_cnn["state"], adapted_cnn["state_after"])
    assert torch.equal(adapted_cnn["ref"][:64], adapted_cnn["ref_after"])
    assert adapted_cnn["stripped"] is not adapted_cnn["model"]


def test_strip_in_place_returns_the_same_model(adapted_cnn, held_out):
    model = copy.deepcopy(adapted_cnn["model"])
    stripped = strip(model, do_copy=False)
    assert stripped is model and quantizer_modules(model) == {}
    assert torch.equal(logits(stripped, held_out[:64]), adapted_cnn["out"][:64])


def test_a_model_in_batch_mode_strips_to_running_statistics(adapted_cnn, held_out):
    model = copy.deepcopy(adapted_cnn["model"])
    qtta_plugins.quant_view(model).set_norm_mode("batch")
    snapshot = state(model)
    stripped = strip(model)
    assert_same_state(snapshot, state(model))  # the caller's model stays in batch mode
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.training and m.momentum == 0.0 for m in bns)
    # the stripped model normalises with the running statistics, as in source mode
    assert not any(m.training for m in stripped.modules())
    assert torch.equal(logits(stripped, held_out[:64]), adapted_cnn["out"][:64])


def test_switched_off_quantizers_are_removed_not_turned_on(adapted_cnn, held_out):
    model = copy.deepcopy(adapted_cnn["model"])
    quantizers = qtta_plugins.quant_view(model).quantizers()
    quantizers[4].enabled = False
    quantizers[5].bits = 4  # a disabled quantizer may have any width
    quantizers[5].enabled = False
    x = held_out[::2]
    ref = logits(model, x)
    stripped = strip(model)
    fqs = [m for m in stripped.modules() if isinstance(m, torch.ao.quantization.FakeQuantize)]
    assert len(fqs) == 22
    agreement, diff = compare(ref, logits(stripped, x))
    assert agreement >= AGREEMENT and diff < LOGIT_TOL, (agreement, diff)


def test_below_8_bit_is_a_clear_error_and_changes_nothing(adapted_cnn):
    # W4A4 with 8-bit first / last layers, as qtta_plugins.quantize(..., "w4a4") sets the widths
    # (its range re-fit is left out: the check reads bit-widths only)
    qmodel = copy.deepcopy(adapted_cnn["model"])
    view = qtta_plugins.quant_view(qmodel)
    layers = view.layers()
    edge = {
        q.name
        for layer in (layers[0], layers[-1])
        for q in (layer.weight_quantizer, layer.input_quantizer)
        if q is not None
    }
    assert len(edge) == 4
    for q in view.quantizers():
        q.bits = 8 if q.name in edge else 4
    snapshot = state(qmodel)
    with pytest.raises(ValueError, match=r"8-bit quantizers only") as info:
        strip(qmodel, do_copy=False)
    message = str(info.value)
    assert f"{24 - len(edge)} enabled quantizer(s)" in message and "(4 bit)" in message
    assert "(8 bit)" not in message
    assert "__nncf_hooks.pre_hooks.layer1/conv1/conv2d/0__1.0 (4 bit)" in message
    assert_same_state(snapshot, state(qmodel))


@pytest.fixture(scope="module")
def users_model(float_cnn, calib):
    """A model quantized with NNCF's own API, as a user would (do not mutate: adapt copies)."""
    return nncf.quantize(float_cnn, nncf.Dataset(calib[:1]), subset_size=1)


def test_not_an_nncf_model_and_no_example_input_are_clear_errors(float_cnn, users_model):
    with pytest.raises(ValueError, match=r"not an NNCF-quantized model"):
        strip(float_cnn)
    # a user's model never run through a view: no example input known, none passed
    with pytest.raises(ValueError, match=r"example input"):
        strip(copy.deepcopy(users_model))


def test_users_own_nncf_model_adapted_with_tent_strips_and_matches(
    users_model, digits_stream, held_out
):
    users = copy.deepcopy(users_model)
    before = norm_params(users)
    run = qtta_plugins.adapt(users, tent_batches(digits_stream, 1, 1), "tent")
    model = run.model
    assert not any(torch.equal(a, b) for a, b in zip(before, norm_params(model), strict=True))
    qtta_plugins.quant_view(model).set_norm_mode("source")
    ref = logits(model, held_out)
    snapshot = state(model)
    stripped = strip(model)  # the example input is the one the view captured during adapt
    assert_same_state(snapshot, state(model))
    assert quantizer_modules(stripped) == {}
    agreement, diff = compare(ref, logits(stripped, held_out))
    assert agreement >= AGREEMENT and diff < LOGIT_TOL, (agreement, diff)


def test_tiny_vit_strips_and_matches(calib, digits_stream, held_out):
    torch.manual_seed(0)
    qmodel = qtta_plugins.quantize(TinyViT().eval(), "nncf", "w8a8", calib, calib_batches=2)
    run = qtta_plugins.adapt(qmodel, tent_batches(digits_stream, 1, 1), "tent")
    model = run.model
    qtta_plugins.quant_view(model).set_norm_mode("source")
    ref = logits(model, held_out)
    stripped = strip(model)
    assert quantizer_modules(stripped) == {}
    fqs = [m for m in stripped.modules() if isinstance(m, torch.ao.quantization.FakeQuantize)]
    assert len(fqs) == len(quantizer_modules(model))
    # NNCF quantizes a transformer with SmoothQuant: its SQMultiply scalings (exact in float) stay
    left = {type(m).__name__ for m in stripped.modules() if type(m).__module__.startswith("nncf.")}
    assert left == {"HookStorage", "SQMultiply"}
    agreement, diff = compare(ref, logits(stripped, held_out))
    assert agreement >= AGREEMENT and diff < LOGIT_TOL, (agreement, diff)

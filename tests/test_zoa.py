"""ZOA and FOA: forward-only adaptation, the domain memory, the detector, state, and the integer path."""

from __future__ import annotations

import copy

import pytest
import torch
from _state import model_state

import qtta_plugins
from qtta_plugins.methods.zoa import ZOA, ZOAConfig, symmetric_kl

pytest.importorskip("torchao")


@pytest.fixture(scope="module")
def short_stream(stream_excerpt):
    """Four batches each from three domains of the digits-C stream."""
    return stream_excerpt(4)


class PassCounter:
    """Counts forward passes of a model and whether autograd could have recorded any of them."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = 0
        self.grad_enabled: list[bool] = []
        self.out_requires_grad: list[bool] = []
        self.handles = [
            model.register_forward_pre_hook(self._pre),
            model.register_forward_hook(self._post),
        ]

    def _pre(self, module, args):
        self.calls += 1
        self.grad_enabled.append(torch.is_grad_enabled())

    def _post(self, module, args, out):
        self.out_requires_grad.append(bool(out.requires_grad))


# --- forward-only means forward-only -------------------------------------------------------------
@pytest.mark.parametrize("method, passes", [("zoa", 2), ("foa", 28)])
def test_exact_forward_passes_per_step_and_no_autograd(qcnn, short_stream, method, passes):
    # zoa's default second pass runs the model's graph from the first adapted layer on (not a
    # model call; tests/test_prefix.py checks it computes the same): count whole passes here
    options = {"reuse_prefix": False} if method == "zoa" else {}
    run = qtta_plugins.adapt(qcnn["w4a4"], None, method, **options)
    counter = PassCounter(run.model)
    for batch in short_stream[:3]:
        before = counter.calls
        run.step(batch.x, batch.y)
        assert counter.calls - before == passes
    assert not any(counter.grad_enabled) and not any(counter.out_requires_grad)
    assert not any(p.requires_grad for p in run.model.parameters())


def test_late_norms_are_the_later_middle_blocks_and_lengthen_the_reused_prefix(qcnn, digits):
    runs = {
        w: qtta_plugins.adapt(qcnn["w4a4"], None, "zoa", norm_layers=w) for w in ("middle", "late")
    }
    assert runs["late"].method.norm_names == ["layer2.bn1", "layer2.bn2", "layer2.shortcut.1"]
    x = digits[1].x[:32]
    for run in runs.values():
        run.step(x)
    reused = {w: run.method.prefix.reused_fraction for w, run in runs.items()}
    assert 0 < reused["middle"] < reused["late"] < 1, reused


def test_zoa_adapts_only_the_middle_norm_affines(qcnn, short_stream):
    run = qtta_plugins.adapt(qcnn["w4a4"], None, "zoa", norm_layers="middle")
    params = dict(run.model.named_parameters())
    before = {k: p.detach().clone() for k, p in params.items()}
    run.run(short_stream)
    changed = {k for k in before if not torch.equal(before[k], params[k])}
    assert changed, "ZOA changed nothing"
    # the output shift lives in the last layer's bias
    head_bias = [k for k, p in params.items() if p is run.method.recorder.head.bias]
    assert len(head_bias) == 1 and head_bias[0] in changed
    assert all(
        k.startswith(("layer1.", "layer2.")) and k.endswith((".weight", ".bias"))
        for k in changed - set(head_bias)
    )
    assert run.method.norm_names == [
        "layer1.bn1",
        "layer1.bn2",
        "layer2.bn1",
        "layer2.bn2",
        "layer2.shortcut.1",
    ]


def test_zoa_runs_on_the_converted_integer_model_and_is_its_default(converted_w4a4, digits_stream):
    converted = converted_w4a4
    view = qtta_plugins.quant_view(converted)
    assert not view.can_backprop
    assert [n.folded for n in view.norms()] == [True] * 9
    before = model_state(converted)
    run = qtta_plugins.adapt(converted, digits_stream)
    assert run.config.method == "zoa"
    source = qtta_plugins.adapt(converted, digits_stream, "source")
    assert run.errors()["mean"] < source.errors()["mean"] - 10
    assert all(torch.equal(before[k], v) for k, v in converted.state_dict().items())


# ~17 s (a second convert of the W4A4 model): under -m slow (issue 36: the suite's time)
@pytest.mark.slow
def test_folded_norm_stand_ins_are_the_identity_on_source_statistics(qcnn, converted_w4a4, digits):
    from qtta_torchao.export import convert

    _, test = digits
    with_norms, plain = converted_w4a4, convert(qcnn["w4a4"], folded_norms=False)
    x = test.x[:64]
    with torch.no_grad():
        assert torch.allclose(with_norms(x), plain(x), atol=1e-5)
    # On batch statistics they renormalise like BN-adapt on the model before conversion.
    norm_prepared = qtta_plugins.adapt(qcnn["w4a4"], [x], "norm").predictions
    norm_converted = qtta_plugins.adapt(with_norms, [x], "norm").predictions
    assert (norm_prepared == norm_converted).float().mean() > 0.95


def test_zoa_beats_source_on_the_digits_stream(qcnn, digits_stream):
    zoa = qtta_plugins.adapt(qcnn["w4a4"], digits_stream, "zoa")
    source = qtta_plugins.adapt(qcnn["w4a4"], digits_stream, "source")
    assert zoa.errors()["mean"] < source.errors()["mean"] - 10
    # The detector found most of the 14 domain switches, and the memory stored them.
    assert len(zoa.method.changes) >= 8
    assert zoa.method.memory_deltas.shape[0] >= 5


# --- the memory ------------------------------------------------------------------------------------
def _fused(method: ZOA) -> torch.Tensor:
    return method.theta0 + method._mix(method.alpha) + method.eps


@pytest.fixture
def zoa_method(qcnn):
    run = qtta_plugins.adapt(qcnn["w4a4"], None, ZOAConfig(memory_size=3))
    return run.method


def test_memory_store_keeps_the_function_and_makes_the_new_domain_dominant(zoa_method):
    m = zoa_method
    gen = torch.Generator().manual_seed(0)
    m.eps = torch.randn(m.eps.shape, generator=gen) * 0.01
    before = _fused(m)
    m._store()
    assert m.memory_deltas.shape[0] == 1
    assert torch.allclose(_fused(m), before, atol=1e-6)  # no jump
    weights = torch.softmax(m.config.temperature * m.alpha, 0)
    assert int(weights.argmax()) == 1 and weights[1] > 0.99
    assert torch.allclose(m.memory_deltas[0], before - m.theta0, atol=1e-6)


def test_memory_merges_the_most_similar_pair_beyond_its_size(zoa_method):
    m = zoa_method  # memory_size=3
    d = m.eps.numel()
    gen = torch.Generator().manual_seed(1)
    a, b, c = (torch.randn(d, generator=gen) for _ in range(3))
    m.memory_deltas = torch.stack([a, b, c])
    m.alpha = torch.tensor([0.0, 0.1, 0.2, 0.3])
    m.eps = torch.zeros(d)
    m.eps = (a * 1.01 + 0.001) - m._mix(m.alpha)  # total delta nearly parallel to `a`
    before = _fused(m)
    m._store()
    assert m.memory_deltas.shape[0] == 3  # capped
    # `a` (row 0) and the new entry were merged into their mean, in row 0; b and c are kept.
    assert torch.allclose(m.memory_deltas[0], (a + a * 1.01 + 0.001) / 2, atol=1e-5)
    assert torch.equal(m.memory_deltas[1], b) and torch.equal(m.memory_deltas[2], c)
    assert m.alpha.shape == (4,)
    assert torch.allclose(_fused(m), before, atol=1e-5)  # eps absorbed the merge


def test_memory_bytes_per_domain_is_one_float_per_adapted_parameter(zoa_method):
    n = sum(p.numel() for p in zoa_method.params)
    assert zoa_method.memory_bytes_per_domain == 4 * n


# --- the detector --------------------------------------------------------------------------------
def test_symmetric_kl_is_zero_for_equal_gaussians_and_symmetric():
    m, v = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0])
    assert symmetric_kl(m, v, m, v) == pytest.approx(0.0, abs=1e-7)
    m2, v2 = torch.tensor([0.5, 0.0]), torch.tensor([2.0, 1.0])
    assert symmetric_kl(m, v, m2, v2) == pytest.approx(symmetric_kl(m2, v2, m, v))
    assert symmetric_kl(m, v, m2, v2) > 0.1


def test_detector_fires_on_a_domain_switch_and_not_on_iid_batches(qcnn, digits):
    from qtta_plugins.data import corrupt_set

    _, test = digits
    clean = [test.x[i : i + 50] for i in range(0, 400, 50)]
    fog = corrupt_set(test, "fog", 5, progress=False).x[:150]
    run = qtta_plugins.adapt(qcnn["w4a4"], None, "zoa")
    for x in clean:
        run.step(x)
    assert run.method.changes == []  # eight i.i.d. clean batches: no change
    for i in range(0, 150, 50):
        run.step(fog[i : i + 50])
    assert run.method.changes == [len(clean)]  # fires at the switch, once


def test_without_detector_the_memory_stores_periodically(qcnn, short_stream):
    run = qtta_plugins.adapt(qcnn["w4a4"], short_stream, "zoa", detector=False, store_period=4)
    assert run.method.changes == [4, 8]
    assert run.method.memory_deltas.shape[0] == 2


# --- state ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["zoa", "foa"])
def test_save_and_load_round_trip(qcnn, short_stream, tmp_path, method):
    half = len(short_stream) // 2
    # FOA with a population of 4 (28 passes a batch at its default): the same state to carry
    options = {"population": 4} if method == "foa" else {}
    run = qtta_plugins.adapt(qcnn["w4a4"], short_stream[:half], method, **options)
    run.save(tmp_path / "state.pt")
    rest = run.run(short_stream[half:])

    fresh = qtta_plugins.adapt(qcnn["w4a4"], None, method, **options)
    # A foa state holds its CMA-ES object, which only full unpickling rebuilds (test_careful_user
    # checks that an untrusted load of it refuses); this file is our own.
    fresh.load(tmp_path / "state.pt", trusted=method == "foa")
    assert torch.equal(fresh.run(short_stream[half:]), rest)
    assert all(
        torch.equal(v, run.model.state_dict()[k]) for k, v in fresh.model.state_dict().items()
    )
    if method == "zoa":
        assert torch.equal(fresh.method.memory_deltas, run.method.memory_deltas)
        assert torch.equal(fresh.method.alpha, run.method.alpha)


@pytest.mark.parametrize("method", ["zoa", "foa"])
def test_deterministic_and_reset(qcnn, short_stream, method):
    # FOA with a population of 4 (28 passes a batch at its default): the same seeded machinery
    options = {"population": 4} if method == "foa" else {}
    a = qtta_plugins.adapt(qcnn["w4a4"], short_stream, method, seed=3, **options)
    b = qtta_plugins.adapt(qcnn["w4a4"], short_stream, method, seed=3, **options)
    assert torch.equal(a.predictions, b.predictions)
    first = a.predictions.clone()
    a.reset()
    assert torch.equal(a.run(short_stream), first)


def test_a_bad_batch_changes_nothing(qcnn, short_stream):
    run = qtta_plugins.adapt(qcnn["w4a4"], short_stream[:3], "zoa")
    state = copy.deepcopy(run.method.state_dict())
    before = model_state(run.model)
    bad = short_stream[3].x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(qtta_plugins.BadBatchError, match="NaN"):
        run.step(bad)
    original = run.method.forward_and_adapt

    def explode(x):
        original(x)
        raise RuntimeError("boom")

    run.method.forward_and_adapt = explode
    with pytest.raises(RuntimeError, match="boom"):
        run.step(short_stream[3].x)
    assert all(torch.equal(before[k], v) for k, v in model_state(run.model).items())
    after = run.method.state_dict()
    assert torch.equal(after["eps"], state["eps"]) and after["batches"] == state["batches"]


# --- options -------------------------------------------------------------------------------------
def test_config_errors_name_the_option(qcnn):
    qm = qcnn["w4a4"]
    with pytest.raises(ValueError, match=r"ZOAConfig.lr"):
        qtta_plugins.adapt(qm, None, "zoa", lr=0)
    with pytest.raises(ValueError, match=r"ZOAConfig.norm_layers"):
        qtta_plugins.adapt(qm, None, "zoa", norm_layers="some")
    with pytest.raises(ValueError, match=r"no loss"):
        qtta_plugins.adapt(qm, None, "zoa", entropy=False, align_weight=0)
    with pytest.raises(ValueError, match=r"FOAConfig.population"):
        qtta_plugins.adapt(qm, None, "foa", population=1)


def test_without_source_data_alignment_and_shift_are_off_with_a_warning(qcnn, short_stream, calib):
    from qtta_plugins.view import keep_source_statistics

    qm = copy.deepcopy(qcnn["w4a4"])
    keep_source_statistics(qm, None)  # what quantize kept in place of its calibration images
    with pytest.warns(UserWarning, match=r"no clean source data"):
        run = qtta_plugins.adapt(qm, short_stream, "zoa")
    assert run.method.align_weight == 0 and run.method.recorder.shift_target is None
    # Passing clean data explicitly turns them back on.
    clean = torch.cat(calib)[:128]
    run = qtta_plugins.adapt(qm, None, "zoa", source_data=clean)
    assert run.method.align_weight == 1.0 and run.method.recorder.shift_target is not None


def _detector_never_ran(m: ZOA) -> bool:
    """No change recorded, no statistics watched (no detector tap), none kept."""
    return m.changes == [] and m.recorder.detector_stats is None and m.running_detector is None


@pytest.fixture(scope="module")
def all_on(qcnn, short_stream):
    """ZOA with every component on, over the three-domain short stream."""
    return qtta_plugins.adapt(qcnn["w4a4"], short_stream, "zoa").method


@pytest.mark.parametrize(
    "off, check",
    [
        ({"shift": False}, lambda m: m.recorder.shift_target is None),
        ({"memory": False}, lambda m: m.memory_deltas.shape[0] == 0),
        # store_period (50) is longer than the stream (12 batches): nothing but the detector
        # could record a change or store a domain here
        ({"detector": False}, lambda m: _detector_never_ran(m) and m.memory_deltas.shape[0] == 0),
    ],
)
def test_every_component_switches_off(qcnn, short_stream, all_on, off, check):
    run = qtta_plugins.adapt(qcnn["w4a4"], short_stream, "zoa", **off)
    assert check(run.method)
    # the same check tells the component on: the stream has two clear domain switches, so the
    # detector fires and the memory stores what it saw
    assert not check(all_on)
    assert all_on.changes and all_on.memory_deltas.shape[0] > 0


# --- skip the update once a domain has converged (skip_converged) --------------------------------
def _settle_run(qcnn, **options):
    return qtta_plugins.adapt(
        qcnn["w4a4"],
        None,
        "zoa",
        reuse_prefix=False,  # whole passes, counted
        skip_converged=True,
        converge_window=2,
        # a wide relative tolerance and no noise term: the repeated batch's loss (which the
        # SPSA steps move by a few %) settles at the first chance, whatever the rounding
        converge_tolerance=0.5,
        converge_z=0.0,
        probe_period=4,
        **options,
    )


def test_a_settled_domain_runs_one_pass_and_probes_periodically(qcnn, digits):
    _, test = digits
    x = test.x[:64]
    run = _settle_run(qcnn)
    counter = PassCounter(run.model)
    passes, fused = [], []
    for _ in range(14):  # one batch over and over: the loss settles as soon as it is measured
        before = counter.calls
        run.step(x)
        passes.append(counter.calls - before)
        fused.append(_fused(run.method).clone())
    # settled once two windows of two batches agree (the 4th batch), then one pass, with a
    # two-pass probe on every 4th batch since the last update
    assert passes == [2, 2, 2, 1, 1, 1, 2, 1, 1, 1, 2, 1, 1, 1], passes
    assert run.method.one_pass_batches == passes.count(1)
    for i in range(3, 14):  # a one-pass batch leaves the adapted parameters as they were
        if passes[i] == 1:
            assert torch.equal(fused[i], fused[i - 1])
        else:
            assert not torch.equal(fused[i], fused[i - 1])


def test_a_domain_change_or_a_moving_loss_brings_the_update_back(qcnn, digits):
    from qtta_plugins.data import corrupt_set

    _, test = digits
    clean = test.x[:64]
    fog = corrupt_set(test, "fog", 5, progress=False).x[:64]
    run = _settle_run(qcnn)
    counter = PassCounter(run.model)
    for _ in range(6):
        run.step(clean)
    assert run.method.settled_loss is not None
    before = counter.calls
    run.step(fog)  # the detector fires: a new domain adapts from its first batch
    assert run.method.changes == [6]
    assert counter.calls - before == 2
    assert run.method.settled_loss is None

    # without the detector, the pass-1 loss leaving the settled level does the same
    run = _settle_run(qcnn, detector=False, store_period=1000)
    for _ in range(6):
        run.step(clean)
    assert run.method.settled_loss is not None
    before = counter.calls
    counter = PassCounter(run.model)
    run.step(fog)
    assert counter.calls == 2 and run.method.settled_loss is None


def test_settling_allows_for_batch_noise_but_not_for_a_trend(qcnn):
    def settles(losses, **options):
        run = qtta_plugins.adapt(
            qcnn["w4a4"], None, "zoa", skip_converged=True, converge_tolerance=0.02, **options
        )
        settled = []
        for v in losses:
            run.method._settled(v, changed=False)
            settled.append(run.method.settled_loss is not None)
        return settled

    rng = torch.Generator().manual_seed(0)
    noisy = (1 + 0.15 * torch.randn(200, generator=rng)).tolist()  # a flat level, 15% batch noise
    trend = [1 - 0.03 * i + 0.005 * (-1) ** i for i in range(30)]  # falling 3% a batch
    # the relative tolerance alone rarely sees a flat but noisy loss as settled; within two
    # standard errors of the noise it mostly is
    assert sum(settles(noisy, converge_z=0.0)) < 0.2 * len(noisy)
    assert sum(settles(noisy)) > 0.6 * len(noisy)
    assert not any(settles(trend))
    with pytest.raises(ValueError, match="converge_z"):
        ZOAConfig(converge_z=-1.0)


def test_skip_converged_is_on_by_default_and_state_round_trips(qcnn, digits):
    _, test = digits
    x = test.x[:64]
    run = qtta_plugins.adapt(qcnn["w4a4"], [x] * 10, "zoa", skip_converged=False)
    assert run.method.one_pass_batches == 0
    run = qtta_plugins.adapt(qcnn["w4a4"], [x] * 10, "zoa")  # one batch over and over: settles
    assert run.method.config.skip_converged and run.method.config.norm_layers == "late"
    assert run.method.one_pass_batches > 0
    run = _settle_run(qcnn)
    for _ in range(5):
        run.step(x)
    state = run.state_dict()
    assert run.method.one_pass_batches == 2
    preds = [run.step(x) for _ in range(4)]
    skipped = run.method.one_pass_batches
    run.load_state_dict(state)
    again = [run.step(x) for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(preds, again, strict=True))
    assert run.method.one_pass_batches == skipped == 5  # the probe at the 7th batch updates


# --- the adapted model carries no hook of ours ------------------------------------------------------
def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_between_steps_the_model_carries_no_hooks_and_adaptation_goes_on(
    qcnn, short_stream, reuse_prefix
):
    batches = [b.x for b in short_stream][:4]
    runs = [
        qtta_plugins.adapt(qcnn["w4a4"], None, "zoa", reuse_prefix=reuse_prefix) for _ in range(2)
    ]
    head = runs[0].method.recorder.head
    assert head is not None and runs[0].method.recorder.persistent_hooks == 0
    expected = hook_count(qcnn["w4a4"])
    assert hook_count(runs[0].model) == expected
    preds = [], []
    for x in batches:
        for i, run in enumerate(runs):
            preds[i].append(run.step(x))
        assert hook_count(runs[0].model) == expected
        # the model between steps, used on its own: it computes with the state the method holds
        # (norms and the shift in the head bias), and using it disturbs nothing
        with torch.no_grad():
            runs[0].model(x)
        shift = runs[0].method.recorder.applied_shift
        assert torch.allclose(head.bias, head.base + head.weight @ shift, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(*preds, strict=True))
    runs[0].reset()
    assert torch.equal(head.bias, head.base)


def test_foa_leaves_only_its_input_prompt_hook(qcnn, short_stream):
    x = next(iter(short_stream)).x
    run = qtta_plugins.adapt(qcnn["w4a4"], None, "foa", population=3)
    run.step(x)
    assert hook_count(run.model) == hook_count(qcnn["w4a4"]) + 1  # the prompt, on the model
    assert run.method.recorder.head is not None and run.method.recorder.persistent_hooks == 0


def test_a_last_layer_without_bias_keeps_the_shift_in_one_input_hook(float_cnn, calib, digits):
    float_model = copy.deepcopy(float_cnn)
    fc = float_model.fc
    float_model.fc = torch.nn.Linear(fc.in_features, fc.out_features, bias=False)
    float_model.fc.weight.data.copy_(fc.weight.data)
    qmodel = qtta_plugins.quantize(float_model, "torchao", "w8a8", calib)
    x = digits[1].x[:32]
    run = qtta_plugins.adapt(qmodel, None, "zoa")
    assert run.method.recorder.head is None
    first = run.step(x)
    assert run.method.recorder.persistent_hooks == 1
    assert hook_count(run.model) == hook_count(qmodel) + 1
    recorder = run.method.recorder
    # a shift of a few input steps (this one can be under half a step, which rounding absorbs)
    recorder.applied_shift = torch.full_like(recorder.applied_shift, 0.5)
    with torch.no_grad():
        kept = run.model(x)
    recorder.remove()  # without the shift hook, the model computes another function
    with torch.no_grad():
        assert not torch.equal(run.model(x), kept)
    assert hook_count(run.model) == hook_count(qmodel)
    assert first.shape == kept.shape

"""EATA: the two sample filters, the weights, the Fisher term, ABL inside it, state, backends."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _state import model_state, same_state

import qtta_plugins
from qtta_plugins import ABLConfig, BadBatchError, EATAConfig
from qtta_plugins.methods.abl import softmax_entropy
from qtta_plugins.methods.eata import eata_loss, eata_selection
from qtta_plugins.methods.tent import tent_parameters
from qtta_plugins.view import remember_source_sample

pytest.importorskip("torchao")

K = 10
E0 = 0.4 * math.log(K)
BACKENDS = ["torchao", "brevitas", "nncf"]


@pytest.fixture(scope="module")
def clean(calib):
    """Clean source images for the Fisher (the calibration data, no labels)."""
    return torch.cat(calib)[:128]


def params_of(run: qtta_plugins.Adaptation) -> list[torch.Tensor]:
    return [p.detach().clone() for p in run.method.adapted_parameters()]


# --- the filters and the weights, on constructed logits ------------------------------------------
def _mixed_logits() -> tuple[torch.Tensor, torch.Tensor]:
    """Rows 0, 2, 4: confident (entropy far below E0); rows 1, 3, 5: nearly uniform (above)."""
    torch.manual_seed(0)
    logits = torch.randn(6, K) * 0.05
    low = torch.tensor([0, 2, 4])
    logits[low, torch.tensor([1, 5, 7])] += 8.0
    return logits, torch.isin(torch.arange(6), low)


def test_the_reliable_filter_keeps_only_low_entropy_samples_and_only_they_get_gradient():
    logits, low = _mixed_logits()
    entropy = softmax_entropy(logits)
    assert (entropy[low] < 0.05).all() and (entropy[~low] > E0).all()
    reliable, selected = eata_selection(logits, None, E0, 0.4)
    assert torch.equal(reliable, low) and torch.equal(selected, low)

    z = logits.clone().requires_grad_(True)
    eata_loss(z, selected, E0).backward()
    assert (z.grad[~low] == 0).all()  # the high-entropy samples add nothing to the gradient
    assert (z.grad[low].abs().sum(1) > 0).all()

    # with the filter off, every sample is in the loss
    reliable, selected = eata_selection(logits, None, E0, 0.4, reliable_filter=False)
    assert reliable.all() and selected.all()
    z = logits.clone().requires_grad_(True)
    eata_loss(z, selected, E0).backward()
    assert (z.grad.abs().sum(1) > 0).all()


def test_the_redundancy_filter_drops_samples_like_those_already_learnt_from():
    logits, low = _mixed_logits()
    # the EMA of the selected samples' softmax has seen mostly class 1 (row 0's class)
    probs = logits[0].softmax(0) * 0.9 + 0.1 / K
    cosine = F.cosine_similarity(probs.unsqueeze(0), logits.softmax(1), dim=1)
    assert cosine[0] > 0.9 and (cosine[[2, 4]] < 0.1).all()
    reliable, selected = eata_selection(logits, probs, E0, 0.4)
    assert torch.equal(reliable, low)
    assert selected.tolist() == [False, False, True, False, True, False]
    # off, or before any sample was selected (no EMA yet): only the first filter
    _, selected = eata_selection(logits, probs, E0, 0.4, redundancy_filter=False)
    assert torch.equal(selected, low)
    _, selected = eata_selection(logits, None, E0, 0.4)
    assert torch.equal(selected, low)


def test_the_weights_are_exp_of_e0_minus_the_entropy_and_constant_in_the_gradient():
    logits, low = _mixed_logits()
    logits = logits + torch.linspace(0, 3, K)  # spread the confident rows' entropies apart
    entropy = softmax_entropy(logits)
    weights = torch.exp(E0 - entropy[low])
    expected = (weights * entropy[low]).mean()
    torch.testing.assert_close(eata_loss(logits, low, E0), expected)
    torch.testing.assert_close(eata_loss(logits, low, E0, reweight=False), entropy[low].mean())
    # the weight is a constant: the gradient is weight * dE, not d(weight * E)
    z = logits.clone().requires_grad_(True)
    eata_loss(z, low, E0).backward()
    w = weights.detach()
    z2 = logits.clone().requires_grad_(True)
    ((w * softmax_entropy(z2[low])).sum() / low.sum()).backward()
    torch.testing.assert_close(z.grad, z2.grad)


# --- the method on a model -----------------------------------------------------------------------
def test_counts_and_the_softmax_ema_follow_the_filters_on_a_stream(qcnn, short_stream):
    m = 0.5
    run = qtta_plugins.adapt(qcnn["w4a4"], None, "eata", fisher=False, probs_decay=m)
    probs = None
    for b in short_stream[:3]:
        before = (run.method.reliable_samples, run.method.selected_samples)
        logits = run.step(b.x)  # the pre-update logits, from which the method selected
        reliable, selected = eata_selection(logits, probs, E0, 0.4)
        assert run.method.reliable_samples - before[0] == int(reliable.sum())
        assert run.method.selected_samples - before[1] == int(selected.sum())
        mean = logits[selected].softmax(1).mean(0)
        probs = mean if probs is None else m * probs + (1 - m) * mean
        torch.testing.assert_close(run.method.probs, probs)
    # both filters did something on this stream (so the counts above are not trivially N)
    assert 0 < run.method.selected_samples < run.method.reliable_samples < 3 * len(logits)


def _hand_written_eata(qm, batches, clean, alpha=2000.0):
    """EATA written out from the paper, outside the package: returns (logits, final params)."""
    qm = copy.deepcopy(qm)
    view = qtta_plugins.quant_view(qm)
    params = tent_parameters(view)
    view.freeze()
    for p in params:
        p.requires_grad_(True)
    view.set_norm_mode("batch")
    fisher = [torch.zeros_like(p) for p in params]
    source = [clean[i : i + 64] for i in range(0, len(clean), 64)]
    for x in source:
        out = qm(x)
        grads = torch.autograd.grad(F.cross_entropy(out, out.argmax(1)), params)
        for f, g in zip(fisher, grads, strict=True):
            f += g**2
    fisher = [f / len(source) for f in fisher]
    theta0 = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=1e-2, momentum=0.9)
    probs, outputs = None, []
    for x in batches:
        logits = qm(x)
        entropy = softmax_entropy(logits)
        keep = entropy < E0
        if probs is not None:
            keep &= F.cosine_similarity(probs[None], logits.softmax(1), dim=1).abs() < 0.4
        weights = torch.exp(E0 - entropy[keep].detach())
        loss = (weights * entropy[keep]).mean() + alpha * sum(
            (f * (p - p0) ** 2).sum() for f, p, p0 in zip(fisher, params, theta0, strict=True)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        mean = logits[keep].detach().softmax(1).mean(0)
        probs = mean if probs is None else 0.9 * probs + 0.1 * mean
        outputs.append(logits.detach())
    return torch.cat(outputs), [p.detach().clone() for p in params]


def test_eata_is_the_papers_algorithm_and_abl_off_is_eata_exactly(qcnn, short_stream, clean):
    batches = [b.x for b in short_stream[:3]]
    expected_logits, expected_params = _hand_written_eata(qcnn["w4a4"], batches, clean)

    default = qtta_plugins.adapt(qcnn["w4a4"], None, "eata", source_data=clean)
    logits = torch.cat([default.step(x) for x in batches])
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
    for p, e in zip(params_of(default), expected_params, strict=True):
        torch.testing.assert_close(p, e, atol=1e-6, rtol=1e-5)

    # ABL off is EATA; ABL at zero weights is the same loss through its path
    off = EATAConfig(source_data=clean, abl=False)
    zero = EATAConfig(source_data=clean, abl=ABLConfig(tau_f=0.0, tau_g=0.0))
    for config in (off, zero):
        run = qtta_plugins.adapt(qcnn["w4a4"], batches, config)
        assert torch.equal(run.predictions, default.predictions)
        assert all(
            torch.equal(a, b) for a, b in zip(params_of(run), params_of(default), strict=True)
        )
    # and ABL on changes the adaptation (so the equalities above are not vacuous) ...
    on = qtta_plugins.adapt(qcnn["w4a4"], batches, "eata", source_data=clean, abl=True)
    assert any(
        not torch.equal(a, b) for a, b in zip(params_of(on), params_of(default), strict=True)
    )
    # ... its statistics move once per batch from the raw logits, and the prediction is raw
    pi = torch.full((K,), 1 / K)
    run = qtta_plugins.adapt(qcnn["w4a4"], None, "eata", source_data=clean, abl=True)
    for x in batches[:2]:
        with torch.no_grad():
            raw = run.model(x)
        out = run.step(x)
        torch.testing.assert_close(out, raw, atol=1e-6, rtol=0)
        pi = 0.9 * pi + 0.1 * out.softmax(1).mean(0)
        torch.testing.assert_close(run.method.class_freq, pi)
    assert not torch.equal(run.method.grad_mag, torch.ones(K))


def test_the_fisher_term_pulls_the_parameters_back(qcnn, short_stream, clean):
    """With plain SGD (momentum 0) the term's effect on a step is exact: both runs take the same
    first step (the penalty's gradient is 0 where the adaptation started), and on the second the
    pulled run's step differs from the free one's by ``-lr * 2 * alpha * F * (theta1 - theta0)``,
    which brings it closer to the start in the Fisher metric. (Over a whole stream the two runs'
    distances depend on which samples each run's filters keep: 0.5x to 0.8x in the Fisher metric
    on two source models, not a law to assert.)"""
    x1, x2 = (b.x for b in short_stream[:2])
    alpha = 50_000.0
    pulled = qtta_plugins.adapt(
        qcnn["w4a4"], None, "eata", source_data=clean, fisher_alpha=alpha, momentum=0.0
    )
    free = qtta_plugins.adapt(qcnn["w4a4"], None, "eata", fisher=False, momentum=0.0)
    lr = pulled.method.optimizer.param_groups[0]["lr"]
    fisher, theta0 = pulled.method.fisher, pulled.method.theta0
    assert fisher is not None and all(
        f.shape == p.shape and (f >= 0).all() and torch.isfinite(f).all()
        for f, p in zip(fisher, pulled.method.params, strict=True)
    )
    assert sum(f.sum() for f in fisher) > 0
    assert free.method.fisher is None

    pulled.step(x1)
    free.step(x1)
    theta1 = params_of(pulled)
    assert all(torch.equal(a, b) for a, b in zip(theta1, params_of(free), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(theta1, theta0, strict=True))
    assert pulled.method.fisher_penalty().item() > 0.0  # zero at the start, not after a step

    pulled.step(x2)
    free.step(x2)
    assert pulled.method.selected_samples == free.method.selected_samples > 0
    pull = [-lr * 2 * alpha * f * (t - t0) for f, t, t0 in zip(fisher, theta1, theta0, strict=True)]
    assert max(float(p.abs().max()) for p in pull) > 1e-4  # far above the tolerance below
    for p, q, d in zip(params_of(pulled), params_of(free), pull, strict=True):
        torch.testing.assert_close(p - q, d, atol=5e-7, rtol=1e-3)

    def fisher_distance(params):
        return sum(
            float((f * (p - p0) ** 2).sum())
            for f, p, p0 in zip(fisher, params, theta0, strict=True)
        )

    assert fisher_distance(params_of(pulled)) < fisher_distance(params_of(free))
    start = qtta_plugins.adapt(qcnn["w4a4"], None, "eata", source_data=clean)
    assert start.method.fisher_penalty().item() == 0.0


def test_the_fisher_needs_source_images_and_is_measured_without_changing_the_model(
    qcnn, short_stream, clean
):
    qm = qcnn["w4a4"]
    with pytest.raises(ValueError, match=r"fisher=True needs clean source images.*source_data"):
        qtta_plugins.adapt(qm, None, "eata", fisher=True)
    with pytest.warns(UserWarning, match=r"eata: no clean source images.*Fisher.*is off"):
        run = qtta_plugins.adapt(qm, None, "eata")
    assert run.method.fisher is None
    # the images a model quantized with keep_calibration_sample=True carries serve as well
    kept = copy.deepcopy(qm)
    remember_source_sample(kept, [clean])
    from_sample = qtta_plugins.adapt(kept, None, "eata", fisher=True)
    given = qtta_plugins.adapt(qm, None, "eata", source_data=clean)
    for a, b in zip(from_sample.method.fisher, given.method.fisher, strict=True):
        torch.testing.assert_close(a, b)
    # measuring it changed no tensor of the model
    off = qtta_plugins.adapt(qm, None, "eata", fisher=False)
    assert same_state(
        model_state(given.model, batch_counts=False), model_state(off.model, batch_counts=False)
    )
    assert all(p.grad is None for p in given.method.params)


# --- every backend; what a careful user relies on ---------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_eata_adapts_rolls_back_resets_saves_and_loads_on_every_backend(
    backend, qcnn_by_backend, digits, clean, tmp_path
):
    qm = qcnn_by_backend(backend)
    _, test = digits
    batches = [test.x[i : i + 32] for i in range(0, 32 * 5, 32)]
    run = qtta_plugins.adapt(qm, None, "eata", source_data=clean)
    initial_params, initial_state = params_of(run), run.method._copy_state()
    assert run.method.fisher is not None
    for x in batches[:2]:
        assert torch.isfinite(run.step(x)).all()
    after_two = params_of(run)
    assert any(not torch.equal(a, b) for a, b in zip(initial_params, after_two, strict=True))
    assert run.method.selected_samples > 0 and run.method.probs is not None

    # a step that fails after adapting changes nothing
    state = run.method._copy_state()
    original = run.method.forward_and_adapt

    def explode(x):
        original(x)
        raise RuntimeError("boom")

    run.method.forward_and_adapt = explode
    with pytest.raises(RuntimeError, match=r"boom"):
        run.step(batches[2])
    run.method.forward_and_adapt = original
    assert all(torch.equal(a, b) for a, b in zip(params_of(run), after_two, strict=True))
    assert run.method.selected_samples == state["selected_samples"]
    assert torch.equal(run.method.probs, state["probs"])

    # save, continue; a fresh run loaded from the file continues exactly alike
    run.save(tmp_path / "eata.pt")
    rest = run.run(batches[2:])
    fresh = qtta_plugins.adapt(qm, None, "eata", source_data=clean)
    fresh.load(tmp_path / "eata.pt")
    assert torch.equal(fresh.run(batches[2:]), rest)
    assert fresh.method.selected_samples == run.method.selected_samples

    # reset: back to the start, and the same stream gives the same predictions again
    run.reset()
    assert all(torch.equal(a, b) for a, b in zip(params_of(run), initial_params, strict=True))
    assert run.method.probs is None and run.method.selected_samples == 0
    assert run.method.state_dict()["optimizer"] == initial_state["optimizer"]


def test_a_bad_batch_or_state_changes_nothing(qcnn, short_stream):
    run = qtta_plugins.adapt(qcnn["w4a4"], short_stream[:2], "eata", fisher=False, abl=True)
    params, state = params_of(run), run.method._copy_state()
    with pytest.raises(BadBatchError, match=r"NaN"):
        run.step(torch.full((8, 1, 32, 32), float("nan")))
    bad_states = [
        ({**state, "probs": torch.ones(2, 2)}, r"probs must be None or a 1-D"),
        ({**state, "selected_samples": -1}, r"selected_samples must be an int >= 0"),
        ({k: v for k, v in state.items() if k != "abl"}, r"saved without ABL"),
        ({k: v for k, v in state.items() if k != "probs"}, r"lacks \['probs'\]"),
        ({**state, "abl": {"class_freq": torch.ones(3), "grad_mag": None}}, r"ABL state"),
    ]
    for bad, message in bad_states:
        with pytest.raises(ValueError, match=message):
            run.method.load_state_dict(bad)
    assert all(torch.equal(a, b) for a, b in zip(params_of(run), params, strict=True))
    after = run.method.state_dict()
    assert torch.equal(after["probs"], state["probs"])
    assert torch.equal(after["abl"]["class_freq"], state["abl"]["class_freq"])
    assert after["selected_samples"] == state["selected_samples"]


# --- configuration -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lr": 0.0}, r"EATAConfig.lr must be a positive finite number"),
        ({"e_margin": float("nan")}, r"EATAConfig.e_margin must be a positive"),
        ({"d_margin": -0.1}, r"EATAConfig.d_margin must be a positive"),
        ({"fisher_alpha": 0}, r"EATAConfig.fisher_alpha must be a positive"),
        ({"momentum": 1.0}, r"EATAConfig.momentum must be in \[0, 1\)"),
        ({"probs_decay": -0.5}, r"EATAConfig.probs_decay must be in \[0, 1\)"),
        ({"weight_decay": -1.0}, r"EATAConfig.weight_decay must be a finite number >= 0"),
        ({"reweight": 1}, r"EATAConfig.reweight must be True or False"),
        ({"redundancy_filter": "no"}, r"EATAConfig.redundancy_filter must be True or False"),
        ({"fisher": "yes"}, r"EATAConfig.fisher must be None"),
        ({"source_batch_size": 0}, r"EATAConfig.source_batch_size must be an int >= 1"),
        ({"abl": {"tau_f": -1.0}}, r"EATAConfig.abl: ABLConfig.tau_f must be a finite number"),
        ({"abl": {"decay": 1.0}}, r"EATAConfig.abl: ABLConfig.decay must be in \[0, 1\)"),
    ],
)
def test_eata_options_are_validated(options, message):
    with pytest.raises(ValueError, match=message):
        EATAConfig(**options)


def test_eata_options_reach_it_through_adapt_and_bad_ones_change_nothing(qcnn):
    qm = qcnn["w4a4"]
    before = model_state(qm, batch_counts=False)
    run = qtta_plugins.adapt(qm, None, "eata", fisher=False, d_margin=0.3, abl=True)
    assert isinstance(run.config, EATAConfig) and run.config.d_margin == 0.3 and run.config.abl
    with pytest.raises(ValueError, match=r"EATAConfig.e_margin"):
        qtta_plugins.adapt(qm, None, "eata", e_margin=-1)
    with pytest.raises(TypeError, match=r"source_data must"):
        qtta_plugins.adapt(qm, None, "eata", source_data=3)
    assert same_state(before, model_state(qm, batch_counts=False))

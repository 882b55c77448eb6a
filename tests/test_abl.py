"""ABL (TTAQ's adaptive balanced loss) inside Tent: the shift, its sign, the statistics, the state."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _state import model_state

import qtta_plugins
from qtta_plugins import ABLConfig, BadBatchError, TentConfig
from qtta_plugins.methods.tent import abl_adjusted_logits, softmax_entropy, tent_parameters

pytest.importorskip("torchao")

ABL = TentConfig(abl=True)


def abl_state(run: qtta_plugins.Adaptation) -> tuple[torch.Tensor, torch.Tensor]:
    return run.method.class_freq.clone(), run.method.grad_mag.clone()


# --- the shift and its sign ----------------------------------------------------------------------
def test_adjusted_logits_shift_by_the_documented_amounts():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 0.5]])
    pi = torch.tensor([0.5, 0.25, 0.25])
    g = torch.tensor([2.0, 1.0, 1.0])  # mean 4/3: g / mean g = (1.5, 0.75, 0.75)
    out = abl_adjusted_logits(logits, pi, g, tau_f=1.0, tau_g=0.5)
    # z~_c = z_c - tau_f log pi_c - tau_g log(g_c / mean g), by hand:
    # class 0: -log 0.5 - 0.5 log 1.5 = 0.693147 - 0.202733; classes 1, 2: -log 0.25 - 0.5 log 0.75
    shift = torch.tensor([0.490415, 1.530135, 1.530135])
    torch.testing.assert_close(out, logits + shift, atol=1e-6, rtol=0)
    # each term alone, and the frequent class (0) is the one pushed down relative to the others
    only_f = abl_adjusted_logits(logits, pi, g, tau_f=2.0, tau_g=0.0) - logits
    torch.testing.assert_close(
        only_f[0], torch.tensor([2 * math.log(2), 2 * math.log(4), 2 * math.log(4)])
    )
    only_g = abl_adjusted_logits(logits, pi, g, tau_f=0.0, tau_g=1.0) - logits
    torch.testing.assert_close(only_g[1], -torch.tensor([1.5, 0.75, 0.75]).log())
    # tau = 0 is Tent's loss exactly; g is used relative to its mean, so its scale does not matter
    assert torch.equal(abl_adjusted_logits(logits, pi, g, 0.0, 0.0), logits)
    torch.testing.assert_close(out, abl_adjusted_logits(logits, pi, 7 * g, 1.0, 0.5))
    # a class with no mass yet gets a large but finite shift (the floor), not an infinite one
    unseen = abl_adjusted_logits(logits, torch.tensor([1.0, 0.0, 0.0]), g, 1.0, 0.0)
    assert torch.isfinite(unseen).all() and (unseen[:, 1] - logits[:, 1] > 10).all()


def test_abl_makes_entropy_minimisation_push_the_frequent_class_less():
    """The sign check: with pi skewed to class 0, the summed push on z_0 falls, the others' rises."""
    torch.manual_seed(0)
    k, n = 10, 50
    labels = torch.cat([torch.zeros(40, dtype=torch.long), torch.randint(1, k, (10,))])
    logits = torch.randn(n, k)
    logits[torch.arange(n), labels] += torch.linspace(0.0, 4.0, n)[torch.randperm(n)]
    pi = torch.full((k,), 0.3 / (k - 1))
    pi[0] = 0.7
    g = torch.ones(k)

    def push(tau_f: float) -> torch.Tensor:
        z = logits.clone().requires_grad_(True)
        softmax_entropy(abl_adjusted_logits(z, pi, g, tau_f, 0.0)).mean().backward()
        return -z.grad.sum(0)  # what one SGD step on the logits adds to each class

    plain, balanced = push(0.0), push(1.0)
    assert plain[0] > 0  # plain Tent feeds the class the batch is full of ...
    assert balanced[0] < 0.5 * plain[0]  # ... ABL much less
    assert balanced[1:].sum() > plain[1:].sum()


# --- abl=False is Tent, bit for bit -------------------------------------------------------------
def test_abl_off_is_plain_tent_bit_for_bit(qcnn, short_stream):
    short_stream = short_stream[:3]  # ABL differs from Tent from the second batch on
    # the reference: Tent's loop as it was before ABL, written out by hand
    qm = copy.deepcopy(qcnn["w4a4"])
    view = qtta_plugins.quant_view(qm)
    torch.manual_seed(0)
    params = tent_parameters(view)
    view.freeze()
    for p in params:
        p.requires_grad_(True)
    view.set_norm_mode("batch")
    opt = torch.optim.SGD(params, lr=1e-2, momentum=0.9)
    expected = []
    for b in short_stream:
        logits = qm(b.x)
        opt.zero_grad()
        softmax_entropy(logits).mean().backward()
        opt.step()
        expected.append(logits.detach().argmax(1))
    expected = torch.cat(expected)

    default = qtta_plugins.adapt(qcnn["w4a4"], short_stream, "tent")
    # abl=False is ABL off
    off = qtta_plugins.adapt(qcnn["w4a4"], short_stream, TentConfig(abl=False))
    # and ABL with both weights at zero is the same loss through the ABL code path
    zero = qtta_plugins.adapt(
        qcnn["w4a4"], short_stream, TentConfig(abl=ABLConfig(tau_f=0.0, tau_g=0.0))
    )
    for run in (default, off, zero):
        assert torch.equal(run.predictions, expected)
    final = model_state(qm)
    assert all(torch.equal(final[k], v) for k, v in model_state(default.model).items())
    assert "abl" not in default.method.state_dict()

    # and ABL on does change the adaptation (so the equalities above are not vacuous)
    on = qtta_plugins.adapt(qcnn["w4a4"], short_stream, ABL)
    assert any(not torch.equal(final[k], v) for k, v in model_state(on.model).items())


# --- the statistics ------------------------------------------------------------------------------
def test_class_frequency_ema_follows_the_predictions(qcnn, digits):
    # clean digits, 70% of them 3s: a stream the model mostly predicts as 3 (a batch of 3s only
    # would not do: its batch statistics wash out what makes a 3, and Tent predicts noise)
    train, _ = digits
    threes, others = train.x[train.y == 3], train.x[train.y != 3]
    batches = [
        torch.cat([threes[28 * i : 28 * (i + 1)], others[12 * i : 12 * (i + 1)]]) for i in range(4)
    ]
    run = qtta_plugins.adapt(qcnn["w4a4"], None, TentConfig(abl=ABLConfig(decay=0.5)))
    k = 10
    pi = torch.full((k,), 1 / k)
    g_before = torch.ones(k)
    for x in batches:
        logits = run.step(x)
        # the EMA of the mean soft prediction of the returned (raw) logits, with weight m on the old
        pi = 0.5 * pi + 0.5 * logits.softmax(1).mean(0)
        torch.testing.assert_close(run.method.class_freq, pi)
        g = run.method.grad_mag
        torch.testing.assert_close(g.mean(), torch.tensor(1.0))  # mean 1, as initialised
        assert not torch.equal(g, g_before) and (g > 0).all()
        g_before = g.clone()
    counts = run.predictions.bincount(minlength=k)
    assert counts.argmax() == 3  # the stream predicts 3 more than anything else ...
    freq = run.method.class_freq
    assert freq.argmax() == 3 and freq[3] > 2 / k, freq  # ... and pi_3 left 1/K far behind
    assert freq.sum().item() == pytest.approx(1.0)


def test_prediction_uses_the_raw_logits(qcnn, short_stream):
    run = qtta_plugins.adapt(qcnn["w4a4"], short_stream[:2], ABL)
    x = short_stream[2].x
    with torch.no_grad():
        plain = run.model(x)  # same parameters, before this batch's update
    # statistics skewed hard towards the class predicted most, so an adjusted prediction would show
    top = plain.argmax(1).bincount(minlength=10).argmax()
    pi = torch.full((10,), 0.1 / 9)
    pi[top] = 0.9
    g = torch.linspace(0.5, 1.5, 10)
    state = run.method.state_dict()
    run.method.load_state_dict({**state, "abl": {"class_freq": pi, "grad_mag": g}})
    adjusted = abl_adjusted_logits(plain, pi, g, ABL.abl.tau_f, ABL.abl.tau_g)
    assert not torch.equal(adjusted.argmax(1), plain.argmax(1))

    params = [p.detach().clone() for p in run.method.adapted_parameters()]
    logits = run.step(x)
    torch.testing.assert_close(logits, plain, atol=1e-6, rtol=0)
    assert torch.equal(logits.argmax(1), plain.argmax(1))
    assert torch.equal(run.predictions[-len(x) :], plain.argmax(1))
    # and the step did adapt, with the statistics moving from where they were put
    assert any(
        not torch.equal(a, b) for a, b in zip(params, run.method.adapted_parameters(), strict=True)
    )
    torch.testing.assert_close(run.method.class_freq, 0.9 * pi + 0.1 * plain.softmax(1).mean(0))


# --- state: save / load, rollback, reset ---------------------------------------------------------
def test_abl_state_saves_loads_and_continues_exactly(qcnn, short_stream, tmp_path):
    short_stream = short_stream[:5]
    half = 3
    run = qtta_plugins.adapt(qcnn["w4a4"], short_stream[:half], ABL)
    saved_pi, saved_g = abl_state(run)
    run.save(tmp_path / "state.pt")
    rest = run.run(short_stream[half:])
    assert not torch.equal(run.method.class_freq, saved_pi)

    fresh = qtta_plugins.adapt(qcnn["w4a4"], None, ABL)
    assert fresh.method.class_freq is None  # K is learnt from the first batch
    fresh.load(tmp_path / "state.pt")
    assert torch.equal(fresh.method.class_freq, saved_pi)
    assert torch.equal(fresh.method.grad_mag, saved_g)
    assert torch.equal(fresh.run(short_stream[half:]), rest)
    assert torch.equal(fresh.method.class_freq, run.method.class_freq)
    assert torch.equal(fresh.method.grad_mag, run.method.grad_mag)

    # a state with ABL does not load into Tent without it (nor the other way), and nothing changes
    plain = qtta_plugins.adapt(qcnn["w4a4"], short_stream[:1], "tent")
    before = model_state(plain.model)
    with pytest.raises(ValueError, match=r"saved with ABL.*TentConfig.abl must match"):
        plain.load(tmp_path / "state.pt")
    assert all(torch.equal(before[k], v) for k, v in model_state(plain.model).items())
    plain.save(tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=r"saved without ABL"):
        fresh.load(tmp_path / "plain.pt")
    assert torch.equal(fresh.method.class_freq, run.method.class_freq)


def test_a_bad_batch_or_a_failing_step_leaves_the_abl_state_as_it_was(qcnn, short_stream):
    run = qtta_plugins.adapt(qcnn["w4a4"], short_stream[:2], ABL)
    pi, g = abl_state(run)
    with pytest.raises(BadBatchError, match=r"NaN"):
        run.step(torch.full((8, 1, 32, 32), float("nan")))
    assert torch.equal(run.method.class_freq, pi) and torch.equal(run.method.grad_mag, g)

    original = run.method.forward_and_adapt

    def explode(x):
        original(x)  # updates the statistics, then fails
        assert not torch.equal(run.method.class_freq, pi)
        raise RuntimeError("boom")

    run.method.forward_and_adapt = explode
    with pytest.raises(RuntimeError, match=r"boom"):
        run.step(short_stream[2].x)
    assert torch.equal(run.method.class_freq, pi) and torch.equal(run.method.grad_mag, g)
    assert run.batches == 2


def test_reset_forgets_the_abl_statistics(qcnn, short_stream):
    run = qtta_plugins.adapt(qcnn["w4a4"], None, ABL)
    first = run.run(short_stream[:3]).clone()
    pi, g = abl_state(run)
    run.reset()
    assert run.method.class_freq is None and run.method.grad_mag is None
    assert torch.equal(run.run(short_stream[:3]), first)
    assert torch.equal(run.method.class_freq, pi) and torch.equal(run.method.grad_mag, g)


# --- configuration -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tau_f": -1.0}, r"TentConfig.abl: ABLConfig.tau_f must be a finite number >= 0"),
        ({"tau_g": float("nan")}, r"TentConfig.abl: ABLConfig.tau_g must be a finite number >= 0"),
        ({"tau_g": "0.5"}, r"TentConfig.abl: ABLConfig.tau_g must be a finite number >= 0"),
        ({"decay": 1.0}, r"TentConfig.abl: ABLConfig.decay must be in \[0, 1\)"),
        ({"decay": -0.1}, r"TentConfig.abl: ABLConfig.decay must be in \[0, 1\)"),
    ],
)
def test_abl_options_are_validated(options, message):
    with pytest.raises(ValueError, match=message):
        TentConfig(abl=options)
    with pytest.raises(ValueError, match=message.replace("TentConfig.abl: ", "")):
        ABLConfig(**options)


def test_an_unknown_abl_field_is_named():
    with pytest.raises(ValueError, match=r"TentConfig.abl: 'momentum' is not a field of ABLConfig"):
        TentConfig(abl={"momentum": 0.5})


def test_abl_takes_a_config_true_a_dict_or_off():
    assert TentConfig().abl is None and TentConfig(abl=False).abl is None
    assert TentConfig(abl=True).abl == ABLConfig() == ABLConfig(1.0, 0.25, 0.9)
    assert TentConfig(abl={"tau_f": 0.5}).abl == ABLConfig(tau_f=0.5)
    assert TentConfig(abl=ABLConfig(decay=0.5)).abl == ABLConfig(decay=0.5)
    with pytest.raises(ValueError, match=r"TentConfig.abl must be an ABLConfig, True"):
        TentConfig(abl="yes")


def test_abl_options_reach_tent_through_adapt(qcnn):
    run = qtta_plugins.adapt(qcnn["w4a4"], None, "tent", abl={"tau_f": 0.5})
    assert run.config.abl == ABLConfig(tau_f=0.5, tau_g=0.25)
    assert run.method.abl is not None and run.method.abl.tau_f == 0.5
    with pytest.raises(ValueError, match=r"ABLConfig.decay"):
        qtta_plugins.adapt(qcnn["w4a4"], None, "tent", abl={"decay": 2})


# --- on a class-imbalanced stream ------------------------------------------------------------------
def prediction_shares(run: qtta_plugins.Adaptation, stream: list) -> dict[str, float]:
    """How the run's predictions spread over the classes, against the stream's labels: ``tv``, the
    total variation between the predicted-class and the label histograms; ``top``, the share of the
    class predicted most; ``majority``, the mean over batches of the share predicted as the batch's
    majority label (``majority_true``: its share of the batch's labels)."""
    labels, predictions = torch.cat([b.y for b in stream]), run.predictions
    k = int(labels.max()) + 1
    hist_y, hist_p = (t.bincount(minlength=k).float() / len(t) for t in (labels, predictions))
    majority, majority_true, start = 0.0, 0.0, 0
    for b in stream:
        c = b.y.bincount(minlength=k).argmax()
        majority += (predictions[start : start + len(b.y)] == c).float().mean().item()
        majority_true += (b.y == c).float().mean().item()
        start += len(b.y)
    return {
        "tv": 0.5 * (hist_y - hist_p).abs().sum().item(),
        "top": hist_p.max().item(),
        "majority": majority / len(stream),
        "majority_true": majority_true / len(stream),
    }


def test_abl_lowers_the_error_where_tent_piles_onto_a_few_classes(qcnn):
    """On a label-Dirichlet stream over the 15 corruptions, Tent piles its predictions onto a few
    classes and ABL, whose ``pi`` tracks exactly those, pulls them back and lowers the error.

    The stream (15 domains of 200 images, batches of 25, delta 0.1: about one class per batch) was
    chosen on the seed-1 and seed-2 streams and confirmed on seeds 0 (this one) and 3; docs/abl.md
    has the table and the command. Measured (1 thread), Tent against ABL, seeds 1 / 2 / 0 / 3:
    error 49.43 / 50.17 / 50.90 / 47.07 against 47.67 / 48.63 / 49.43 / 45.77 % (ABL 1.3-1.8
    points lower); total variation of the predicted-class histogram from the labels' 0.221 / 0.179
    / 0.212 / 0.192 against 0.177 / 0.153 / 0.182 / 0.168 (0.024-0.044 lower); share of the class
    predicted most 0.264 / 0.234 / 0.258 / 0.227 against 0.229 / 0.215 / 0.235 / 0.207 (the labels:
    about 0.10). Under pytest's two threads (conftest) seed 0 gives 51.73 against 49.50 %, tv 0.222
    against 0.179, top 0.266 against 0.233. The bounds below are under every seed's gap. Broken
    variants (seed 0, 1 thread): the shift's sign flipped 53.77 % (tv 0.281); tau_f = 0 (only the
    gradient term) 50.07 % with Tent's own tv (0.212).

    The classes Tent piles onto are its own frequent predictions, not the stream's frequent labels:
    each batch's majority label (about half the batch) gets about a fifth of its predictions from
    Norm, Tent and ABL alike (the batch statistics centre the features on it); docs/abl.md shows
    the same on globally long-tailed streams, where ABL gains nothing.
    """
    from qtta_plugins.data import continual_stream

    stream = list(
        continual_stream(
            "digits",
            severity=5,
            batch_size=25,
            per_domain=200,
            seed=0,
            order="dirichlet",
            dirichlet_delta=0.1,
            progress=False,
        )
    )
    tent = qtta_plugins.adapt(qcnn["w4a4"], stream, "tent")
    abl = qtta_plugins.adapt(qcnn["w4a4"], stream, ABL)
    tent_err, abl_err = tent.errors()["mean"], abl.errors()["mean"]
    t, a = prediction_shares(tent, stream), prediction_shares(abl, stream)
    assert abl_err < tent_err - 1.0, (tent_err, abl_err)
    assert a["tv"] < t["tv"] - 0.015, (t, a)
    assert a["top"] < t["top"], (t, a)
    for shares in (t, a):  # the batch's frequent label is under-predicted, not piled onto
        assert shares["majority"] < 0.6 * shares["majority_true"], shares

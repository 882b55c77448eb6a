"""The collapse guard (``adapt(..., guard=...)``, qtta_plugins/guard.py): the rule, a restart when a
run collapses and none while it is healthy, the state it carries, and bad options refused."""

from __future__ import annotations

import pytest
import torch

import qtta_plugins
from qtta_plugins import GuardConfig
from qtta_plugins.guard import CollapseGuard, as_guard, diversity

# A far too large Tent step on one repeated batch drives every prediction into a few classes
# within a few steps (measured on the shipped digits CNN at W4A4, 32 clean test images, lr=20:
# diversity 0.95 -> 0.69 -> 0.46 -> 0.30 and 32 -> 11 correct). Which step is far too large can
# depend on the model, so the test takes the first of these that collapses it.
COLLAPSE_LRS = (20.0, 50.0)
WINDOW = 64  # two batches of 32


def test_diversity_is_one_for_spread_classes_and_zero_for_one():
    assert diversity(torch.arange(10).repeat(5), 10) == pytest.approx(1.0)
    assert diversity(torch.full((50,), 3), 10) == 0.0
    # two classes out of ten in 50 predictions: log 2 / log 10
    two = torch.tensor([0, 1] * 25)
    assert diversity(two, 10) == pytest.approx(0.30103, abs=1e-4)
    # fewer predictions than classes: measured against log(n), so 5 distinct of 5 is 1
    assert diversity(torch.arange(5), 1000) == pytest.approx(1.0)


def test_the_guard_fires_on_a_drop_from_its_best_and_not_on_a_run_that_never_was_diverse():
    guard = CollapseGuard(GuardConfig(window=20, drop=0.5))
    spread, one = torch.arange(10).repeat(2), torch.zeros(20, dtype=torch.long)
    assert not guard.observe(spread[:10], 10)  # the window is not full yet: no verdict
    assert not guard.observe(spread[10:], 10)
    assert guard.best == pytest.approx(1.0)
    assert not guard.observe(torch.tensor([0, 1] * 5), 10)  # half the window still spread
    assert guard.observe(one, 10) and guard.due  # one class only: below half the best
    guard.restart()
    assert not guard.due and guard.best is None and guard.recent.numel() == 0
    # a run whose predictions were never diverse (a source model at chance on a hard domain)
    # has nothing to fall from: no restart, which could not help it
    never = CollapseGuard(GuardConfig(window=20, drop=0.5))
    for _ in range(5):
        assert not never.observe(torch.tensor([0, 1] * 10), 10)


STEPS = 12


@pytest.fixture(scope="module")
def collapse(qcnn, digits):
    """``(lr, x, y, guarded, plain)``: the first of ``COLLAPSE_LRS`` whose guarded Tent run on one
    repeated batch restarted within ``STEPS`` steps, and the same run without the guard."""
    _, test = digits
    x, y = test.x[:32], test.y[:32]
    for lr in COLLAPSE_LRS:
        guarded = qtta_plugins.adapt(qcnn["w4a4"], None, "tent", lr=lr, guard={"window": WINDOW})
        for _ in range(STEPS):
            guarded.step(x)
        if guarded.guard_restarts:
            break
    else:
        pytest.fail(f"no Tent step in {COLLAPSE_LRS} collapsed the model")
    plain = qtta_plugins.adapt(qcnn["w4a4"], None, "tent", lr=lr)
    for _ in range(STEPS):
        plain.step(x)
    return lr, x, y, guarded, plain


def test_a_collapsing_run_restarts_and_records_it(collapse):
    _, _, y, guarded, plain = collapse
    assert guarded.guard_restarts, "the guard never restarted a collapsing run"
    assert guarded.restarts == guarded.guard_restarts  # no other reset policy here
    # the same run without the guard stays collapsed
    assert not plain.restarts
    preds = guarded.predictions.view(STEPS, -1)
    plain_preds = plain.predictions.view(STEPS, -1)
    assert diversity(plain_preds[-4:].flatten(), 10) < 0.5
    # guarded: each restart puts back the start, so its batch is predicted as the first was
    correct = lambda p: int((p == y).sum())  # noqa: E731
    assert correct(preds[guarded.guard_restarts[0]]) == correct(preds[0])
    assert sum(correct(p) for p in preds) > sum(correct(p) for p in plain_preds)


def test_a_restart_puts_the_model_and_method_back_at_their_start(qcnn, collapse):
    """Replayed up to the first restart, the restarted step's logits are a fresh run's first."""
    lr, x, _, guarded, _ = collapse
    restart_at = guarded.guard_restarts[0]
    replay = qtta_plugins.adapt(qcnn["w4a4"], None, "tent", lr=lr, guard={"window": WINDOW})
    for _ in range(restart_at):
        replay.step(x)
    assert replay.guard.due
    fresh = qtta_plugins.adapt(qcnn["w4a4"], None, "tent", lr=lr)
    assert torch.equal(replay.step(x), fresh.step(x))
    assert replay.guard_restarts == [restart_at] and not replay.guard.due


def test_no_restart_on_a_healthy_run(qcnn, short_stream):
    run = qtta_plugins.adapt(qcnn["w8a8"], short_stream, "tent", guard=True)
    assert run.guard is not None and run.guard_restarts == [] and run.restarts == []
    unguarded = qtta_plugins.adapt(qcnn["w8a8"], short_stream, "tent")
    assert torch.equal(run.predictions, unguarded.predictions)  # the guard only watches


def test_the_guard_state_saves_loads_and_resets(qcnn, collapse, tmp_path):
    lr, x, _, guarded, _ = collapse
    a = qtta_plugins.adapt(qcnn["w4a4"], None, "tent", lr=lr, guard={"window": WINDOW})
    b = qtta_plugins.adapt(qcnn["w4a4"], None, "tent", lr=lr, guard={"window": WINDOW})
    for _ in range(3):
        a.step(x)
    a.save(tmp_path / "a.pt")
    b.load(tmp_path / "a.pt")
    assert b.guard.best == a.guard.best and torch.equal(b.guard.recent, a.guard.recent)
    for _ in range(guarded.guard_restarts[0] + 1 - 3):
        assert torch.equal(a.step(x), b.step(x))
    assert a.guard_restarts == b.guard_restarts == guarded.guard_restarts[:1]
    a.reset()
    assert a.guard_restarts == [] and a.restarts == [] and a.guard.best is None


@pytest.mark.parametrize(
    ("guard", "message"),
    [
        ({"window": 1}, r"GuardConfig.window must be a number of predictions >= 2"),
        ({"drop": 1.0}, r"GuardConfig.drop must be a number in \(0, 1\)"),
        ({"drop": 0}, r"GuardConfig.drop"),
        ({"patience": 3}, r"unknown guard option\(s\) \['patience'\]"),
        ("yes", r"guard must be True, False, None, a dict or a qtta_plugins.GuardConfig"),
    ],
)
def test_a_bad_guard_is_refused_before_anything_changes(qcnn, guard, message):
    before = {k: v.clone() for k, v in qcnn["w4a4"].state_dict().items()}
    with pytest.raises(ValueError, match=message):
        qtta_plugins.adapt(qcnn["w4a4"], None, "tent", guard=guard, inplace=True)
    after = qcnn["w4a4"].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_guard_options_read_as_configs():
    assert as_guard(None) is None and as_guard(False) is None
    assert as_guard(True) == GuardConfig()
    assert as_guard({"window": 32}) == GuardConfig(window=32)
    config = GuardConfig(window=128, drop=0.3)
    assert as_guard(config) is config

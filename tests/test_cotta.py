"""CoTTA (``cotta``): mean teacher, augmentation-averaged pseudo-labels, stochastic restore, ABL,
on every backend, with the state handling the core relies on."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _state import model_state, same_state

import qtta_plugins
from qtta_plugins import ABLConfig, BadBatchError, CoTTAConfig
from qtta_plugins.methods.cotta import CoTTA, augment

pytest.importorskip("torchao")

BACKENDS = ["torchao", "brevitas", "nncf"]
#: two augmented copies instead of four: the mechanism is the same, each copy is a teacher pass
FAST = {"n_augmentations": 2}


def student(run: qtta_plugins.Adaptation) -> list[torch.Tensor]:
    return [p.detach().clone() for p in run.method.student_params]


# --- it adapts, everywhere -----------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_cotta_adapts_on_every_backend(qcnn_on, domain_batches, backend):
    qm = qcnn_on(backend)
    before = model_state(qm, batch_counts=False)
    run = qtta_plugins.adapt(qm, domain_batches[:2], "cotta", confidence_threshold=1.0, **FAST)
    method = run.method
    assert isinstance(method, CoTTA) and method.augmented  # threshold 1: always averaged
    assert run.model is not method.student.model and run.model is not qm
    assert same_state(before, model_state(qm, batch_counts=False))  # the user's model is untouched
    changed = [
        k
        for k, v in model_state(run.model, batch_counts=False).items()
        if not torch.equal(v, before[k])
    ]
    assert changed, "the teacher (run.model) did not move"
    # weights adapt too (params="all"), through the fake quantizers' straight-through gradient
    weights = {layer.name + ".weight" for layer in run.view.layers()}
    assert weights & set(changed) and any(k.endswith(("bn1.weight", "bn1.bias")) for k in changed)
    assert any(not torch.equal(s, t) for s, t in zip(student(run), method.params, strict=True))
    assert len(run.predictions) == 32
    with torch.no_grad():
        assert torch.isfinite(run.model(domain_batches[2])).all()


# --- the defining mechanisms ---------------------------------------------------------------------
def test_the_teacher_is_an_ema_of_the_student(qcnn_on, domain_batches):
    alpha = 0.9  # far from 1, so the EMA's share of the student is well above float rounding
    run = qtta_plugins.adapt(
        qcnn_on("torchao"), None, "cotta", teacher_decay=alpha, restore=False, augment=False
    )
    old = [p.detach().clone() for p in run.method.params]
    run.step(domain_batches[0])
    new_student = student(run)
    assert any(not torch.equal(s, t) for s, t in zip(new_student, old, strict=True))
    for t, t0, s in zip(run.method.params, old, new_student, strict=True):
        torch.testing.assert_close(t, alpha * t0 + (1 - alpha) * s, rtol=1e-5, atol=1e-7)
    # mean_teacher=False: the teacher is the student as of its last step
    run = qtta_plugins.adapt(
        qcnn_on("torchao"), None, "cotta", mean_teacher=False, restore=False, augment=False
    )
    run.step(domain_batches[0])
    assert all(torch.equal(t, s) for t, s in zip(run.method.params, student(run), strict=True))


def test_stochastic_restore_puts_back_about_p_of_the_elements(qcnn_on):
    run = qtta_plugins.adapt(qcnn_on("torchao"), None, "cotta", augment=False)
    method = run.method
    with torch.no_grad():
        for p in method.student_params:
            p.add_(1.0)
    p_restore = 0.1
    method.stochastic_restore(p_restore)
    back = [torch.eq(p, s) for p, s in zip(method.student_params, method.source, strict=True)]
    n = sum(b.numel() for b in back)
    share = sum(int(b.sum()) for b in back) / n
    assert n > 10_000  # weights and norm affines: params="all"
    assert abs(share - p_restore) < 5 * math.sqrt(p_restore * (1 - p_restore) / n), share
    # every restored element took its source value, the others kept theirs
    for p, s, b in zip(method.student_params, method.source, back, strict=True):
        assert torch.equal(p[~b], (s + 1.0)[~b])
    method.stochastic_restore(1.0)
    assert all(torch.equal(p, s) for p, s in zip(method.student_params, method.source, strict=True))


def test_restore_after_a_step_resets_about_p_of_what_moved(qcnn_on, domain_batches):
    """One large Adam step moves almost every element; restore then puts back about p of them
    (the step itself draws no randomness, so the runs with and without restore share it)."""
    options = {"augment": False, "lr": 0.05}
    moved_run = qtta_plugins.adapt(
        qcnn_on("torchao"), [domain_batches[0]], "cotta", restore=False, **options
    )
    run = qtta_plugins.adapt(
        qcnn_on("torchao"), [domain_batches[0]], "cotta", restore_prob=0.2, **options
    )
    source = run.method.source
    moved = [a != s for a, s in zip(moved_run.method.student_params, source, strict=True)]
    restored = [
        m & (b == s) for m, b, s in zip(moved, run.method.student_params, source, strict=True)
    ]
    n = sum(int(m.sum()) for m in moved)
    share = sum(int(r.sum()) for r in restored) / n
    assert n > 0.9 * sum(m.numel() for m in moved)
    assert abs(share - 0.2) < 5 * math.sqrt(0.2 * 0.8 / n), share
    # the elements not restored are where the step took them
    for m, r, a, b in zip(
        moved, restored, moved_run.method.student_params, run.method.student_params, strict=True
    ):
        keep = m & ~r
        assert torch.equal(a[keep], b[keep])


def test_augmentation_averaging_runs_only_below_the_confidence_threshold(qcnn_on, domain_batches):
    x = domain_batches[1]
    run = qtta_plugins.adapt(qcnn_on("torchao"), None, "cotta", **FAST)
    with torch.no_grad():
        confidence = float(run.method.anchor.model(x).softmax(1).amax(1).mean())
    assert 0 < confidence < 1

    def teacher_passes(threshold: float) -> tuple[bool, int, torch.Tensor]:
        run = qtta_plugins.adapt(
            qcnn_on("torchao"), None, "cotta", confidence_threshold=threshold, **FAST
        )
        calls = []
        handle = run.model.register_forward_hook(lambda *_: calls.append(1))
        logits = run.step(x)
        handle.remove()
        return run.method.augmented, len(calls), logits

    above, passes_above, plain = teacher_passes(confidence - 1e-3)
    below, passes_below, averaged = teacher_passes(confidence + 1e-3)
    assert (above, passes_above) == (False, 1)
    assert (below, passes_below) == (True, 1 + FAST["n_augmentations"])
    # the averaged output is the log of a probability average: its softmax sums to one, and it
    # is not the un-augmented prediction
    torch.testing.assert_close(averaged.exp().sum(1), torch.ones(len(x)))
    assert not torch.allclose(averaged.softmax(1), plain.softmax(1))
    # confidence_from="teacher" needs no source copy
    run = qtta_plugins.adapt(qcnn_on("torchao"), None, "cotta", confidence_from="teacher")
    assert run.method.anchor is None


def test_abl_changes_the_loss_and_off_is_cotta_exactly(qcnn_on, domain_batches):
    options = {"augment": False, "seed": 1}
    plain = qtta_plugins.adapt(qcnn_on("torchao"), domain_batches, "cotta", **options)
    neutral = qtta_plugins.adapt(
        qcnn_on("torchao"),
        domain_batches,
        "cotta",
        abl=ABLConfig(tau_f=0.0, tau_g=0.0),
        **options,
    )
    balanced = qtta_plugins.adapt(qcnn_on("torchao"), domain_batches, "cotta", abl=True, **options)
    assert torch.equal(plain.predictions, neutral.predictions)
    assert same_state(
        model_state(plain.model, batch_counts=False), model_state(neutral.model, batch_counts=False)
    )
    assert all(torch.equal(a, b) for a, b in zip(student(plain), student(neutral), strict=True))
    # on the first batch pi is uniform and g is ones (a constant shift): the loss differs from
    # the second batch on
    assert any(
        not torch.equal(a, b) for a, b in zip(student(plain), student(balanced), strict=True)
    )
    freq = balanced.method.class_freq
    assert freq is not None and torch.isclose(freq.sum(), torch.tensor(1.0))
    assert not torch.allclose(freq, torch.full_like(freq, 0.1))
    assert plain.method.class_freq is None


def test_augment_is_seeded_by_its_generator_and_leaves_the_global_rng_alone():
    x = torch.rand(4, 1, 32, 32)
    state = torch.random.get_rng_state()
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    c = augment(x, torch.Generator().manual_seed(1))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, x)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    rgb = (torch.rand(2, 3, 32, 32) - 0.5) * 4  # normalised-looking inputs keep their range
    out = augment(rgb, torch.Generator().manual_seed(0))
    assert out.shape == rgb.shape and out.min() >= rgb.min() and out.max() <= rgb.max()
    with pytest.raises(ValueError, match=r"image batches"):
        augment(torch.rand(4, 10), torch.Generator())


# --- the user's model and the adaptation state are safe ------------------------------------------
def test_a_failing_step_rolls_back_teacher_student_and_state(qcnn_on, domain_batches):
    run = qtta_plugins.adapt(qcnn_on("torchao"), domain_batches[:1], "cotta", abl=True, **FAST)
    teacher, students = model_state(run.model, batch_counts=False), student(run)
    method_state = copy.deepcopy(run.method.state_dict())
    original = run.method.forward_and_adapt

    def explode(x):
        original(x)  # adapts teacher, student, optimizer, ABL and the generator, then fails
        raise RuntimeError("boom")

    run.method.forward_and_adapt = explode
    with pytest.raises(RuntimeError, match=r"boom"):
        run.step(domain_batches[1])
    assert same_state(teacher, model_state(run.model, batch_counts=False))
    assert all(torch.equal(a, b) for a, b in zip(students, student(run), strict=True))
    after = run.method.state_dict()
    assert torch.equal(after["generator"], method_state["generator"])
    assert torch.equal(after["abl"]["class_freq"], method_state["abl"]["class_freq"])
    assert after["optimizer"]["state"][0]["step"] == method_state["optimizer"]["state"][0]["step"]
    with pytest.raises(BadBatchError, match=r"NaN"):
        run.step(torch.full_like(domain_batches[1], float("nan")))
    assert same_state(teacher, model_state(run.model, batch_counts=False))


def test_reset_save_and_load_continue_exactly(qcnn_on, domain_batches, tmp_path):
    options = {"confidence_threshold": 1.0, **FAST}  # augmentations draw from the generator
    run = qtta_plugins.adapt(qcnn_on("torchao"), None, "cotta", **options)
    initial = model_state(run.model, batch_counts=False)
    first = run.run(domain_batches).clone()
    run.reset()
    assert same_state(initial, model_state(run.model, batch_counts=False)) and run.batches == 0
    assert all(torch.equal(s, p) for s, p in zip(student(run), run.method.source, strict=True))
    assert torch.equal(run.run(domain_batches), first)

    run = qtta_plugins.adapt(qcnn_on("torchao"), domain_batches[:2], "cotta", **options)
    run.save(tmp_path / "cotta.pt")
    rest = run.run(domain_batches[2:])
    fresh = qtta_plugins.adapt(qcnn_on("torchao"), None, "cotta", **options)
    fresh.load(tmp_path / "cotta.pt")  # weights_only: the state is tensors and containers
    assert torch.equal(fresh.run(domain_batches[2:]), rest)
    assert same_state(
        model_state(fresh.model, batch_counts=False), model_state(run.model, batch_counts=False)
    )
    assert all(torch.equal(a, b) for a, b in zip(student(fresh), student(run), strict=True))
    # a state saved without ABL does not load into a run with it, and changes nothing
    other = qtta_plugins.adapt(qcnn_on("torchao"), None, "cotta", abl=True, **FAST)
    before = student(other)
    with pytest.raises(ValueError, match=r"saved without ABL"):
        other.load(tmp_path / "cotta.pt")
    assert all(torch.equal(a, b) for a, b in zip(before, student(other), strict=True))


def test_a_malformed_state_is_refused_before_anything_changes(qcnn_on, domain_batches):
    run = qtta_plugins.adapt(qcnn_on("torchao"), domain_batches[:1], "cotta", augment=False)
    good = run.method.state_dict()
    before = student(run)
    bad = {**good, "student": {k: v[..., :1] for k, v in good["student"].items()}}
    with pytest.raises(ValueError, match=r"does not match this model"):
        run.method.load_state_dict(bad)
    with pytest.raises(ValueError, match=r"generator state"):
        run.method.load_state_dict({**good, "generator": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"not a CoTTA state: it lacks \['generator', 'student'\]"):
        run.method.load_state_dict({"optimizer": good["optimizer"]})
    assert all(torch.equal(a, b) for a, b in zip(before, student(run), strict=True))


def test_deterministic_under_a_seed(qcnn_on, domain_batches):
    options = {"confidence_threshold": 1.0, **FAST}
    a = qtta_plugins.adapt(qcnn_on("torchao"), domain_batches[:2], "cotta", seed=3, **options)
    b = qtta_plugins.adapt(qcnn_on("torchao"), domain_batches[:2], "cotta", seed=3, **options)
    assert torch.equal(a.predictions, b.predictions)
    assert same_state(
        model_state(a.model, batch_counts=False), model_state(b.model, batch_counts=False)
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"params": "weights"}, r"CoTTAConfig.params must be 'all' or 'norm'"),
        ({"optimizer": "rmsprop"}, r"CoTTAConfig.optimizer must be 'adam' or 'sgd'"),
        ({"lr": 0.0}, r"CoTTAConfig.lr must be a positive finite"),
        ({"teacher_decay": 1.0}, r"CoTTAConfig.teacher_decay must be in \[0, 1\)"),
        ({"ema_alpha": 1.0}, r"CoTTAConfig.teacher_decay must be in \[0, 1\)"),  # the old name
        ({"n_augmentations": 0}, r"CoTTAConfig.n_augmentations must be an int >= 1"),
        ({"confidence_threshold": 1.5}, r"CoTTAConfig.confidence_threshold must be in \[0, 1\]"),
        ({"confidence_from": "student"}, r"CoTTAConfig.confidence_from must be 'source'"),
        ({"restore_prob": -0.1}, r"CoTTAConfig.restore_prob must be in \[0, 1\]"),
        ({"restore": 1}, r"CoTTAConfig.restore must be True or False"),
        ({"abl": {"tau_f": -1.0}}, r"CoTTAConfig.abl: ABLConfig.tau_f must be a finite number"),
    ],
)
def test_config_validation(qcnn_on, options, message):
    with pytest.raises(ValueError, match=message):
        CoTTAConfig(**options)
    qm = qcnn_on("torchao")
    before = model_state(qm, batch_counts=False)
    with pytest.raises(ValueError, match=message):
        qtta_plugins.adapt(qm, [torch.rand(4, 1, 32, 32)], "cotta", **options)
    assert same_state(before, model_state(qm, batch_counts=False))

"""RoTTA (``rotta``): robust batch norm, the category-balanced memory, timeliness reweighting and
the teacher-student update, on every backend, with the state handling the core relies on."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _state import model_state, same_state
from torch import nn

import qtta_plugins
from qtta_plugins import BadBatchError, RoTTAConfig
from qtta_plugins.methods.rotta import BalancedMemory, RobustBatchNorm, RoTTA, timeliness_weight
from qtta_plugins.view import QuantView, module_norms, set_module_norm_mode

pytest.importorskip("torchao")

BACKENDS = ["torchao", "brevitas", "nncf"]
#: one student step per batch of 16
FAST = {"update_frequency": 16}


def student_state(run: qtta_plugins.Adaptation) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in run.method.state_dict()["student"].items()}


# --- the memory ----------------------------------------------------------------------------------
def test_the_memory_stays_class_balanced_on_an_imbalanced_stream():
    capacity, k = 20, 5
    quota = math.ceil(capacity / k)
    gen = torch.Generator().manual_seed(0)
    # mostly class 0, the others now and then: a correlated, heavily imbalanced stream
    labels = torch.where(
        torch.rand(400, generator=gen) < 0.85, 0, torch.randint(1, k, (400,), generator=gen)
    )
    uncertainty = torch.rand(400, generator=gen).tolist()
    balanced, fifo = BalancedMemory(capacity, k), BalancedMemory(capacity, k, balanced=False)
    worst_fifo = 0
    for c, u in zip(labels.tolist(), uncertainty, strict=True):
        balanced.add(torch.zeros(1), c, u)
        fifo.add(torch.zeros(1), c, u)
        counts = balanced.class_counts()
        assert max(counts) <= quota and len(balanced) <= capacity, counts
        assert len(fifo) <= capacity
        worst_fifo = max(worst_fifo, fifo.class_counts()[0])
    assert sum(c > 0 for c in balanced.class_counts()) == k  # every class kept a place
    assert worst_fifo > 2 * quota  # what the balance prevents: a FIFO fills with class 0


def test_the_memory_evicts_the_oldest_most_uncertain_item_and_ages_everything():
    mem = BalancedMemory(capacity=4, num_classes=2)  # quota 2
    for c, u in [(0, 0.1), (0, 0.9), (1, 0.5), (1, 0.2)]:
        assert mem.add(torch.tensor([u]), c, u)
    assert [i.age for i in mem.items()] == [4, 3, 2, 1]
    # class 0 is at its quota: the new class-0 item displaces the class-0 item of highest score,
    # sigmoid(age / 4) + u / log 2: (age 3, u 0.9) scores 1.98, (age 4, u 0.1) 0.88
    assert mem.score(3, 0.9) > mem.score(4, 0.1) > mem.score(0, 0.0)
    assert mem.add(torch.tensor([0.0]), 0, 0.0)
    assert sorted(i.uncertainty for i in mem.items() if i.cls == 0) == [0.0, 0.1]
    # an item more uncertain than every candidate for eviction is dropped, and time still passes
    ages = [i.age for i in mem.items()]
    assert not mem.add(torch.tensor([9.0]), 1, 9.0)
    assert [i.age for i in mem.items()] == [a + 1 for a in ages] and len(mem) == 4
    # a class under its quota in a full memory takes the place of a majority-class item
    mem = BalancedMemory(capacity=4, num_classes=4)  # quota 1
    mem.add(torch.zeros(1), 0, 0.5)
    assert mem.add(torch.zeros(1), 0, 0.0)  # replaces its own (older, more uncertain) item
    assert mem.class_counts() == [1, 0, 0, 0]


def test_the_memory_state_round_trips_and_is_checked():
    mem = BalancedMemory(8, 3)
    for i in range(12):
        mem.add(torch.full((1, 2, 2), float(i)), i % 3, 0.1 * i)
    state = mem.state_dict()
    again = BalancedMemory(8, 3)
    again.load_state_dict(state)
    assert [(i.cls, i.age, i.uncertainty) for i in again.items()] == [
        (i.cls, i.age, i.uncertainty) for i in mem.items()
    ]
    assert all(torch.equal(a.x, b.x) for a, b in zip(again.items(), mem.items(), strict=True))
    with pytest.raises(ValueError, match=r"same number of items"):
        again.load_state_dict({**state, "age": state["age"][:-1]})
    with pytest.raises(ValueError, match=r"4 classes, this memory 3"):
        again.load_state_dict({**state, "num_classes": 4})
    assert len(again) == len(mem)  # the refused states changed nothing


def test_timeliness_weight_decreases_with_age():
    ages = torch.arange(0, 300)
    w = timeliness_weight(ages, 64)
    assert torch.all(w[1:] < w[:-1])
    assert w[0] == 0.5
    expected = math.exp(-64 / 64) / (1 + math.exp(-64 / 64))  # exp(-a/C) / (1 + exp(-a/C))
    assert math.isclose(float(w[64]), expected, rel_tol=1e-6)


# --- robust batch norm -----------------------------------------------------------------------
class _ModuleView(QuantView):
    """A float model with torch norm modules, seen as a view (for checking RBN against its
    formula)."""

    backend = "test"

    def layers(self):
        return []

    def norms(self):
        return module_norms(self.model.named_modules())

    @property
    def can_backprop(self) -> bool:
        return True

    def _apply_norm_mode(self, mode):
        set_module_norm_mode(self.model, mode)


def test_rbn_normalises_with_the_ema_of_batch_statistics_and_its_gradient():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    model = nn.Sequential(conv, bn)
    reference = copy.deepcopy(model)
    view = _ModuleView(model)
    rbn = RobustBatchNorm(view, 0.05)
    assert view.norm_mode == "source" and len(rbn.norms) == 1
    x = torch.randn(8, 3, 5, 5)

    # predicting: the global statistics as they are
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference.eval()(x))
    assert torch.equal(bn.running_mean, reference[1].running_mean)

    # updating: the statistics move by the EMA, and the norm uses the moved ones
    rbn.updating = True
    out = model(x)
    h = reference[0](x)
    batch_var, batch_mean = torch.var_mean(h, dim=(0, 2, 3), unbiased=False)
    mean = 0.95 * reference[1].running_mean + 0.05 * batch_mean
    var = 0.95 * reference[1].running_var + 0.05 * batch_var
    r = reference[1]
    expected = (h - mean[:, None, None]) / (var[:, None, None] + r.eps).sqrt() * r.weight[
        :, None, None
    ] + r.bias[:, None, None]
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(bn.running_mean, mean.detach())
    torch.testing.assert_close(bn.running_var, var.detach())
    # the gradient reaches the batch statistics with weight alpha, as RBN's does
    probe = torch.randn_like(out)
    (out * probe).sum().backward()
    (expected * probe).sum().backward()
    torch.testing.assert_close(conv.weight.grad, reference[0].weight.grad)
    torch.testing.assert_close(bn.weight.grad, reference[1].weight.grad)
    # a copy of the view does not carry the hooks; removing them leaves the statistics
    assert not any(m._forward_pre_hooks for m in view.copy().model.modules())
    rbn.remove()
    assert not bn._forward_pre_hooks and torch.equal(bn.running_mean, mean.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_rbn_statistics_follow_the_ema_on_every_backend(qcnn_on, domain_batches, backend):
    run = qtta_plugins.adapt(qcnn_on(backend), None, "rotta", update_frequency=1000)
    rbn = run.method.rbn
    assert rbn is not None and len(rbn.norms) == 9 and run.view.norm_mode == "source"
    norm = rbn.norms[1]
    old = (norm.running_mean.clone(), norm.running_var.clone())
    run.step(domain_batches[0])  # predicting only (no update due): the statistics stay
    assert torch.equal(norm.running_mean, old[0]) and torch.equal(norm.running_var, old[1])
    seen = []
    tap = run.view.norm_input_module(norm).register_forward_pre_hook(
        lambda _, args: seen.append(args[0].detach().clone())
    )
    rbn.updating = True
    with torch.no_grad():
        run.model(domain_batches[1])
    rbn.updating = False
    tap.remove()
    batch_var, batch_mean = torch.var_mean(seen[0], dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(norm.running_mean, 0.95 * old[0] + 0.05 * batch_mean)
    torch.testing.assert_close(norm.running_var, 0.95 * old[1] + 0.05 * batch_var)


# --- it adapts, everywhere -----------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_rotta_adapts_on_every_backend(qcnn_on, domain_batches, backend):
    qm = qcnn_on(backend)
    before = model_state(qm, batch_counts=False)
    run = qtta_plugins.adapt(qm, domain_batches[:2], "rotta", **FAST)
    method = run.method
    assert isinstance(method, RoTTA) and method.updates == 2 and method.seen == 32
    assert same_state(before, model_state(qm, batch_counts=False))  # the user's model is untouched
    after = model_state(run.model, batch_counts=False)
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert any(k.endswith("running_mean") for k in changed), "RBN statistics did not move"
    assert any(k.endswith(("bn1.weight", "bn1.bias")) for k in changed), "affines did not move"
    assert len(method.memory) <= 64 and max(method.memory.class_counts()) <= math.ceil(64 / 10)
    assert len(run.predictions) == 32
    with torch.no_grad():
        assert torch.isfinite(run.model(domain_batches[2])).all()


def test_refuses_a_model_that_cannot_backpropagate():
    """An integer-weight model (torchao ``quantize_`` with a weight tensor subclass; the converted
    pt2e graph is refused alike, tests/test_cotta.py)."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    model = nn.Sequential(nn.Flatten(), nn.Linear(1024, 32), nn.LayerNorm(32), nn.Linear(32, 10))
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    assert not qtta_plugins.quant_view(model).can_backprop
    with pytest.raises(ValueError, match=r"'rotta' needs gradients.*cannot backpropagate"):
        qtta_plugins.adapt(model, [torch.rand(4, 1, 32, 32)], "rotta")


def test_the_student_steps_at_the_update_frequency_and_the_teacher_follows(qcnn_on, domain_batches):
    run = qtta_plugins.adapt(
        qcnn_on("torchao"), None, "rotta", update_frequency=24, teacher_decay=0.5
    )
    teacher0 = [p.detach().clone() for p in run.method.params]
    run.step(domain_batches[0])  # 16 samples: no step yet
    assert run.method.updates == 0 and len(run.method.memory) > 0
    assert all(torch.equal(a, b) for a, b in zip(teacher0, run.method.params, strict=True))
    run.step(domain_batches[1])  # the 24th sample: one step
    assert run.method.updates == 1 and run.method.seen == 32
    student = run.method.student_params
    for t, t0, s in zip(run.method.params, teacher0, student, strict=True):
        torch.testing.assert_close(t, 0.5 * t0 + 0.5 * s)
    assert any(not torch.equal(a, b) for a, b in zip(teacher0, student, strict=True))


@pytest.mark.parametrize(
    ("off", "check"),
    [
        ({"rbn": False}, lambda r: r.method.rbn is None and r.view.norm_mode == "batch"),
        ({"balanced_memory": False}, lambda r: not r.method.memory.balanced),
        (
            {"mean_teacher": False},
            lambda r: all(
                torch.equal(t, s)
                for t, s in zip(r.method.params, r.method.student_params, strict=True)
            ),
        ),
    ],
)
def test_each_part_switches_off(qcnn_on, domain_batches, off, check):
    run = qtta_plugins.adapt(qcnn_on("torchao"), domain_batches[:1], "rotta", **FAST, **off)
    assert check(run)
    default = qtta_plugins.adapt(qcnn_on("torchao"), domain_batches[:1], "rotta", **FAST)
    assert not check(default)


@pytest.mark.parametrize("off", ["timeliness", "strong_augment"])
def test_the_loss_parts_switch_off(qcnn_on, domain_batches, off):
    default = qtta_plugins.adapt(qcnn_on("torchao"), domain_batches[:1], "rotta", **FAST)
    without = qtta_plugins.adapt(
        qcnn_on("torchao"), domain_batches[:1], "rotta", **FAST, **{off: False}
    )
    a, b = student_state(default), student_state(without)
    assert any(not torch.equal(a[k], b[k]) for k in a)


# --- the user's model and the adaptation state are safe ------------------------------------------
def test_a_failing_step_rolls_back_teacher_student_memory_and_statistics(qcnn_on, domain_batches):
    run = qtta_plugins.adapt(qcnn_on("torchao"), domain_batches[:1], "rotta", **FAST)
    teacher, student = model_state(run.model, batch_counts=False), student_state(run)
    memory = run.method.memory.state_dict()
    original = run.method.forward_and_adapt

    def explode(x):
        original(x)  # fills the memory, steps the student, moves the teacher, then fails
        raise RuntimeError("boom")

    run.method.forward_and_adapt = explode
    with pytest.raises(RuntimeError, match=r"boom"):
        run.step(domain_batches[1])
    assert same_state(
        teacher, model_state(run.model, batch_counts=False)
    )  # affines and RBN statistics
    assert same_state(student, student_state(run))
    assert run.method.seen == 16 and run.method.updates == 1
    after = run.method.memory.state_dict()
    assert torch.equal(after["x"], memory["x"]) and torch.equal(after["age"], memory["age"])
    with pytest.raises(BadBatchError, match=r"NaN"):
        run.step(torch.full_like(domain_batches[1], float("nan")))
    assert same_state(teacher, model_state(run.model, batch_counts=False))


def test_reset_save_and_load_continue_exactly(qcnn_on, domain_batches, tmp_path):
    run = qtta_plugins.adapt(qcnn_on("torchao"), None, "rotta", **FAST)
    initial, student0 = model_state(run.model, batch_counts=False), student_state(run)
    first = run.run(domain_batches).clone()
    run.reset()
    assert same_state(initial, model_state(run.model, batch_counts=False)) and same_state(
        student0, student_state(run)
    )
    assert run.method.memory is None and run.method.seen == 0
    assert torch.equal(run.run(domain_batches), first)

    run = qtta_plugins.adapt(qcnn_on("torchao"), domain_batches[:2], "rotta", **FAST)
    run.save(tmp_path / "rotta.pt")
    rest = run.run(domain_batches[2:])
    fresh = qtta_plugins.adapt(qcnn_on("torchao"), None, "rotta", **FAST)
    fresh.load(tmp_path / "rotta.pt")  # weights_only: the memory is tensors too
    assert torch.equal(fresh.run(domain_batches[2:]), rest)
    assert same_state(
        model_state(fresh.model, batch_counts=False), model_state(run.model, batch_counts=False)
    )
    assert same_state(student_state(fresh), student_state(run))
    # a malformed state is refused before anything changes
    good = fresh.method.state_dict()
    before = student_state(fresh)
    with pytest.raises(ValueError, match=r"same number of items"):
        fresh.method.load_state_dict(
            {**good, "memory": {**good["memory"], "cls": good["memory"]["cls"][:1]}}
        )
    with pytest.raises(ValueError, match=r"a RoTTA state is a dict"):
        fresh.method.load_state_dict({"memory": None})
    assert same_state(before, student_state(fresh))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rbn_decay": 1.0}, r"RoTTAConfig.rbn_decay must be in \[0, 1\)"),
        ({"rbn_momentum": 0.0}, r"RoTTAConfig.rbn_decay must be in \[0, 1\)"),  # the old name
        ({"memory_capacity": 0}, r"RoTTAConfig.memory_capacity must be an int >= 1"),
        ({"update_frequency": 2.5}, r"RoTTAConfig.update_frequency must be an int >= 1"),
        ({"teacher_decay": -1.0}, r"RoTTAConfig.teacher_decay must be in \[0, 1\]"),
        ({"ema_nu": 2.0}, r"RoTTAConfig.teacher_decay must be in \[0, 1\]"),  # the old name
        ({"lambda_u": -1.0}, r"RoTTAConfig.lambda_u must be a finite number >= 0"),
        ({"optimizer": "lbfgs"}, r"RoTTAConfig.optimizer must be 'adam' or 'sgd'"),
        ({"rbn": "yes"}, r"RoTTAConfig.rbn must be True or False"),
    ],
)
def test_config_validation(qcnn_on, options, message):
    with pytest.raises(ValueError, match=message):
        RoTTAConfig(**options)
    qm = qcnn_on("torchao")
    before = model_state(qm, batch_counts=False)
    with pytest.raises(ValueError, match=message):
        qtta_plugins.adapt(qm, [torch.rand(4, 1, 32, 32)], "rotta", **options)
    assert same_state(before, model_state(qm, batch_counts=False))

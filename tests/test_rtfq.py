"""RTF-Q's subnet bank: switching, costs, the training plan, selection and materialization."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import qtta_plugins
from qtta_plugins.methods.rtfq import (
    RTFQConfig,
    Subnet,
    SubnetBank,
    choose,
    information_maximisation,
    plan,
    train_bank,
)
from qtta_plugins.models import accuracy

SMALL = {"widths": (0.5, 1.0), "resolutions": (24, 32), "bits": (8, 4), "recalib_images": 128}


@pytest.fixture(scope="module")
def bank(float_cnn, digits):
    train, test = digits
    bank = SubnetBank(float_cnn, train.x[:128], RTFQConfig(train_steps=2, progress=False, **SMALL))
    train_bank(bank, (train.x[:256], train.y[:256]), train.x[256:512])
    bank.evaluate(test.x[:200], test.y[:200])
    return bank


def test_config_validation_and_the_subnet_grid() -> None:
    assert len(RTFQConfig().subnets()) == 27
    for bad, match in (
        ({"widths": (0.0, 1.0)}, "widths"),
        ({"bits": (1,)}, "bits"),
        ({"train_steps": 0}, "train_steps"),
        ({"n_random": -1}, "n_random"),
        ({"lr": float("nan")}, "lr"),
        ({"distill_warmup": 1.5}, "distill_warmup"),
        ({"largest_first": 1.0}, "largest_first"),
    ):
        with pytest.raises(ValueError, match=match):
            RTFQConfig(**bad)


def test_full_float_subnet_is_the_pretrained_model(float_cnn, digits) -> None:
    _, test = digits
    bank = SubnetBank(float_cnn, test.x[:64], RTFQConfig(**SMALL))
    bank.set_subnet(None)
    with torch.no_grad():
        assert torch.allclose(bank(test.x[:32]), float_cnn(test.x[:32]), atol=1e-5)


def test_sandwich_and_multi_bit_plans() -> None:
    cfg = RTFQConfig(n_random=2, **SMALL)
    for seed in range(5):
        steps = plan(cfg, random.Random(seed))
        subnets = [s for s, _ in steps]
        assert len(set(subnets)) == len(subnets)  # each subnet once per step
        assert steps[0] == (Subnet(1.0, 32, 8), True)  # largest at the highest precision: teacher
        assert steps[1] == (Subnet(0.5, 24, 4), False)  # smallest at the lowest
        # multi-bit: a random architecture is trained at every bit-width
        archs = {(s.width, s.resolution) for s in subnets[2:]}
        for w, r in archs:
            assert {s.bits for s in subnets if (s.width, s.resolution) == (w, r)} == {4, 8}
        single = plan(RTFQConfig(n_random=2, multi_bit=False, **SMALL), random.Random(seed))
        assert 2 < len(single) <= 4
        flat = plan(RTFQConfig(n_random=2, sandwich=False, **SMALL), random.Random(seed))
        assert not any(t for _, t in flat) and len(flat) <= 8
    one = RTFQConfig(widths=(0.5,), resolutions=(24,), bits=(4,), n_random=0)
    assert plan(one, random.Random(0)) == [(Subnet(0.5, 24, 4), True)]


def test_information_maximisation() -> None:
    confident_diverse = torch.eye(4) * 20
    collapsed = torch.zeros(4, 4)
    collapsed[:, 0] = 20
    assert information_maximisation(confident_diverse) < information_maximisation(collapsed)
    assert information_maximisation(confident_diverse).item() == pytest.approx(
        -torch.log(torch.tensor(4.0)).item(), abs=1e-3
    )


def test_layers_reading_one_tensor_share_step_sizes(bank) -> None:
    # a block's first conv and its shortcut conv read the same tensor: quantized once
    shared = bank.layers["layer2.conv1"].act_scale
    assert bank.layers["layer2.shortcut.0"].act_scale is shared
    assert bank.layers["layer2.conv2"].act_scale is not shared
    # two blocks have a shortcut conv; SMALL has 2 bit-widths
    steps = {id(p) for layer in bank.layers.values() for p in layer.act_scale.values()}
    assert len(steps) == (len(bank.layers) - 2) * 2


def test_costs_follow_width_resolution_and_bits(bank) -> None:
    rows = {r["subnet"]: r for r in bank.table()}
    full, narrow = rows[Subnet(1.0, 32, 8)], rows[Subnet(0.5, 32, 8)]
    small = rows[Subnet(1.0, 24, 8)]
    # convs cost ~width^2 (in and out channels halve) and ~resolution^2
    assert 0.2 < narrow["macs"] / full["macs"] < 0.35
    assert small["macs"] / full["macs"] == pytest.approx((24 / 32) ** 2, rel=0.1)
    low = rows[Subnet(1.0, 32, 4)]
    assert low["macs"] == full["macs"] and low["bitops"] < full["bitops"] / 2
    assert low["bytes"] < full["bytes"]
    # BitOPs of the 8-bit subnet: every layer at 8 x 8 bits
    assert full["bitops"] == pytest.approx(full["macs"] * 64, rel=1e-6)


def test_choose_takes_the_most_accurate_within_budget_and_breaks_ties_on_bitops() -> None:
    def row(name: str, macs: float, bitops: float, nbytes: float, acc: float) -> dict:
        return {"name": name, "macs": macs, "bitops": bitops, "bytes": nbytes, "accuracy": acc}

    best = row("best", 10, 640, 8, 95.0)  # the most accurate, and the most expensive
    heavy = row("heavy", 5, 320, 4, 90.0)  # tied on accuracy with `light`, more BitOPs
    light = row("light", 5, 160, 2, 90.0)
    tiny = row("tiny", 2, 64, 1, 70.0)
    for rows in ([best, heavy, light, tiny], [tiny, light, heavy, best]):  # order does not matter
        assert choose(rows, {"macs": 100})["name"] == "best"
        assert choose(rows, {"macs": 9.9})["name"] == "light"  # tie: the cheaper in BitOPs
        assert choose(rows, {"macs": 5})["name"] == "light"  # the budget is inclusive
        assert choose(rows, {"bitops": 320})["name"] == "light"
        assert choose(rows, {"bitops": 200, "bytes": 1.5})["name"] == "tiny"  # every key binds
        assert choose(rows, {"macs": 9.9, "bytes": 3})["name"] == "light"
        assert choose(rows, {"macs": 4})["name"] == "tiny"
    with pytest.raises(ValueError, match="smallest feasible budget is macs >= 2"):
        choose([best, heavy, light, tiny], {"macs": 1})


def test_select_subnet_returns_the_chosen_subnet_as_a_backend_model(bank, digits) -> None:
    _, test = digits
    rows = bank.table()
    # a budget that admits the half-width subnets only (MACs ~ width^2): four rows to choose from
    budget = {"macs": max(r["macs"] for r in rows if r["subnet"].width == 0.5)}
    feasible = [r for r in rows if r["macs"] <= budget["macs"]]
    assert {r["subnet"].width for r in feasible} == {0.5} and len(feasible) == 4
    expected = choose(rows, budget)
    assert expected["accuracy"] == max(r["accuracy"] for r in feasible)
    model = qtta_plugins.select_subnet(bank, **budget)
    choice = model.qtta_subnet
    assert choice.row is expected and choice.backend == "torchao" and choice.budget == budget
    assert qtta_plugins.quant_view(model).backend == "torchao"
    # the model is that subnet: it scores what the bank's table says (on the same images)
    x, y = test.x[:200], test.y[:200]
    assert abs(accuracy(model, x, y) - expected["accuracy"]) <= 1.0
    cheapest = min(r["macs"] for r in rows)
    with pytest.raises(ValueError, match="smallest feasible budget is macs >= "):
        qtta_plugins.select_subnet(bank, macs=cheapest / 2)
    with pytest.raises(ValueError, match="unknown budget keys"):
        qtta_plugins.select_subnet(bank, flops=1e9)


@pytest.mark.parametrize("subnet", [Subnet(1.0, 32, 8), Subnet(0.5, 24, 4)])
def test_torchao_subnet_reproduces_the_bank(bank, digits, subnet) -> None:
    pytest.importorskip("torchao")
    _, test = digits
    x, y = test.x[:200], test.y[:200]
    bank.set_subnet(subnet)
    expected = accuracy(bank, x, y)
    model = bank.materialize(subnet, "torchao")
    assert qtta_plugins.quant_view(model).backend == "torchao"
    assert abs(accuracy(model, x, y) - expected) <= 1.0


@pytest.mark.parametrize("backend", ["brevitas", "nncf"])
def test_other_backends_reproduce_the_bank(bank, digits, backend) -> None:
    """Brevitas computes exactly what the bank does once the bank's grids are written (its own
    4-bit weight thresholds are MSE-chosen, the bank's max-abs). NNCF also quantizes batch-norm
    outputs, which are switched off, and its shared input quantizers feed the residual shortcut
    too, which the bank does not quantize: close, not exact."""
    pytest.importorskip(backend)
    _, test = digits
    x = test.x[:200]
    subnet = Subnet(0.5, 32, 4)
    bank.set_subnet(subnet)
    with torch.no_grad():
        ref = bank(x)
        out = bank.materialize(subnet, backend)(x)
    gap = float((out - ref).norm() / ref.norm())
    assert gap < (1e-4 if backend == "brevitas" else 0.35), gap


# NNCF's own export (strip) is 8-bit only; torchao's convert and Brevitas' QCDQ ONNX take 4 bits.
@pytest.mark.parametrize("backend, bits", [("torchao", 4), ("brevitas", 4), ("nncf", 8)])
def test_selected_subnet_exports_the_backends_way(bank, digits, backend, bits, export_logits):
    """A materialized subnet (24 px: a resize in front of the network) goes through the backend's
    own export and predicts what the materialized model does."""
    pytest.importorskip(backend)
    _, test = digits
    x = test.x[:200]
    model = bank.materialize(Subnet(0.5, 24, bits), backend)
    with torch.no_grad():
        logits = model(x)
    exported = export_logits(backend, model, x)
    assert float((exported.argmax(1) == logits.argmax(1)).float().mean()) >= 0.98
    assert float((exported - logits).abs().max()) < 0.05 * float(logits.abs().max())


class _Always(torch.nn.Module):
    """A teacher that puts all its probability on one class, whatever the image."""

    def __init__(self, label: int) -> None:
        super().__init__()
        self.label = label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.full((len(x), 10), -20.0)
        logits[:, self.label] = 20.0
        return logits


def test_a_fixed_teacher_distils_every_subnet_towards_it(float_cnn, digits) -> None:
    """The distilled separate baseline: a one-subnet bank trained towards a fixed teacher. A
    teacher that always says class 3 pulls the subnet's target predictions to 3; without it (the
    same seed and batches) the subnet keeps the source's classes."""
    train, test = digits
    one = {"widths": (0.5,), "resolutions": (24,), "bits": (4,), "recalib_images": 128}
    source, target = (train.x[:256], train.y[:256]), train.x[256:512]
    share = {}
    for name, teacher in (("alone", None), ("distilled", _Always(3))):
        cfg = RTFQConfig(
            train_steps=20, progress=False, distill_weight=20.0, distill_warmup=0.0, **one
        )
        bank = SubnetBank(float_cnn, target[:128], cfg)
        if teacher is not None:
            teacher.train()
        train_bank(bank, source, target, teacher=teacher)
        if teacher is not None:
            assert teacher.training  # its mode is left as it was
        bank.recalibrate(Subnet(0.5, 24, 4))
        with torch.no_grad():
            share[name] = float((bank(test.x[:200]).argmax(1) == 3).float().mean())
    assert share["distilled"] > share["alone"] + 0.3, share


def test_largest_first_trains_only_the_largest_subnet_at_the_top_bits(float_cnn, digits) -> None:
    """During the largest-first steps no lower bit-width runs, so its step sizes stay where the
    bank set them; the highest bit-width's move. With the SandwichQ plan from the first step the
    W4 step sizes move too."""
    train, _ = digits
    source, target = (train.x[:256], train.y[:256]), train.x[256:512]
    moved = {}
    for first in (0.0, 0.9):  # 3 steps: round(0.9 * 3) = 3 largest-first steps, none after
        cfg = RTFQConfig(train_steps=3, progress=False, largest_first=first, **SMALL)
        bank = SubnetBank(float_cnn, target[:128], cfg)
        layer = next(iter(bank.layers.values()))
        before = {k: v.detach().clone() for k, v in layer.act_scale.items()}
        train_bank(bank, source, target)
        moved[first] = {k: not torch.equal(before[k], v) for k, v in layer.act_scale.items()}
    assert moved[0.9] == {"8": True, "4": False}, moved
    assert moved[0.0] == {"8": True, "4": True}, moved


def test_a_teacher_needs_distillation_and_a_module(float_cnn, digits) -> None:
    train, _ = digits
    bank = SubnetBank(float_cnn, train.x[:128], RTFQConfig(train_steps=1, progress=False, **SMALL))
    before = {k: v.clone() for k, v in bank.state_dict().items()}
    source, target = (train.x[:128], train.y[:128]), train.x[128:256]
    with pytest.raises(ValueError, match="distill=True"):
        train_bank(bank, source, target, RTFQConfig(distill=False, **SMALL), teacher=float_cnn)
    with pytest.raises(TypeError, match="teacher must be a torch"):
        train_bank(bank, source, target, teacher=lambda x: x)  # type: ignore[arg-type]
    assert all(torch.equal(before[k], v) for k, v in bank.state_dict().items())


# ~9 s (a second process): under -m slow (issue 36: the suite's time)
@pytest.mark.slow
def test_two_process_training_matches_one_process(float_cnn, digits, tmp_path) -> None:
    """``torchrun --nproc_per_node=2`` (gloo): both ranks end with the same weights, and their
    update points where the single-process one does (each rank normalises its half batch with
    its own batch statistics: the noise)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    train, _ = digits
    config = {"train_steps": 4, "progress": False, "lr": 1e-3, **SMALL}
    source, target = (train.x[:256], train.y[:256]), train.x[256:512]
    torch.save(
        {"model": float_cnn.state_dict(), "source": source, "target": target, "config": config},
        tmp_path / "inputs.pt",
    )
    worker = Path(__file__).with_name("rtfq_ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(
        [*cmd, str(worker), str(tmp_path)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])

    single = SubnetBank(float_cnn, target[:128], RTFQConfig(**config))
    start = {k: v.clone() for k, v in single.state_dict().items()}
    train_bank(single, source, target)
    keys = [k for k in start if k.startswith("net.") and k.endswith("weight")]
    one = torch.cat([(single.state_dict()[k] - start[k]).flatten() for k in keys])
    two = torch.cat([(ranks[0][k] - start[k]).flatten() for k in keys])
    assert one.norm() > 0 and two.norm() > 0
    assert float(F.cosine_similarity(one, two, dim=0)) > 0.8


@pytest.mark.slow
def test_multi_bit_bank_adapts_every_subnet() -> None:
    """MNIST -> digits, 100 steps of the default plan (SandwichQ + multi-bit + distillation): the
    full W8A8 subnet and the smallest W4A4 one both adapt (source only: ~10%). Summing the seven
    students' losses instead of averaging them left every subnet at ~55% (issue 6)."""
    from qtta_plugins.data import load_source
    from qtta_plugins.models import train_source_model

    source, _ = load_source("mnist", seed=0)
    target, test = load_source("digits", seed=0)
    model = train_source_model("bncnn", "mnist", epochs=8, seed=0, progress=False)
    bank = SubnetBank(model, target.x, RTFQConfig(train_steps=100, progress=False))
    train_bank(bank, (source.x, source.y), target.x)
    for subnet in (Subnet(1.0, 32, 8), Subnet(0.5, 24, 4)):
        bank.recalibrate(subnet)
        assert accuracy(bank, test.x, test.y) > 70, subnet.name

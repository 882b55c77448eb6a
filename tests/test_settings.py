"""Stream settings (``qtta_plugins.data.make_stream``) and the core's reset policy (reset at each
domain, periodic reset) with the ``qtta demo`` / benchmark flags that choose them."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

import qtta_plugins
from qtta_plugins import data
from qtta_plugins.app import cli
from qtta_plugins.data import Batch

pytest.importorskip("torchao")

N_TEST = 40
SMALL = {"corruptions": ["fog", "contrast"], "n_test": N_TEST, "per_domain": 20, "batch_size": 10}


def stream(setting: str, **kw: object) -> data.ContinualStream:
    return data.make_stream(setting, progress=False, **{**SMALL, **kw})


def same_batches(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(p.x, q.x)
        and torch.equal(p.y, q.y)
        and (p.domain, p.round) == (q.domain, q.round)
        for p, q in zip(a, b, strict=True)
    )


def majority(batches: list[Batch], size: int) -> float:
    full = [b for b in batches if len(b.y) == size]
    return float(np.mean([torch.bincount(b.y).max().item() / len(b.y) for b in full]))


# ---------------------------------------------------------------------------- the settings


def test_the_settings_by_name():
    assert data.SETTINGS == ("continual", "reset", "gradual", "mixed", "dirichlet", "long")
    assert data.GRADUAL_SEVERITIES == (1, 2, 3, 4, 5, 4, 3, 2, 1)


def test_continual_is_continual_stream_and_reset_the_same_batches_with_the_flag():
    continual, reset = stream("continual"), stream("reset")
    plain = data.continual_stream(progress=False, **SMALL)
    assert same_batches(list(continual), list(plain))
    assert same_batches(list(reset), list(plain))
    assert not continual.reset_on_shift and not plain.reset_on_shift and reset.reset_on_shift
    assert [b.domain for b in continual] == ["fog"] * 2 + ["contrast"] * 2
    assert all(b.sample_domains is None for b in continual)
    assert "reset_on_shift=True" in repr(reset)


def test_the_clean_domain_is_the_uncorrupted_test_images_in_stream_order():
    batches = list(stream("continual", corruptions=["clean", "fog"]))
    fog = list(stream("continual"))[:2]
    assert [b.domain for b in batches] == ["clean"] * 2 + ["fog"] * 2
    # the same images and order as a corrupted domain, without the corruption
    assert all(torch.equal(c.y, f.y) for c, f in zip(batches[:2], fog, strict=True))
    assert not any(torch.equal(c.x, f.x) for c, f in zip(batches[:2], fog, strict=True))
    test = data.load_source("digits", n_test=N_TEST)[1]
    clean = torch.cat([b.x for b in batches[:2]])
    assert all(any(torch.equal(img, t) for t in test.x) for img in clean)
    with pytest.raises(ValueError, match="unknown corruption 'clear'"):
        stream("continual", corruptions=["clear"])


def test_gradual_walks_severity_one_to_five_and_back_for_each_corruption():
    gradual = stream("gradual")
    ladder = [f"{c}-{s}" for c in ("fog", "contrast") for s in (1, 2, 3, 4, 5, 4, 3, 2, 1)]
    assert gradual.domains == ladder
    batches = list(gradual)
    assert [b.domain for b in batches] == [d for d in ladder for _ in range(2)]
    assert len(gradual) == len(batches) == 2 * 9 * 2
    # each domain holds its corruption at the severity its name says
    for severity in (1, 3, 5):
        at = stream("continual", severity=severity)
        i = gradual.domains.index(f"contrast-{severity}")
        assert torch.equal(gradual.sets[i].x, at.sets[1].x)
    assert not torch.equal(gradual.sets[0].x, gradual.sets[4].x)  # severity 1 is not 5
    # going down, the same images as going up, in another order
    up, down = gradual.permutation(0, 0), gradual.permutation(0, 8)
    assert torch.equal(gradual.sets[0].x, gradual.sets[8].x) and not np.array_equal(up, down)


def test_mixed_batches_draw_from_several_domains_and_cover_each_once():
    mixed, continual = stream("mixed"), stream("continual")
    batches = list(mixed)
    assert len(mixed) == len(batches) == math.ceil(2 * 20 / 10)
    assert all(b.domain == data.MIXED and len(b.sample_domains) == len(b.y) for b in batches)
    assert sum(len(set(b.sample_domains)) > 1 for b in batches) >= len(batches) - 1
    # every sample of every domain exactly once per round: labels and images per domain
    for d, name in enumerate(mixed.domains):
        xs = torch.cat([b.x[[s == name for s in b.sample_domains]] for b in batches])
        ys = torch.cat([b.y[[s == name for s in b.sample_domains]] for b in batches])
        assert Counter(ys.tolist()) == Counter(continual.sets[d].y.tolist())
        expected = sorted(continual.sets[d].x.flatten(1).sum(1).tolist())
        assert sorted(xs.flatten(1).sum(1).tolist()) == pytest.approx(expected)
    assert same_batches(batches, list(mixed))  # deterministic
    two = list(stream("mixed", rounds=2))
    assert [b.round for b in two] == [0] * 4 + [1] * 4
    assert not torch.equal(two[0].y, two[4].y)


def test_dirichlet_labels_are_correlated_in_time_and_iid_are_not():
    kw = {"corruptions": ["contrast"], "n_test": 200, "per_domain": None, "batch_size": 10}
    dirichlet, iid = stream("dirichlet", **kw), stream("continual", **kw)
    assert dirichlet.order == "dirichlet" and iid.order == "iid"
    assert majority(list(dirichlet), 10) > majority(list(iid), 10) + 0.25
    assert sorted(dirichlet.permutation(0, 0).tolist()) == list(range(200))  # same samples
    with pytest.raises(ValueError, match="dirichlet setting"):
        stream("dirichlet", order="iid")
    # the order of another setting: gradual with correlated labels
    assert stream("gradual", order="dirichlet").order == "dirichlet"


def test_long_is_many_rounds_of_the_continual_stream():
    assert stream("long").rounds == data.LONG_ROUNDS >= 10
    long = stream("long", rounds=3)
    batches = list(long)
    assert len(batches) == len(long) == 3 * 4
    expected = [(r, c) for r in range(3) for c in ("fog", "fog", "contrast", "contrast")]
    assert [(b.round, b.domain) for b in batches] == expected
    assert same_batches(batches[:4], list(stream("continual")))
    assert not torch.equal(batches[0].y, batches[4].y)  # each round in its own order
    with pytest.raises(ValueError, match="several rounds"):
        stream("long", rounds=1)


def test_bad_settings_raise_naming_the_problem_before_anything_is_corrupted(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("corrupted despite the bad argument")

    monkeypatch.setattr(data.streams, "corrupt_set", boom)
    with pytest.raises(ValueError, match=r"unknown stream setting 'sorted'.*continual, reset"):
        stream("sorted")
    with pytest.raises(ValueError, match=r"gradual.*severity"):
        stream("gradual", severity=3)
    for bad in ({"rounds": 0}, {"batch_size": 0}, {"severity": 6}, {"order": "sorted"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            stream("continual", **bad)
    with pytest.raises(ValueError, match="corruptions"):
        stream("mixed", corruptions=[])
    with pytest.raises(ValueError, match="dirichlet_delta"):
        stream("dirichlet", dirichlet_delta=0)
    with pytest.raises(ValueError, match="channels"):
        stream("continual", channels=2)
    with pytest.raises(ValueError, match="reset_on_shift"):
        data.ContinualStream([data.load_source(n_test=N_TEST)[1]], reset_on_shift="yes")


# ---------------------------------------------------------------------------- the core's resets


@pytest.fixture(scope="module")
def qm(float_cnn, calib):
    return qtta_plugins.quantize(float_cnn, "torchao", "w4a4", calib)


def watch(run):
    """Record the adapted parameters as each batch finds them, before its update."""
    seen: list[list[torch.Tensor]] = []
    step = run.method.forward_and_adapt

    def recording(x):
        seen.append([p.detach().clone() for p in run.method.adapted_parameters()])
        return step(x)

    run.method.forward_and_adapt = recording
    return seen


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def first_of_each_domain(batches: list[Batch]) -> list[int]:
    return [i for i in range(1, len(batches)) if batches[i].domain != batches[i - 1].domain]


def test_a_reset_stream_makes_the_core_restart_at_each_domain(qm):
    reset = stream("reset", corruptions=["fog", "contrast", "pixelate"])
    batches = list(reset)
    run = qtta_plugins.adapt(qm, None, "tent")
    initial = [p.detach().clone() for p in run.method.adapted_parameters()]
    seen = watch(run)
    run.run(reset)
    starts = first_of_each_domain(batches)
    assert starts == [2, 4] and run.restarts == starts
    for i, params in enumerate(seen):
        assert same(params, initial) == (i in [0, *starts]), i
    # each domain adapted from the start: as a run on that domain alone
    for start in starts:
        alone = qtta_plugins.adapt(qm, batches[start : start + 2], "tent")
        assert torch.equal(run.predictions[start * 10 : start * 10 + 20], alone.predictions)
    # the results are the whole stream's
    assert len(run.predictions) == 60 and list(run.errors()) == [
        "fog",
        "contrast",
        "pixelate",
        "mean",
    ]
    # the same stream without the flag, or the flag turned off: no restart, the continual run
    continual = qtta_plugins.adapt(
        qm, stream("continual", corruptions=["fog", "contrast", "pixelate"]), "tent"
    )
    off = qtta_plugins.adapt(qm, None, "tent", reset_on_shift=False)
    seen_off = watch(off)
    off.run(reset)
    assert continual.restarts == off.restarts == []
    assert torch.equal(off.predictions, continual.predictions)
    assert not any(same(seen_off[i], initial) for i in starts)
    # and turned on for a continual stream: the reset setting
    on = qtta_plugins.adapt(
        qm,
        stream("continual", corruptions=["fog", "contrast", "pixelate"]),
        "tent",
        reset_on_shift=True,
    )
    assert on.restarts == starts and torch.equal(on.predictions, run.predictions)


@pytest.mark.parametrize("method", ["tent", "norm", "zoa"])
def test_periodic_reset_fires_every_n_batches(qm, method):
    batches = list(stream("continual", corruptions=["fog", "contrast", "pixelate"]))  # 6 batches
    run = qtta_plugins.adapt(qm, None, method, reset_every=2)
    initial = [p.detach().clone() for p in run.method.adapted_parameters()]
    seen = watch(run)
    for b in batches:  # step() keeps the policy as run() does
        run.step(b.x, b.y, b.domain)
    assert run.restarts == [2, 4] and run.batches == 6
    assert [same(params, initial) for params in seen][::2] == [True] * 3
    plain = qtta_plugins.adapt(qm, None, method)
    seen_plain = watch(plain)
    plain.run(batches)
    assert plain.restarts == []
    assert torch.equal(run.predictions[:20], plain.predictions[:20])
    for start in (2, 4):  # after a restart: a fresh run on the next batches
        fresh = qtta_plugins.adapt(qm, batches[start : start + 2], method)
        assert torch.equal(run.predictions[start * 10 : start * 10 + 20], fresh.predictions)
    if method != "norm":  # norm learns nothing: there, nothing tells a restart
        assert not any(same(seen[i], initial) for i in (1, 3, 5))
        assert not any(same(seen_plain[i], initial) for i in (2, 4))


def test_tent_with_reset_every_is_the_rdumb_baseline_on_a_long_stream(qm):
    long = stream("long", rounds=2)
    run = qtta_plugins.adapt(qm, long, "tent", reset_every=3)
    assert run.restarts == [3, 6] and len(run.predictions) == 80
    both = qtta_plugins.adapt(qm, stream("reset"), "tent", reset_every=1)
    assert both.restarts == [1, 2, 3]


def test_bad_reset_values_raise_before_anything_changes(qm):
    model = qtta_plugins.view.copy_model(qm)
    view = qtta_plugins.quant_view(model)
    before = view.snapshot()
    batches = list(stream("continual"))
    for bad in (0, -3, 2.5, True, "3"):
        with pytest.raises(ValueError, match="reset_every"):
            qtta_plugins.adapt(model, batches, "tent", inplace=True, reset_every=bad)
    with pytest.raises(ValueError, match="reset_on_shift"):
        qtta_plugins.adapt(model, batches, "tent", inplace=True, reset_on_shift="yes")
    after = view.snapshot()
    assert all(torch.equal(v, after["tensors"][k]) for k, v in before["tensors"].items())
    assert after["requires_grad"] == before["requires_grad"]
    assert after["norm_mode"] == before["norm_mode"]

    class Flagged(list):
        reset_on_shift = "yes"

    run = qtta_plugins.adapt(model, None, "tent")
    with pytest.raises(ValueError, match="reset_on_shift"):
        run.run(Flagged(batches))
    assert run.batches == 0


def test_a_failing_step_undoes_its_restart_too(qm):
    batches = list(stream("continual"))
    run = qtta_plugins.adapt(qm, batches[:2], "tent", reset_every=2)
    adapted = [p.detach().clone() for p in run.method.adapted_parameters()]
    optimizer = run.method.state_dict()["optimizer"]["state"]
    assert run.restarts == [] and optimizer

    real = run.method.forward_and_adapt
    run.method.forward_and_adapt = lambda x: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        run.step(batches[2].x, batches[2].y, batches[2].domain)
    assert same([p.detach() for p in run.method.adapted_parameters()], adapted)
    kept = run.method.state_dict()["optimizer"]["state"]
    assert all(
        torch.equal(kept[k]["momentum_buffer"], v["momentum_buffer"]) for k, v in optimizer.items()
    )
    assert run.restarts == [] and run.batches == 2 and len(run.predictions) == 20
    run.method.forward_and_adapt = real
    run.step(batches[2].x, batches[2].y, batches[2].domain)  # now it restarts
    assert run.restarts == [2]


def test_reset_clears_the_policy_counts_and_save_load_keeps_them(qm, tmp_path):
    batches = list(stream("continual", corruptions=["fog", "contrast", "pixelate"]))
    run = qtta_plugins.adapt(qm, batches[:3], "tent", reset_every=2)
    assert run.restarts == [2]
    run.save(tmp_path / "state.pt")
    resumed = qtta_plugins.adapt(qm, None, "tent", reset_every=2)
    resumed.load(tmp_path / "state.pt")
    for b in batches[3:]:
        resumed.step(b.x, b.y, b.domain)
    assert resumed.restarts == [4]  # two batches after the restart before the save
    whole = qtta_plugins.adapt(qm, batches, "tent", reset_every=2)
    assert torch.equal(resumed.predictions, whole.predictions[30:])
    # reset(): back to the start, results and restarts cleared, as before
    whole.reset()
    assert whole.restarts == [] and whole.batches == 0 and len(whole.predictions) == 0
    assert whole.errors() == {}
    again = qtta_plugins.adapt(qm, batches, "tent", reset_every=2)
    whole.run(batches)
    assert whole.restarts == again.restarts == [2, 4]
    assert torch.equal(whole.predictions, again.predictions)


# ---------------------------------------------------------------------------- the flags


def test_qtta_demo_setting_and_reset_every_route_to_the_continual_table(monkeypatch, tmp_path):
    import qtta_plugins.app.demo as demo
    from qtta_plugins.app import tour

    calls: list[dict] = []
    monkeypatch.setattr(demo, "run_demo", lambda **kw: calls.append(kw))
    monkeypatch.setattr(tour, "run_tour", lambda backend, **kw: calls.append({"tour": True}))
    monkeypatch.chdir(tmp_path)
    args = ["demo", "-q", "--methods", "tent", "--setting", "gradual", "--reset-every", "5"]
    assert cli.main(args) == 0
    assert calls[-1]["setting"] == "gradual" and calls[-1]["reset_every"] == 5
    assert calls[-1]["severity"] is None and calls[-1]["rounds"] is None
    assert cli.main(["demo", "-q", "--methods", "tent", "--setting", "long", "--rounds", "3"]) == 0
    assert (calls[-1]["setting"], calls[-1]["rounds"]) == ("long", 3)
    assert cli.main(["demo", "-q", "--methods", "tent"]) == 0  # defaults: as before
    assert (calls[-1]["setting"], calls[-1]["reset_every"]) == ("continual", None)
    n = len(calls)
    assert cli.main(["demo", "-q", "--setting", "mixed"]) == 2  # the tour has its own streams
    assert len(calls) == n
    for bad in (["--setting", "sorted"], ["--reset-every", "0"], ["--reset-every", "x"]):
        with pytest.raises(SystemExit):
            cli.main(["demo", "-q", "--methods", "tent", *bad])
    assert len(calls) == n


def test_run_demo_refuses_bad_values_before_training(monkeypatch):
    import qtta_plugins.app.demo as demo

    monkeypatch.setattr(demo, "train_source_model", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ValueError, match="stream setting"):
        demo.run_demo(setting="sorted", echo=False)
    with pytest.raises(ValueError, match="reset_every"):
        demo.run_demo(reset_every=0, echo=False)
    with pytest.raises(ValueError, match="gradual"):
        demo.run_demo(setting="gradual", severity=4, echo=False)


def test_the_demo_on_a_mixed_stream_reports_each_corruption(monkeypatch, tmp_path, float_cnn):
    import qtta_plugins.app.demo as demo

    real = demo.make_stream
    monkeypatch.setattr(demo, "make_stream", lambda s, src, **kw: real(s, src, **{**kw, **SMALL}))
    plot = tmp_path / "demo.png"
    result = demo.run_demo(
        methods=("tent",), setting="mixed", plot=plot, progress=False, echo=False, reset_every=3
    )
    assert plot.stat().st_size > 10_000 and result.setting == "mixed"
    errors = result.errors["tent"]  # the samples' own domains, from Batch.sample_domains
    assert list(errors) == ["fog", "contrast", "mean"]
    assert errors["mean"] == pytest.approx((errors["fog"] + errors["contrast"]) / 2)
    assert result.table().splitlines()[0].split() == ["method", "fog", "contr", "mean"]


def test_the_demo_table_and_plot_of_a_gradual_stream(tmp_path):
    import qtta_plugins.app.demo as demo

    gradual = stream("gradual")
    domains = [b.domain for b in gradual]
    errors = {d: float(i) for i, d in enumerate(dict.fromkeys(domains))}
    result = demo.DemoResult("torchao", "W4A4", 90.0, 80.0, setting="gradual")
    result.errors["tent"] = {**errors, "mean": sum(errors.values()) / len(errors)}
    result.batch_errors["tent"] = [float(i % 7) for i in range(len(domains))]
    head, _, row = result.table().splitlines()
    assert head.split() == ["method", "fog", "contr", "mean"]  # one column per corruption
    assert [float(v) for v in row.split()[1:3]] == [2.0, 7.0]  # the mean over its severities
    assert (
        demo.corruption_of("fog-3") == "fog" and demo.corruption_of("my-domain-2") == "my-domain-2"
    )
    line = demo.describe("gradual", gradual, "digits", None, 50)
    assert line.startswith("gradual digits-C, severities 1, 2, 3, 4, 5, 4, 3, 2, 1")
    assert line.endswith("reset every 50 batches")
    assert demo.describe("reset", stream("reset"), "digits").endswith("reset at each domain")
    plot = tmp_path / "gradual.png"
    demo.save_plot(result, plot, gradual, domains)
    assert plot.stat().st_size > 10_000

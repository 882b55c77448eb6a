"""``qtta_plugins.adapt``: the online loop, the baselines, errors on bad input, state handling."""

from __future__ import annotations

import copy

import pytest
import torch
from _state import model_state, same_state

import qtta_plugins
from qtta_plugins import BadBatchError, UnknownMethodError

pytest.importorskip("torchao")


# --- the methods do what they claim ------------------------------------------------------------
def test_demo_tent_beats_source_by_ten_points_at_w4a4(demo_result):
    result, plot = demo_result
    source, norm, tent = (result.errors[m]["mean"] for m in ("source", "norm", "tent"))
    assert tent <= source - 10, result.table()
    assert norm <= source - 10, result.table()
    assert len(result.errors["tent"]) == 16  # 15 domains + mean
    assert plot.exists() and plot.stat().st_size > 10_000
    assert "tent" in result.table() and "gauss" in result.table()


def test_predictions_come_in_stream_order_and_source_matches_the_model(qcnn, short_stream):
    run = qtta_plugins.adapt(qcnn["w4a4"], short_stream, "source")
    model = run.model
    with torch.no_grad():
        expected = torch.cat([model(b.x).argmax(1) for b in short_stream])
    assert torch.equal(run.predictions, expected)
    assert run.batches == len(short_stream)
    assert list(run.errors()) == ["gaussian_noise", "defocus_blur", "contrast", "mean"]


def test_tent_updates_only_norm_affine_parameters(qcnn, short_stream):
    before = model_state(qcnn["w4a4"])
    run = qtta_plugins.adapt(qcnn["w4a4"], short_stream, "tent")
    after = model_state(run.model)
    # num_batches_tracked counts forward passes in batch mode; it feeds nothing (momentum is set)
    changed = {
        k for k in before if not torch.equal(before[k], after[k]) and "num_batches_tracked" not in k
    }
    norm_names = {n.name for n in run.view.norms()}
    assert changed, "tent changed nothing"
    assert all(
        k.rsplit(".", 1)[0] in norm_names and k.endswith(("weight", "bias")) for k in changed
    ), changed


def test_tent_runs_on_a_linear_only_qat_model():
    from qtta_plugins.models import TinyViT

    torch.manual_seed(0)
    qm = qtta_plugins.quantize(TinyViT().eval(), "torchao", "w4a4", [torch.rand(16, 1, 32, 32)])
    ln_before = [p.clone() for p in qtta_plugins.quant_view(qm).norm_parameters()]
    run = qtta_plugins.adapt(qm, [torch.rand(8, 1, 32, 32) for _ in range(3)])
    assert run.config.method == "tent"  # the default where gradients flow
    ln_after = run.view.norm_parameters()
    assert any(not torch.equal(a, b) for a, b in zip(ln_before, ln_after, strict=True))


def test_default_method_for_a_model_that_cannot_backpropagate(converted_qcnn, short_stream):
    converted = converted_qcnn
    with pytest.raises(ValueError, match=r"needs gradients"):
        qtta_plugins.adapt(converted, short_stream, "tent")
    # convert_pt2e folded every batch norm away: nothing is left to adapt, so no adaptation
    with pytest.warns(UserWarning, match=r"running 'source'"):
        run = qtta_plugins.adapt(converted, short_stream)
    assert run.config.method == "source"
    with torch.no_grad():
        expected = torch.cat([converted(b.x).argmax(1) for b in short_stream])
    assert torch.equal(run.predictions, expected)


@pytest.mark.parametrize("method", ["tent", "eata", "sar", "cotta", "rotta"])
def test_gradient_methods_refuse_a_model_that_cannot_backpropagate(converted_qcnn, method):
    """torchao's integer graph (``convert_pt2e``) has no gradient path: every method that needs
    one says so, naming the method, and the model is left as it was."""
    before = qtta_plugins.view.state_fingerprint(qtta_plugins.quant_view(converted_qcnn))
    with pytest.raises(ValueError, match=rf"'{method}' needs gradients.*cannot backpropagate"):
        qtta_plugins.adapt(converted_qcnn, [torch.rand(4, 1, 32, 32)], method)
    assert qtta_plugins.view.state_fingerprint(qtta_plugins.quant_view(converted_qcnn)) == before


# --- the user's model and the adaptation state are safe ---------------------------------------
def test_adapt_does_not_mutate_the_users_model_unless_asked(qcnn, short_stream):
    qm = copy.deepcopy(qcnn["w4a4"])
    before, code = model_state(qm), qm.code
    run = qtta_plugins.adapt(qm, short_stream, "tent")
    assert run.model is not qm
    assert same_state(before, model_state(qm)) and qm.code == code
    run = qtta_plugins.adapt(qm, short_stream, "tent", inplace=True)
    assert run.model is qm and not same_state(before, model_state(qm))


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (torch.rand(8, 1, 28, 28), r"shape \(8, 1, 28, 28\); this model expects \(N, 1, 32, 32\)"),
        (torch.rand(8, 32, 32), r"shape \(8, 32, 32\)"),
        ((torch.rand(8, 1, 32, 32) * 255).to(torch.uint8), "dtype torch.uint8"),
        (torch.full((8, 1, 32, 32), float("nan")), "NaN or Inf"),
        (torch.empty(0, 1, 32, 32), "empty"),
        ([[0.0]], "must be a torch.Tensor"),
    ],
)
def test_bad_batches_get_clear_errors_and_change_nothing(qcnn, short_stream, batch, message):
    run = qtta_plugins.adapt(qcnn["w4a4"], short_stream[:2], "tent")
    model_before = model_state(run.model)
    method_before = copy.deepcopy(run.method.state_dict())
    preds_before = run.predictions.clone()
    with pytest.raises(BadBatchError, match=message):
        run.step(batch)
    assert same_state(model_before, model_state(run.model))
    assert torch.equal(run.predictions, preds_before) and run.batches == 2
    after = run.method.state_dict()["optimizer"]["state"]
    assert all(
        torch.equal(after[k]["momentum_buffer"], v["momentum_buffer"])
        for k, v in method_before["optimizer"]["state"].items()
    )
    run.step(short_stream[2].x)  # and the run goes on
    assert run.batches == 3


def test_a_nan_batch_midstream_is_rejected_before_it_touches_the_model(qcnn, short_stream):
    poisoned = [short_stream[0], torch.full((8, 1, 32, 32), float("nan")), short_stream[1]]
    qm = copy.deepcopy(qcnn["w4a4"])
    before = model_state(qm)
    with pytest.raises(BadBatchError, match=r"NaN"):
        qtta_plugins.adapt(qm, poisoned, "tent", inplace=True)
    # the first batch was adapted on; the NaN batch left no trace: continuing gives a finite model
    assert all(torch.isfinite(v).all() for v in model_state(qm).values() if v.is_floating_point())
    assert not same_state(before, model_state(qm))


def test_a_failing_step_rolls_back(qcnn, short_stream):
    run = qtta_plugins.adapt(qcnn["w4a4"], short_stream[:1], "tent")
    before = model_state(run.model)
    original = run.method.forward_and_adapt

    def explode(x):
        original(x)  # adapts, then fails
        raise RuntimeError("boom")

    run.method.forward_and_adapt = explode
    with pytest.raises(RuntimeError, match=r"boom"):
        run.step(short_stream[1].x)
    assert same_state(before, model_state(run.model))


def test_empty_stream_unknown_method_and_bad_options(qcnn):
    qm = qcnn["w4a4"]
    before = model_state(qm)
    with pytest.raises(BadBatchError, match=r"stream is empty"):
        qtta_plugins.adapt(qm, [], "tent")
    with pytest.raises(
        UnknownMethodError,
        match=r"'tnet'.*available: cotta, eata, foa, norm, rotta, sar, source, tent, zoa",
    ):
        qtta_plugins.adapt(qm, [torch.rand(4, 1, 32, 32)], "tnet")
    for lr in (-1.0, float("nan"), True, "1e-3"):
        with pytest.raises(ValueError, match=r"TentConfig.lr must be a positive"):
            qtta_plugins.adapt(qm, [torch.rand(4, 1, 32, 32)], "tent", lr=lr)
    with pytest.raises(TypeError, match=r"unexpected keyword"):
        qtta_plugins.adapt(qm, [torch.rand(4, 1, 32, 32)], "tent", learning_rate=1.0)
    assert same_state(before, model_state(qm))


# --- reset, save, load, determinism ------------------------------------------------------------
def test_reset_returns_to_the_initial_state(qcnn, short_stream):
    run = qtta_plugins.adapt(qcnn["w4a4"], None, "tent")
    initial = model_state(run.model)
    first = run.run(short_stream).clone()
    assert not same_state(initial, model_state(run.model))
    run.reset()
    assert same_state(initial, model_state(run.model)) and run.batches == 0
    assert torch.equal(run.run(short_stream), first)


def test_save_and_load_continue_exactly(qcnn, short_stream, tmp_path):
    half = len(short_stream) // 2
    run = qtta_plugins.adapt(qcnn["w4a4"], short_stream[:half], "tent")
    run.save(tmp_path / "state.pt")
    rest = run.run(short_stream[half:])

    fresh = qtta_plugins.adapt(qcnn["w4a4"], None, "tent")
    fresh.load(tmp_path / "state.pt")
    assert fresh.batches == half
    assert torch.equal(fresh.run(short_stream[half:]), rest)
    assert same_state(model_state(fresh.model), model_state(run.model))

    norm_run = qtta_plugins.adapt(qcnn["w4a4"], None, "norm")
    with pytest.raises(ValueError, match=r"state is for method 'tent'"):
        norm_run.load(tmp_path / "state.pt")


def test_deterministic_under_a_seed(qcnn, short_stream):
    a = qtta_plugins.adapt(qcnn["w4a4"], short_stream, "tent", seed=3)
    b = qtta_plugins.adapt(qcnn["w4a4"], short_stream, "tent", seed=3)
    assert torch.equal(a.predictions, b.predictions)
    assert same_state(model_state(a.model), model_state(b.model))


def test_streams_of_tensors_and_pairs(qcnn, short_stream):
    xs = [b.x for b in short_stream[:2]]
    pairs = [(b.x, b.y) for b in short_stream[:2]]
    a = qtta_plugins.adapt(qcnn["w4a4"], xs, "norm")
    b = qtta_plugins.adapt(qcnn["w4a4"], pairs, "norm")
    assert torch.equal(a.predictions, b.predictions)
    assert a.errors() == {} and set(b.errors()) == {"stream", "mean"}

"""Small batches: every method at batch 1, 2, 4, 16 and 64 adapts or refuses clearly, and
``adapt(..., window=N)`` adapts any method one sample at a time (``qtta_plugins/window.py``)."""

from __future__ import annotations

import copy

import pytest
import torch
from _state import model_state, same_state

import qtta_plugins
from qtta_plugins import SmallBatchError, WindowConfig

pytest.importorskip("torchao")

# torchao by default; Brevitas and NNCF (13-80 s a case on 2 busy cores) under -m slow. The
# refusal and the window sit above the backend (adapt and the method), so torchao's run covers
# the logic, the other two the backends' norm-mode plumbing.
BACKENDS = (
    "torchao",
    pytest.param("brevitas", marks=pytest.mark.slow),
    pytest.param("nncf", marks=pytest.mark.slow),
)
# the methods that normalise with (or compare) the statistics of the test batch on a BN CNN
BATCH_STATS = ("norm", "tent", "eata", "sar", "cotta", "zoa", "foa")
OPTIONS = {
    "cotta": {"n_augmentations": 2},
    "foa": {"population": 4, "predict": "incumbent"},
    "rotta": {"update_frequency": 32},
}


def images(stream_excerpt, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` images of the digits-C stream's first domain (gaussian noise), labels."""
    first = stream_excerpt(4)[:4]
    return torch.cat([b.x for b in first])[:n], torch.cat([b.y for b in first])[:n]


def same_values(a: object, b: object) -> bool:
    """Tensors, numbers and strings equal throughout two nested states (other objects, such as
    FOA's CMA-ES, by type only)."""
    if isinstance(a, dict):
        return (
            isinstance(b, dict) and a.keys() == b.keys() and all(same_values(a[k], b[k]) for k in a)
        )
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same_values(u, v) for u, v in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if a is None or isinstance(a, int | float | str | bool):
        return a == b
    return type(a) is type(b)


def singles(x: torch.Tensor, y: torch.Tensor | None = None) -> list:
    return [(x[i : i + 1], y[i : i + 1]) if y is not None else x[i : i + 1] for i in range(len(x))]


# --- part 1: adapt or refuse, at every batch size, on every backend -------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", [*BATCH_STATS, "source", "rotta"])
def test_every_method_adapts_from_batch_2_and_refuses_batch_1(
    qcnn_by_backend, stream_excerpt, backend, method
):
    """Batches of 2, 4, 16 and 64 adapt; a batch of 1 is refused by the methods that need batch
    statistics, naming the batch size and the window, and the refused step changes nothing."""
    x, _ = images(stream_excerpt, 64)
    run = qtta_plugins.adapt(qcnn_by_backend(backend), None, method, **OPTIONS.get(method, {}))
    for n in (2, 4, 16, 64):
        assert run.step(x[:n]).shape == (n, 10)
    assert run.predictions.shape == (86,)
    model_before = model_state(run.model, batch_counts=False)
    method_before = copy.deepcopy(run.method.state_dict())
    if method in BATCH_STATS:
        with pytest.raises(SmallBatchError, match=r"batch of 1 sample: .*at least 2.*window=16"):
            run.step(x[:1])
        assert same_state(model_before, model_state(run.model, batch_counts=False))
        assert same_values(run.method.state_dict(), method_before)
        assert run.batches == 4 and run.predictions.shape == (86,)
    else:  # source statistics (source) or robust global ones (rotta): one image is enough
        assert run.step(x[:1]).shape == (1, 10)


@pytest.mark.parametrize("method", ["norm", "tent"])
@pytest.mark.parametrize("n", [2, 4])
def test_small_batches_that_are_accepted_still_beat_source(qcnn, stream_excerpt, method, n):
    """What the minimum of 2 rests on: on the digits CNN the batch-statistics methods keep most
    of their gain at batches of 2 and 4 (at batch 1 they fall to chance)."""
    x, y = images(stream_excerpt, 48)
    batches = [(x[i : i + n], y[i : i + n]) for i in range(0, 48, n)]
    source = qtta_plugins.adapt(qcnn["w8a8"], batches, "source").errors()["mean"]
    adapted = qtta_plugins.adapt(qcnn["w8a8"], batches, method).errors()["mean"]
    print(f"batch {n}: source {source:.1f}% error, {method} {adapted:.1f}%")
    assert adapted <= source - 10, (source, adapted)


def test_layer_norm_models_adapt_at_batch_1_but_zoa_refuses():
    """Layer norms normalise each sample on its own: Tent adapts on one image there. ZOA compares
    the batch's feature deviations with the source's, which one image does not have."""
    from qtta_plugins.models import TinyViT

    torch.manual_seed(0)
    qm = qtta_plugins.quantize(TinyViT().eval(), "torchao", "w8a8", [torch.rand(16, 1, 32, 32)])
    run = qtta_plugins.adapt(qm, [torch.rand(1, 1, 32, 32) for _ in range(2)], "tent")
    assert run.batches == 2
    run = qtta_plugins.adapt(qm, None, "zoa")
    with pytest.raises(SmallBatchError, match=r"'zoa' needs at least 2"):
        run.step(torch.rand(1, 1, 32, 32))
    run = qtta_plugins.adapt(qm, [torch.rand(1, 1, 32, 32) for _ in range(4)], "zoa", window=2)
    assert run.predictions.shape == (4,) and run.method.updates == 2


def test_a_refused_batch_midstream_keeps_the_run_so_far(qcnn, stream_excerpt):
    x, y = images(stream_excerpt, 8)
    stream = [(x[:4], y[:4]), (x[4:5], y[4:5]), (x[5:], y[5:])]
    with pytest.raises(SmallBatchError) as err:
        qtta_plugins.adapt(qcnn["w8a8"], stream, "tent")
    assert err.value.adaptation.batches == 1 and err.value.adaptation.predictions.shape == (4,)


# --- part 2: the window -----------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", [*BATCH_STATS, "source", "rotta"])
def test_every_method_runs_one_image_at_a_time_through_a_window(
    qcnn_by_backend, stream_excerpt, backend, method
):
    x, y = images(stream_excerpt, 9)
    run = qtta_plugins.adapt(
        qcnn_by_backend(backend), singles(x, y), method, window=4, **OPTIONS.get(method, {})
    )
    assert run.predictions.shape == (9,) and run.batches == 9
    assert run.results["stream"].n == 9  # errors() counts samples
    assert run.method.updates == 2  # after the 4th and the 8th sample


def test_window_predicts_the_newest_sample_with_the_windows_statistics(qcnn, stream_excerpt):
    x, _ = images(stream_excerpt, 7)
    run = qtta_plugins.adapt(
        qcnn["w8a8"], None, "norm", window=WindowConfig(4, statistics="window")
    )
    source = qtta_plugins.adapt(qcnn["w8a8"], None, "source")
    first = run.step(x[:1])
    # one sample has no batch statistics: it is predicted with the source statistics
    torch.testing.assert_close(first, source.step(x[:1]))
    for i in range(1, 7):
        logits = run.step(x[i : i + 1])
        with torch.no_grad():
            expected = run.model(x[max(0, i - 3) : i + 1])[-1:]  # norm mode "batch": the window
        torch.testing.assert_close(logits, expected)
    assert run.method.buffer.shape[0] == 4 and torch.equal(run.method.buffer, x[3:7])


def test_window_updates_when_it_has_turned_over_or_every_k(qcnn, stream_excerpt):
    x, _ = images(stream_excerpt, 12)
    start = [p.clone() for p in qtta_plugins.quant_view(qcnn["w8a8"]).norm_parameters()]
    run = qtta_plugins.adapt(qcnn["w8a8"], None, "tent", window=4)
    run.run(singles(x[:3]))  # (a stream of 3 given to adapt would be refused: it cannot fill)
    unchanged = [torch.equal(a, b) for a, b in zip(start, run.view.norm_parameters(), strict=True)]
    assert all(unchanged) and run.method.updates == 0  # the window is not full yet
    run.run(singles(x[3:]))
    assert run.method.updates == 3  # at samples 4, 8, 12
    every2 = qtta_plugins.adapt(
        qcnn["w8a8"], singles(x), "tent", window=WindowConfig(4, update_every=2)
    )
    assert every2.method.updates == 5  # at samples 4, 6, 8, 10, 12
    assert every2.method.since_update == 0


@pytest.mark.parametrize("statistics", [None, "window", "global", "source"])
def test_a_batch_as_long_as_the_window_adapts_as_without_one(qcnn, short_stream, statistics):
    plain = qtta_plugins.adapt(qcnn["w8a8"], short_stream[:3], "tent")
    window = WindowConfig(16, statistics=statistics)
    windowed = qtta_plugins.adapt(qcnn["w8a8"], short_stream[:3], "tent", window=window)
    assert torch.equal(plain.predictions, windowed.predictions)
    assert windowed.method.updates == 3
    assert same_state(model_state(plain.model), model_state(windowed.model))


def test_one_image_at_a_time_with_a_window_beats_source(qcnn, stream_excerpt):
    x, y = images(stream_excerpt, 48)
    source = qtta_plugins.adapt(qcnn["w8a8"], [(x, y)], "source").errors()["mean"]
    windowed = qtta_plugins.adapt(qcnn["w8a8"], singles(x, y), "tent", window=16)
    print(f"one image at a time: source {source:.1f}% error, tent window=16 {windowed.errors()}")
    assert windowed.errors()["mean"] <= source - 10, (source, windowed.errors())


@pytest.mark.parametrize(
    ("window", "message"),
    [
        (0, r"window must be a number of samples >= 1 .*got 0"),
        (-3, r"got -3"),
        (2.5, r"got 2.5"),
        (True, r"got True"),
        ("8", r"got '8'"),
        (1, r"window=1 is shorter than the 2 samples method 'tent' needs"),
        (11, r"window=11 is longer than the stream, which holds 10 samples"),
    ],
)
def test_a_bad_window_is_a_clear_error_that_changes_nothing(qcnn, stream_excerpt, window, message):
    x, _ = images(stream_excerpt, 10)
    qm = copy.deepcopy(qcnn["w8a8"])
    before = model_state(qm)
    with pytest.raises(ValueError, match=message):
        qtta_plugins.adapt(qm, singles(x), "tent", window=window, inplace=True)
    assert same_state(before, model_state(qm))
    assert qtta_plugins.quant_view(qm).norm_mode == "source"


def test_bad_update_every_is_refused():
    with pytest.raises(ValueError, match=r"update_every must be a number of samples >= 1"):
        WindowConfig(4, update_every=0)


def test_window_longer_than_a_declared_stream(qcnn):
    from qtta_plugins.data import continual_stream

    stream = continual_stream(
        "digits", severity=5, corruptions=("contrast",), batch_size=2, per_domain=10
    )
    with pytest.raises(ValueError, match=r"window=11 is longer than the stream"):
        qtta_plugins.adapt(qcnn["w8a8"], stream, "norm", window=11)


def test_reset_save_load_and_rollback_carry_the_window(qcnn, stream_excerpt, tmp_path):
    x, _ = images(stream_excerpt, 10)
    whole = qtta_plugins.adapt(qcnn["w8a8"], singles(x), "tent", window=4)
    part = qtta_plugins.adapt(qcnn["w8a8"], singles(x[:6]), "tent", window=4)
    part.save(tmp_path / "state.pt")
    resumed = qtta_plugins.adapt(qcnn["w8a8"], None, "tent", window=4)
    resumed.load(tmp_path / "state.pt")
    assert torch.equal(resumed.method.buffer, x[2:6]) and resumed.method.since_update == 2
    resumed.run(singles(x[6:]))
    assert torch.equal(resumed.predictions, whole.predictions[6:])
    assert same_state(model_state(resumed.model), model_state(whole.model))

    # a state of another window, or of none, is refused and changes nothing
    for other in (qtta_plugins.adapt(qcnn["w8a8"], None, "tent", window=8),
                  qtta_plugins.adapt(qcnn["w8a8"], None, "tent")):  # fmt: skip
        with pytest.raises(ValueError, match=r"saved by a run with window=4"):
            other.load(tmp_path / "state.pt")
        assert getattr(other.method, "buffer", None) is None

    # a failing update puts the window back as it was
    buffer, since = part.method.buffer, part.method.since_update
    part.method.inner.forward_and_adapt = lambda _: (_ for _ in ()).throw(RuntimeError("boom"))
    part.step(x[6:7])  # not an update: the window predicts
    with pytest.raises(RuntimeError, match="boom"):
        part.step(x[7:8])  # the 8th sample: an update
    assert torch.equal(part.method.buffer, torch.cat([buffer, x[6:7]])[-4:])
    assert part.method.since_update == since + 1 and part.batches == 7

    whole.reset()
    assert whole.method.buffer is None and whole.method.updates == 0
    again = whole.run(singles(x))
    assert torch.equal(
        again, qtta_plugins.adapt(qcnn["w8a8"], singles(x), "tent", window=4).predictions
    )


# --- part 2: what the batch norms of a windowed run normalise with --------------------------------
def first_batch_norm(run):
    return next(n for n in run.view.norms() if n.has_statistics)


def first_norm_statistics(run) -> tuple[torch.Tensor, torch.Tensor]:
    norm = first_batch_norm(run)
    return norm.running_mean.clone(), norm.running_var.clone()


def test_global_statistics_predict_each_sample_alone_and_move_once_per_update(qcnn, stream_excerpt):
    x, _ = images(stream_excerpt, 6)
    run = qtta_plugins.adapt(
        qcnn["w8a8"], None, "norm", window=WindowConfig(4, statistics="global", decay=0.9)
    )
    assert run.method.statistics == "global" and run.view.norm_mode == "source"
    source_mean, _ = first_norm_statistics(run)
    for i in range(3):  # not an update: each sample alone, on the (still source) statistics
        logits = run.step(x[i : i + 1])
        with torch.no_grad():
            torch.testing.assert_close(logits, run.model(x[i : i + 1]))
    assert torch.equal(first_norm_statistics(run)[0], source_mean)
    # the 4th sample: the window's statistics move the global ones, once (what the first batch
    # norm sees is taken on that forward: a graph backend's conv-bn fold reads the statistics)
    norm = first_batch_norm(run)
    seen = []

    def record(_, args):
        if run.method.rbn.updating:
            seen.append(args[0].detach().float())

    handle = run.view.norm_input_module(norm).register_forward_pre_hook(record)
    run.step(x[3:4])
    handle.remove()
    assert len(seen) == 1 and seen[0].shape[0] == 4  # one folding forward, of the whole window
    moved_mean, _ = first_norm_statistics(run)
    window_mean = seen[0].mean(dim=[0, *range(2, seen[0].ndim)])
    torch.testing.assert_close(moved_mean, 0.9 * source_mean + 0.1 * window_mean, rtol=0, atol=1e-5)
    with torch.no_grad():  # and the next sample is predicted alone on the moved statistics
        torch.testing.assert_close(run.step(x[4:5]), run.model(x[4:5]))
    # reset puts the source statistics back (they are the model's running buffers)
    run.reset()
    assert torch.equal(first_norm_statistics(run)[0], source_mean)


def test_source_statistics_never_move_and_the_method_alone_adapts(qcnn, stream_excerpt):
    x, _ = images(stream_excerpt, 8)
    run = qtta_plugins.adapt(
        qcnn["w8a8"], None, "tent", window=WindowConfig(4, statistics="source")
    )
    start = first_norm_statistics(run)
    affine = [p.clone() for p in run.view.norm_parameters()]
    for i in range(8):
        logits = run.step(x[i : i + 1])
        if (i + 1) % 4:
            with torch.no_grad():
                torch.testing.assert_close(logits, run.model(x[i : i + 1]))
    assert run.method.updates == 2 and run.view.norm_mode == "source"
    assert all(torch.equal(a, b) for a, b in zip(start, first_norm_statistics(run), strict=True))
    assert not all(
        torch.equal(a, b) for a, b in zip(affine, run.view.norm_parameters(), strict=True)
    )
    # norm with source statistics and a window is the source model
    norm = qtta_plugins.adapt(
        qcnn["w8a8"], singles(x), "norm", window=WindowConfig(4, statistics="source")
    )
    source = qtta_plugins.adapt(qcnn["w8a8"], [x], "source")
    assert torch.equal(norm.predictions, source.predictions)


def test_window_statistics_apply_to_batch_norms_only():
    from qtta_plugins.models import TinyViT

    torch.manual_seed(0)
    qm = qtta_plugins.quantize(TinyViT().eval(), "torchao", "w8a8", [torch.rand(16, 1, 32, 32)])
    run = qtta_plugins.adapt(qm, None, "tent", window=WindowConfig(4, statistics="global"))
    assert run.method.statistics is None and run.method.rbn is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"statistics": "batch"}, r"window statistics must be one of 'window', 'global', 'source'"),
        ({"decay": 1.0}, r"WindowConfig.decay must be in \[0, 1\), got 1.0"),
        ({"decay": -0.1}, r"got -0.1"),
        ({"stats": "global"}, r"window: .*unexpected keyword argument 'stats'"),
    ],
)
def test_bad_window_statistics_are_refused_before_anything_changes(
    qcnn, stream_excerpt, fields, message
):
    x, _ = images(stream_excerpt, 8)
    qm = copy.deepcopy(qcnn["w8a8"])
    before = model_state(qm)
    with pytest.raises(ValueError, match=message):
        qtta_plugins.adapt(qm, singles(x), "tent", window={"length": 4, **fields}, inplace=True)
    assert same_state(before, model_state(qm))


def test_a_state_saved_with_other_statistics_is_refused(qcnn, stream_excerpt, tmp_path):
    x, _ = images(stream_excerpt, 6)
    run = qtta_plugins.adapt(
        qcnn["w8a8"], singles(x), "tent", window=WindowConfig(4, statistics="global")
    )
    run.save(tmp_path / "state.pt")
    other = qtta_plugins.adapt(
        qcnn["w8a8"], None, "tent", window=WindowConfig(4, statistics="window")
    )
    before = model_state(other.model)
    with pytest.raises(
        ValueError, match=r"statistics='global'; this run has .*statistics='window'"
    ):
        other.load(tmp_path / "state.pt")
    assert same_state(before, model_state(other.model)) and other.method.buffer is None
    again = qtta_plugins.adapt(
        qcnn["w8a8"], None, "tent", window=WindowConfig(4, statistics="global")
    )
    again.load(tmp_path / "state.pt")
    assert torch.equal(again.method.buffer, run.method.buffer)

"""FOA as its authors run it (mr-eggplant/FOA): each step checked against a computation written out
here - the candidates and the previous best, the squared fitness on class-token statistics, the
prediction from this batch's best candidate, the output shift from earlier batches - and each
step's switch back to our FOA before issue 34."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qtta_plugins
from qtta_plugins.features import FeatureRecorder, feature_layers, source_statistics
from qtta_plugins.models import build


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = build("timm-vit", scale="small").eval()  # width 64, 2 blocks, patch 4 on 32 px
    gen = torch.Generator().manual_seed(0)
    calib = [torch.rand(32, 3, 32, 32, generator=gen) for _ in range(2)]
    batches = [torch.rand(16, 3, 32, 32, generator=gen) * 0.5 + 0.3 for _ in range(3)]
    return model, calib, batches


@pytest.fixture(scope="module")
def qvit(vit):
    pytest.importorskip("brevitas")
    model, calib, _ = vit
    return qtta_plugins.quantize(model, "brevitas", "w8a8", calib)


class Passes:
    """Records, for every forward pass of the model, the logits it returned."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.logits: list[torch.Tensor] = []
        self.handle = model.register_forward_hook(
            lambda m, a, out: self.logits.append(out.detach().clone())
        )


def entropy(logits: torch.Tensor) -> torch.Tensor:
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def test_class_token_statistics_are_the_authors(qvit, vit):
    """Features: the class token at each block's first layer (its norm1 output) and at the head;
    source statistics over all images at once with the unbiased std, as torch.std_mean over the
    concatenated features gives them (the authors' obtain_origin_stat)."""
    _, calib, _ = vit
    view = qtta_plugins.quant_view(qvit)
    layers = feature_layers(view)
    assert [layer.name for layer in layers] == ["blocks.0.attn.qkv", "blocks.1.attn.qkv", "head"]
    recorder = FeatureRecorder(view, layers, token=0)
    stats, _ = source_statistics(view, recorder, calib)
    captured: list[list[torch.Tensor]] = [[], [], []]
    vit_model = qvit
    hooks = [
        vit_model.blocks[0].norm1.register_forward_hook(
            lambda m, a, o: captured[0].append(o[:, 0])
        ),
        vit_model.blocks[1].norm1.register_forward_hook(
            lambda m, a, o: captured[1].append(o[:, 0])
        ),
        vit_model.norm.register_forward_hook(lambda m, a, o: captured[2].append(o[:, 0])),
    ]
    with torch.no_grad():
        for x in calib:
            qvit(x)
    for h in hooks:
        h.remove()
    for got, feats in zip(stats, captured, strict=True):
        std, mean = torch.std_mean(torch.cat(feats), dim=0)
        torch.testing.assert_close(got.mean, mean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got.std, std, atol=1e-5, rtol=1e-4)
    # the first block's class token does not depend on the image: nothing to align there
    assert float(stats[0].std.max()) < 1e-5
    recorder.remove()


def test_kept_class_token_statistics_equal_those_from_source_data(vit):
    """quantize keeps the class-token statistics of its calibration sample, so foa without
    source_data aligns to what it would with that sample passed explicitly."""
    pytest.importorskip("brevitas")
    model, calib, batches = vit
    qmodel = qtta_plugins.quantize(model, "brevitas", "w8a8", calib)
    kept = qtta_plugins.adapt(qmodel, None, "foa", population=4)
    given = qtta_plugins.adapt(qmodel, None, "foa", population=4, source_data=calib)
    assert kept.method.features == "class_token"
    for a, b in zip(kept.method.source_stats, given.method.source_stats, strict=True):
        torch.testing.assert_close(a.mean, b.mean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.std, b.std, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(kept.step(batches[0]), given.step(batches[0]))


def test_one_batch_is_the_authors_step(qvit, vit):
    """Population 4 + the previous best = 5 passes, no other; CMA-ES is told all 5 with their
    fitness (entropy sum + 0.4 * B/64 * squared statistic differences); the prediction is the
    best pass's logits, unshifted on the first batch; on the second the shift of the first
    batch's EMA (the mean over its passes of the head's input) is added through the head."""
    _, calib, batches = vit
    run = qtta_plugins.adapt(qvit, None, "foa", population=4, source_data=calib, seed=1)
    method = run.method
    start = method.theta.clone()
    assert np.array_equal(method.es.mean, np.zeros(method.prompt.dim))  # CMA-ES from zero
    told: list[tuple[list, list]] = []
    tell = method.es.tell
    method.es.tell = lambda xs, fs: (
        told.append(([np.array(x) for x in xs], list(fs))) or tell(xs, fs)
    )
    heads: list[torch.Tensor] = []
    head_hook = run.model.head.register_forward_pre_hook(lambda m, a: heads.append(a[0].clone()))
    passes = Passes(run.model)
    x = batches[0]
    out = run.step(x)
    assert len(passes.logits) == 5 and len(told[0][0]) == 5
    # the fifth solution told is the previous best: the VPT initialisation
    np.testing.assert_allclose(told[0][0][4], start.numpy(), rtol=0, atol=1e-7)
    # fitness, recomputed from each pass's logits and the recorded statistics' definition
    src = method.source_stats
    feats = method.recorder  # statistics of the last pass are left in the recorder
    for logits, fitness in zip(passes.logits, told[0][1], strict=True):
        assert fitness >= float(entropy(logits).sum()) - 1e-4
    last = feats.collected()
    lam = 0.4 * x.shape[0] / 64
    expected = float(entropy(passes.logits[-1]).sum()) + lam * sum(
        float((s.std - t.std).square().sum() + (s.mean - t.mean).square().sum())
        for s, t in zip(last, src, strict=True)
    )
    assert told[0][1][-1] == pytest.approx(expected, rel=1e-5)
    best = int(np.argmin(told[0][1]))
    torch.testing.assert_close(out, passes.logits[best])  # first batch: no shift
    torch.testing.assert_close(method.theta, torch.as_tensor(told[0][0][best], dtype=torch.float32))
    ema = torch.stack([h.mean(0) for h in heads]).mean(0)
    torch.testing.assert_close(method.recorder.feature_ema, ema)
    # second batch: the prediction carries the shift source mean - EMA, through the head
    shift = src[-1].mean - ema
    passes.logits.clear()
    out2 = run.step(batches[1])
    best2 = int(np.argmin(told[1][1]))
    weight = run.model.head.weight.detach()
    torch.testing.assert_close(out2, passes.logits[best2] + weight @ shift, atol=1e-4, rtol=1e-4)
    head_hook.remove()
    passes.handle.remove()


def test_between_batches_the_model_carries_the_incumbent_and_the_next_shift(qvit, vit):
    """After a step, the model with no method around it predicts as the method would for the
    incumbent prompt with the shift for the next batch (what an export carries)."""
    _, calib, batches = vit
    run = qtta_plugins.adapt(qvit, None, "foa", population=4, source_data=calib)
    run.step(batches[0])
    run.step(batches[1])
    method = run.method
    with torch.no_grad():
        carried = run.model(batches[2])
    shift = method.shift_target - method.recorder.feature_ema
    method._try(None)
    with torch.no_grad(), method.recorder.attached():
        method.recorder.head.write(None)
        raw = run.model(batches[2])
        method.recorder.apply_shift()
    torch.testing.assert_close(
        carried, raw + run.model.head.weight.detach() @ shift, atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize(
    "options, passes",
    [
        ({"predict": "incumbent"}, 5),  # a pass of its own for the prediction + 4 candidates
        ({"predict": "best"}, 5),  # 4 candidates + the previous best
    ],
)
def test_passes_per_batch(qvit, vit, options, passes):
    _, calib, batches = vit
    run = qtta_plugins.adapt(qvit, None, "foa", population=4, source_data=calib, **options)
    counter = Passes(run.model)
    run.step(batches[0])
    assert len(counter.logits) == passes
    counter.handle.remove()


def test_the_old_steps_are_back_behind_their_switches(qvit, vit):
    """fitness="norm", features="mean", predict="incumbent", shift_update="prediction" and
    cma_start="prompt" give our FOA before issue 34: CMA-ES centred at the prompt, told only its
    candidates, the prediction from the incumbent's pass with the shift of this batch in it."""
    _, calib, batches = vit
    old = {
        "fitness": "norm",
        "features": "mean",
        "predict": "incumbent",
        "shift_update": "prediction",
        "cma_start": "prompt",
    }
    run = qtta_plugins.adapt(qvit, None, "foa", population=4, source_data=calib, **old)
    method = run.method
    np.testing.assert_allclose(method.es.mean, method.theta.numpy(), atol=1e-7)
    assert method.recorder.token is None
    told = []
    tell = method.es.tell
    method.es.tell = lambda xs, fs: told.append(len(xs)) or tell(xs, fs)
    heads: list[torch.Tensor] = []
    hook = run.model.head.register_forward_pre_hook(lambda m, a: heads.append(a[0].clone()))
    passes = Passes(run.model)
    out = run.step(batches[0])
    assert told == [4]
    shift = method.source_stats[-1].mean - heads[0].mean(0)  # EMA starts at the incumbent's mean
    weight = run.model.head.weight.detach()
    torch.testing.assert_close(out, passes.logits[0] + weight @ shift, atol=1e-4, rtol=1e-4)
    hook.remove()
    passes.handle.remove()


@pytest.mark.parametrize(
    "options, match",
    [
        ({"fitness": "l1"}, r"FOAConfig.fitness must be one of 'squared', 'norm'"),
        ({"features": "cls"}, r"FOAConfig.features"),
        ({"predict": "last"}, r"FOAConfig.predict"),
        ({"shift_update": "batch"}, r"FOAConfig.shift_update"),
        ({"cma_start": "vpt"}, r"FOAConfig.cma_start"),
    ],
)
def test_the_switches_are_validated(qvit, vit, options, match):
    with pytest.raises(ValueError, match=match):
        qtta_plugins.adapt(qvit, None, "foa", source_data=vit[1], **options)


def test_mean_features_on_a_cnn_image_prompt(qcnn, digits):
    """The image prompt (our design for CNNs) takes pooled maps averaged over source batches,
    with the authors' fitness, prediction and shift."""
    run = qtta_plugins.adapt(qcnn["w4a4"], None, "foa", population=4)
    assert run.method.features == "mean" and run.method.recorder.token is None
    out = run.step(digits[1].x[:32])
    assert out.shape == (32, 10) and torch.isfinite(out).all()
    assert F.softmax(out, 1).sum(1).allclose(torch.ones(32))


@pytest.mark.slow
def test_foa_beats_source_over_long_domains_where_its_authors_form_gains():
    """On the shipped small ViT (80.3% clean), torchao W8A8, three Fashion-MNIST-C shifts of 1,280
    images each (20 batches of 64), continual: FOA as its authors run it gains over source, where
    our FOA before issue 34 (every switch back) lost to it. Measured here, seed 0: source 80.9,
    FOA 76.9, FOA before issue 34 81.5 (seed 1: 80.5 / 75.8). About a minute on one core."""
    from pathlib import Path

    from qtta_plugins.data import FASHION_MNIST_DIR, load_source, make_stream, to_channels

    if not Path(FASHION_MNIST_DIR).is_dir():
        pytest.skip("Fashion-MNIST (Debian's dataset-fashion-mnist) is not installed")
    pytest.importorskip("torchao")
    model = build("timm-vit", scale="small")
    shipped = Path(__file__).parent / "fixtures" / "vit-small-fashion-s0.pt"
    model.load_state_dict(torch.load(shipped, weights_only=True))
    model.eval()
    train, _ = load_source("fashion-mnist", seed=0)
    calib = [to_channels(train.x[i : i + 64], 3) for i in range(0, 256, 64)]
    qmodel = qtta_plugins.quantize(model, "torchao", "w8a8", calib)
    stream = make_stream(
        "continual",
        "fashion-mnist",
        corruptions=("gaussian_noise", "defocus_blur", "fog"),
        per_domain=1280,
        batch_size=64,
        seed=0,
        channels=3,
        progress=False,
    )
    source = qtta_plugins.adapt(qmodel, stream, "source", progress=False).errors()["mean"]
    foa = qtta_plugins.adapt(
        qmodel, stream, "foa", source_data=calib, seed=0, progress=False
    ).errors()["mean"]
    assert foa <= source - 2.0, (foa, source)

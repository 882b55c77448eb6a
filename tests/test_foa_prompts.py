"""FOA's two prompts: the paper's prompt tokens on ViTs (eager on Brevitas / NNCF, torchao's exported
graph), the image prompt elsewhere, and the choice between them."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import qtta_plugins
from qtta_plugins.methods.foa import GraphTokenPrompt, InputPrompt, TokenPrompt, token_model
from qtta_plugins.models import build

BACKENDS = ("torchao", "brevitas", "nncf")
KIND = {"torchao": GraphTokenPrompt, "brevitas": TokenPrompt, "nncf": TokenPrompt}


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = build("timm-vit", scale="small").eval()  # width 64, 2 blocks, patch 4 on 32 px
    calib = [torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in (0, 1)]
    return model, calib


@pytest.fixture(scope="module")
def qvit(vit):
    model, calib = vit
    cache: dict[str, torch.nn.Module] = {}

    def get(backend: str) -> torch.nn.Module:
        pytest.importorskip(backend)
        if backend not in cache:
            cache[backend] = qtta_plugins.quantize(model, backend, "w8a8", calib)
        return cache[backend]

    return get


@pytest.mark.parametrize("backend", BACKENDS)
def test_foa_learns_prompt_tokens_on_a_vit_of_every_backend(qvit, vit, backend):
    qmodel, calib = qvit(backend), vit[1]
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        plain = qmodel(x)
    run = qtta_plugins.adapt(qmodel, None, "foa", population=4, source_data=calib)
    prompt = run.method.prompt
    assert type(prompt) is KIND[backend]
    assert prompt.dim == 3 * 64 and run.method.sigma0 == 1.0
    # the statistics leave the three tokens after the class token out
    assert run.method.recorder.skip_tokens == slice(1, 4)
    out = run.step(x)
    assert out.shape == (8, 10) and torch.isfinite(out).all()
    with torch.no_grad():
        prompted = run.model(x)
        again = qmodel(x)
    # the adapted model carries the incumbent tokens; the user's model is untouched
    assert not torch.allclose(prompted, plain, atol=1e-4)
    assert torch.equal(again, plain)


def test_graph_tokens_compute_what_the_eager_model_with_tokens_computes(vit, qvit):
    """torchao's exported ViT, its fake quantization off (so it computes the float function), with
    the tokens inserted in its graph, against the float eager ViT with the same tokens hooked in:
    the same outputs, where the tokens move them (a wrong insertion point, or a reshape still at
    the traced length, would not give that)."""
    model, _ = vit
    gen = torch.Generator().manual_seed(1)
    theta = torch.randn(3 * 64, generator=gen) * 3
    x = torch.rand(16, 3, 32, 32, generator=gen)
    eager = copy.deepcopy(model)
    graph = copy.deepcopy(qvit("torchao"))
    switched = [m for m in graph.modules() if hasattr(m, "disable_fake_quant")]
    assert switched
    for m in switched:
        m.disable_fake_quant()
    with torch.no_grad():
        float_plain, graph_plain = eager(x), graph(x)
        torch.testing.assert_close(graph_plain, float_plain, atol=1e-5, rtol=1e-4)
        TokenPrompt(token_model(eager), 3).attach(eager, lambda: theta)
        found = GraphTokenPrompt.find(graph, 3)
        assert found is not None and (found.tokens, found.width, found.prefix) == (65, 64, 1)
        found.attach(graph, lambda: theta)
        float_tokens, graph_tokens = eager(x), graph(x)
    assert (float_tokens - float_plain).abs().max() > 1e-3
    torch.testing.assert_close(graph_tokens, float_tokens, atol=1e-5, rtol=1e-4)


def test_foa_keeps_the_image_prompt_for_cnns_and_when_asked(qcnn, vit, qvit):
    run = qtta_plugins.adapt(qcnn["w4a4"], None, "foa", population=3)
    assert type(run.method.prompt) is InputPrompt and run.method.sigma0 == 0.1
    assert run.method.recorder.skip_tokens is None
    run = qtta_plugins.adapt(
        qvit("brevitas"), None, "foa", population=3, prompt="image", source_data=vit[1]
    )
    assert type(run.method.prompt) is InputPrompt


def test_prompt_tokens_on_a_model_without_tokens_is_refused(qcnn):
    with pytest.raises(ValueError, match=r"prompt='tokens'.*has none: use prompt='image'"):
        qtta_plugins.adapt(qcnn["w4a4"], None, "foa", prompt="tokens")


@pytest.mark.parametrize(
    "options, match",
    [
        ({"prompt": "token"}, r"FOAConfig.prompt must be"),
        ({"prompt_tokens": 0}, r"FOAConfig.prompt_tokens"),
        ({"prompt_tokens": True}, r"FOAConfig.prompt_tokens"),
        ({"sigma0": -1.0}, r"FOAConfig.sigma0"),
    ],
)
def test_foa_prompt_options_are_validated(qcnn, options, match):
    with pytest.raises(ValueError, match=match):
        qtta_plugins.adapt(qcnn["w4a4"], None, "foa", **options)


def test_token_prompt_reset_and_state_round_trip(qvit, vit):
    calib = vit[1]
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    run = qtta_plugins.adapt(qvit("nncf"), None, "foa", population=4, source_data=calib, seed=3)
    start = run.method.theta.clone()
    # the VPT initialisation: uniform within +-sqrt(6 / (3 * 4 * 4 + 64))
    bound = (6 / (3 * 16 + 64)) ** 0.5
    assert start.abs().max() <= bound and start.abs().max() > 0.5 * bound
    run.step(x)
    run.step(x)
    saved = run.method._copy_state()
    # the incumbent is the best of the batch's candidates and the previous best: it may stay
    moved, mean = run.method.theta.clone(), run.method.es.mean.copy()
    assert run.method.es.countiter == 2 and not np.array_equal(mean, np.zeros_like(mean))
    run.reset()
    assert torch.equal(run.method.theta, start) and run.method.es.countiter == 0
    run.method.load_state_dict(saved)
    assert torch.equal(run.method.theta, moved) and np.array_equal(run.method.es.mean, mean)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_adapted_prompt_tokens_export_with_the_model(qvit, vit, backend, export_logits):
    """The incumbent tokens are part of what each backend's export path carries (torchao: a buffer
    of the graph; Brevitas / NNCF: the hooks, traced into the export). NNCF's stripped model
    rounds a value on a rounding boundary one step away now and then (NNCF's quantize and the
    FakeQuantize it strips to round ties differently): 0.015 on logits of at most 0.33 on this
    untrained ViT for some token values, so 5% of the largest logit is allowed there, as
    test_export.py allows the other backends."""
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    run = qtta_plugins.adapt(qvit(backend), None, "foa", population=4, source_data=vit[1])
    run.step(x)
    with torch.no_grad():
        adapted = run.model(x)
    exported = export_logits(backend, run.model, x)
    atol = 0.05 * float(adapted.abs().max()) if backend == "nncf" else 1e-3
    torch.testing.assert_close(exported, adapted, atol=atol, rtol=1e-3)
    assert torch.equal(exported.argmax(1), adapted.argmax(1))


@pytest.mark.parametrize("backend", ["torchao", "nncf"])
def test_a_model_that_carries_prompt_tokens_is_not_given_a_second_set(qvit, vit, backend):
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    run = qtta_plugins.adapt(qvit(backend), None, "foa", population=4, source_data=vit[1])
    run.step(x)
    with torch.no_grad():
        before = run.model(x)
    with pytest.raises(ValueError, match="already carries FOA's prompt tokens"):
        qtta_plugins.adapt(run.model, None, "foa", population=4, source_data=vit[1])
    with torch.no_grad():
        assert torch.equal(run.model(x), before)  # the refused call changed nothing
    # other methods adapt it as any model (the tokens stay what the foa run left)
    qtta_plugins.adapt(run.model, None, "zoa", source_data=vit[1]).step(x)

"""torchao export after adaptation: convert_pt2e and the torch.compile path keep the predictions."""

from __future__ import annotations

import copy

import pytest
import torch

import qtta_plugins

pytest.importorskip("torchao")

from qtta_torchao.export import compile_converted, convert


@pytest.fixture(scope="module")
def adapted(qcnn, digits_stream):
    batches = list(digits_stream)
    per_domain = len(batches) // len(digits_stream.domains)
    chosen = [b for d in (0, 4, 9) for b in batches[d * per_domain : d * per_domain + 2]]
    source_params = [p.clone() for p in qtta_plugins.quant_view(qcnn["w8a8"]).norm_parameters()]
    run = qtta_plugins.adapt(qcnn["w8a8"], chosen, "tent")
    view = qtta_plugins.quant_view(run.model)
    changed = [
        not torch.equal(a, b) for a, b in zip(source_params, view.norm_parameters(), strict=True)
    ]
    assert all(changed), "tent changed the batch-norm affine parameters"
    view.set_norm_mode("source")
    held_out = torch.cat([batches[d * per_domain + 5].x for d in (0, 4, 9, 12)])
    with torch.no_grad():
        logits = run.model(held_out)
    return run.model, held_out, logits


def test_convert_pt2e_after_tent_keeps_predictions(adapted):
    model, x, logits = adapted
    before = copy.deepcopy(model.state_dict())
    converted = convert(model)
    assert all(
        torch.equal(before[k], v) for k, v in model.state_dict().items()
    )  # caller's model kept
    view = qtta_plugins.quant_view(converted)
    assert type(view).__name__ == "ConvertedView"
    # BN folded into integer weights; each folded norm has a stand-in (the identity as converted).
    assert view.norms() and all(n.folded and n.has_statistics for n in view.norms())
    assert any(t.dtype == torch.int8 for t in converted.state_dict().values())
    with torch.no_grad():
        out = converted(x)
    agreement = float((out.argmax(1) == logits.argmax(1)).float().mean())
    assert agreement >= 0.99, agreement
    assert float((out - logits).abs().max()) < 0.05 * float(logits.abs().max())


def test_torch_compile_path_matches_converted(adapted):
    model, x, _ = adapted
    converted = convert(model)
    with torch.no_grad():
        eager = converted(x)
        compiled = compile_converted(converted)(x)
    assert torch.equal(compiled.argmax(1), eager.argmax(1))
    # inductor may fuse the Q/DQ arithmetic differently: same decisions, logits within 5%
    assert float((compiled - eager).abs().max()) <= 0.05 * float(eager.abs().max())


def test_convert_rejects_a_model_it_cannot_convert(float_cnn):
    with pytest.raises(TypeError, match="torchao pt2e model"):
        convert(float_cnn)

"""The shared range search (qtta_plugins.ranges) the adapters' MSE ranges go through."""

from __future__ import annotations

import pytest
import torch

from qtta_plugins.ranges import (
    ActivationRange,
    least_error_ratio,
    percentile,
    symmetric_weight_error,
)


def test_each_group_gets_the_ratio_of_its_least_error_earlier_on_ties():
    # group 0 is best at 0.5, group 1 at 1.0, group 2 ties everywhere
    table = {1.0: [3.0, 0.0, 1.0], 0.5: [1.0, 2.0, 1.0], 0.25: [2.0, 5.0, 1.0]}
    chosen = least_error_ratio(table, lambda r: torch.tensor(table[r]))
    assert chosen.tolist() == [0.5, 1.0, 1.0]
    assert float(least_error_ratio([1.0, 0.5], lambda r: torch.tensor(r))) == 0.5
    with pytest.raises(ValueError, match="at least one ratio"):
        least_error_ratio([], lambda r: torch.tensor(0.0))


def test_at_two_bits_the_searched_threshold_beats_min_max():
    """A Gaussian weight row with one outlier: min-max puts every other weight in the zero bin."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, generator=gen)
    w[:, 0] = 6.0
    error = symmetric_weight_error(w, qmax=1)
    absmax = w.abs().amax(1)
    ratio = least_error_ratio(torch.linspace(0.01, 1.0, 100), lambda r: error(r * absmax))
    assert (ratio < 0.5).all()
    assert (error(ratio * absmax) < 0.8 * error(absmax)).all()


def test_percentile_is_the_nearest_rank_value():
    x = torch.arange(1000, dtype=torch.float32).flip(0).reshape(10, 100)
    assert float(percentile(x, 50.0)) == 499.0
    assert float(percentile(x, 100.0)) == 999.0 and float(percentile(x, 0.0)) == 0.0
    assert float(percentile(x, 99.9)) == 998.0
    with pytest.raises(ValueError, match="q must be in"):
        percentile(x, 101.0)
    with pytest.raises(ValueError, match="empty"):
        percentile(torch.empty(0), 50.0)


def test_activation_range_averages_per_batch_percentiles_and_holds_zero():
    stats = ActivationRange(high=100.0)  # the max of each batch
    stats.update(torch.tensor([1.0, 2.0, -4.0]))
    stats.update(torch.tensor([3.0, 6.0, 0.5]))
    assert stats.batches == 2
    assert float(stats.threshold()) == pytest.approx((4.0 + 6.0) / 2)
    low, high = stats.interval()
    assert float(low) == pytest.approx((-4.0 + 0.5) / 2) and float(high) == pytest.approx(4.0)
    positive = ActivationRange(high=100.0)
    positive.update(torch.tensor([1.0, 2.0]))
    assert float(positive.interval()[0]) == 0.0  # widened to hold 0
    with pytest.raises(ValueError, match="saw no batch"):
        ActivationRange().threshold()


# --- the per-layer search over activation range rules ---------------------------------------------
SEARCH_BACKENDS = ["torchao", "brevitas", "nncf"]


def _calibration_output_error(qmodel, float_model, batches) -> float:
    """Mean squared difference of the logits from the float model's (the search's criterion,
    computed here on its own)."""
    import qtta_plugins

    view = qtta_plugins.quant_view(qmodel)
    assert view.norm_mode == "source"
    with torch.no_grad():
        diffs = [((qmodel(b) - float_model(b)) ** 2).flatten() for b in batches]
    return float(torch.cat(diffs).mean())


@pytest.mark.parametrize("backend", SEARCH_BACKENDS)
def test_the_range_search_is_never_worse_than_one_rule_everywhere(backend, float_cnn, calib):
    """At W2A4 on the digits CNN, quantize's default ranges (the per-quantizer search) give an
    output on the calibration images closer to the float model's than the shared percentile rule
    did before the search (strictly), and no farther than min-max or least error applied to
    every quantizer."""
    pytest.importorskip({"torchao": "torchao", "brevitas": "brevitas", "nncf": "nncf"}[backend])
    import qtta_plugins
    from qtta_plugins.ranges import search_activation_ranges, search_batches
    from qtta_plugins.view import copy_model

    batches = search_batches(list(calib))
    percentile = qtta_plugins.quantize(float_cnn, backend, "w2a4", calib, act_ranges="percentile")
    errors = {"percentile": _calibration_output_error(percentile, float_cnn, batches)}
    for rule in ("min-max", "least-error"):
        model = copy_model(percentile)
        chosen = search_activation_ranges(
            qtta_plugins.quant_view(model), float_cnn, batches, rule=rule
        )
        assert set(chosen.rules.values()) == {rule} and len(chosen.rules) >= 4
        errors[rule] = _calibration_output_error(model, float_cnn, batches)
    assert len(set(errors.values())) == 3  # three different range sets
    searched = qtta_plugins.quantize(float_cnn, backend, "w2a4", calib)
    error = _calibration_output_error(searched, float_cnn, batches)
    assert error < errors["percentile"], errors
    assert error <= min(errors.values()) * (1 + 1e-6), (error, errors)


def test_the_search_leaves_the_float_model_and_high_bit_quantizers_alone(float_cnn, calib):
    import copy

    import qtta_plugins
    from qtta_plugins.ranges import search_activation_ranges, search_batches

    model = copy.deepcopy(float_cnn).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel = qtta_plugins.quantize(model, "torchao", "w4a4", calib, act_ranges="percentile")
    view = qtta_plugins.quant_view(qmodel)
    high = {h.name: h.grid() for h in view.quantizers() if h.role == "act" and h.bits >= 8}
    assert high  # the 8-bit first and last layers' inputs
    result = search_activation_ranges(view, model, search_batches(list(calib)))
    assert result.rules and all(h not in result.rules for h in high)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for h in view.quantizers():
        if h.name in high:
            assert torch.equal(h.grid().scale, high[h.name].scale)
    assert view.norm_mode == "source"


def test_bad_range_choices_are_refused(float_cnn, calib):
    import qtta_plugins
    from qtta_plugins.config import QuantConfig
    from qtta_plugins.ranges import search_activation_ranges

    with pytest.raises(ValueError, match=r"QuantConfig\.act_ranges must be one of"):
        QuantConfig(act_ranges="mse")
    qmodel = qtta_plugins.quantize(float_cnn, "torchao", "w4a4", calib[:1], act_ranges="percentile")
    view = qtta_plugins.quant_view(qmodel)
    grids = [h.grid().scale for h in view.quantizers()]
    with pytest.raises(ValueError, match="rule must be 'search' or one of"):
        search_activation_ranges(view, float_cnn, calib[:1], rule="mse")
    assert all(
        torch.equal(g, h.grid().scale) for g, h in zip(grids, view.quantizers(), strict=True)
    )


def test_a_cell_key_names_the_ranges_only_where_they_differ_from_before():
    """Cells computed before the search (percentile below 8 bit) keep their keys; the search's
    cells, and other rules', get new ones; 8-bit cells never name it."""
    from qtta_plugins.bench.grid import quantize_spec

    assert quantize_spec("nncf", "w4a4", {}) == {
        "backend": "nncf",
        "bits": "w4a4",
        "act_ranges": "search",
    }
    assert quantize_spec("nncf", "w4a4", {"act_ranges": "percentile"}) == {
        "backend": "nncf",
        "bits": "w4a4",
    }
    assert quantize_spec("nncf", "w4a4", {"act_ranges": "min-max"})["act_ranges"] == "min-max"
    assert quantize_spec("nncf", "w8a8", {}) == {"backend": "nncf", "bits": "w8a8"}
    assert "act_ranges" in quantize_spec("nncf", "w8a8", {"first_last_bits": 4})

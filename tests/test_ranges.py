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

"""The shared range search (qtta_plugins.ranges) the adapters' MSE ranges go through."""

from __future__ import annotations

import pytest
import torch

from qtta_plugins.ranges import least_error_ratio, symmetric_weight_error


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

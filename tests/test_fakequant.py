"""The one fake-quantization function (qtta_plugins.fakequant) and the places that use it."""

from __future__ import annotations

import torch

from qtta_plugins.fakequant import fake_quant, round_ste
from qtta_plugins.view import Grid, fake_quantize


def test_rounds_half_to_even_clamps_and_keeps_grid_values():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, 100.0, -100.0, 3.0])
    assert fake_quant(x, 1.0, None, -8, 7).tolist() == [0.0, 2.0, 2.0, -0.0, 7.0, -8.0, 3.0]
    # an asymmetric grid: the zero point shifts the integer range, not the values on the grid
    y = fake_quant(torch.tensor([0.0, 0.25, 1.0, 9.0]), 0.25, 4.0, 0, 15)
    assert y.tolist() == [0.0, 0.25, 1.0, 2.75]


def test_no_zero_point_is_a_zero_point_of_zero_bit_for_bit():
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 3
    scale = torch.rand(64, 1, generator=torch.Generator().manual_seed(1)) + 0.05
    assert torch.equal(fake_quant(x, scale, None, -7, 7), fake_quant(x, scale, 0.0, -7, 7))


def test_the_straight_through_form_computes_the_same_and_passes_gradients():
    x = torch.linspace(-3, 3, 61, requires_grad=True)
    scale = torch.tensor(0.1, requires_grad=True)
    y = fake_quant(x, scale, None, -8, 7, ste=True)
    assert torch.equal(y.detach(), fake_quant(x.detach(), 0.1, None, -8, 7))
    y.sum().backward()
    inside = (x.detach() / 0.1 >= -8) & (x.detach() / 0.1 <= 7)
    # the gradient on x is the identity inside the range and zero where the clamp bites
    assert torch.equal(x.grad, inside.float())
    assert scale.grad is not None and scale.grad != 0  # LSQ's step-size gradient
    # without the straight-through round, the gradient on x is zero everywhere
    x2 = x.detach().clone().requires_grad_()
    fake_quant(x2, 0.1, None, -8, 7).sum().backward()
    assert torch.count_nonzero(x2.grad) == 0
    assert torch.equal(round_ste(torch.tensor([0.4, 0.6])), torch.tensor([0.0, 1.0]))


def test_the_views_reference_function_is_it_along_the_channel_axis():
    grid = Grid(
        scale=torch.tensor([0.1, 0.5]),
        zero_point=torch.tensor([0.0, 3.0]),
        qmin=0,
        qmax=15,
        ch_axis=1,
    )
    x = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(0))
    expected = torch.stack(
        [fake_quant(x[:, c], grid.scale[c], grid.zero_point[c], 0, 15) for c in range(2)], 1
    )
    assert torch.equal(fake_quantize(x, grid), expected)

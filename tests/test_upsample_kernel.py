"""Exactness of the bilateral kernel maths against slow, obviously-correct implementations."""
import math

import pytest
import torch

from coz_core.upsample import BilateralKernels
from coz_core.upsample.grid import Grid
from coz_core.upsample.kernel import FitBand, coefficients, pad_lr, window
from tests.upsample_fixtures import dense_upsample, slow_upsample


def random_maps(b, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return (1.0 + 3.0 * torch.rand(b, h, w, generator=g), 1.0 + 3.0 * torch.rand(b, h, w, generator=g),
            (torch.rand(b, h, w, generator=g) * 2 - 1) * math.pi, 0.1 + 0.4 * torch.rand(b, h, w, generator=g))


def gradient_case():
    """(hr, lr, guide, signal, guide_lr, upstream gradient, maps wanting gradients): a small fit, batch 2."""
    b, hr, lr = 2, (11, 9), (4, 3)
    torch.manual_seed(3)
    guide, signal, guide_lr = torch.rand(b, 3, *hr), torch.rand(b, 3, *lr), torch.rand(b, 3, *lr)
    upstream = torch.randn(b, 3, *hr)
    return hr, lr, guide, signal, guide_lr, upstream, [m.requires_grad_(True) for m in random_maps(b, *lr, seed=4)]


def assert_gradients_match_dense(ours, maps, signal, guide, guide_lr, upstream) -> torch.Tensor:
    """``ours`` (the maps' gradients) against autograd of the dense formula in float64; returns its output."""
    for m in maps:
        m.grad = None
    dense = dense_upsample(signal, guide, guide_lr, *(m.double() for m in maps))
    (dense * upstream.double()).sum().backward()
    for mine, ref in zip(ours, (m.grad for m in maps)):
        torch.testing.assert_close(mine, ref.float(), rtol=2e-3, atol=2e-3 * float(ref.abs().max()))
    return dense.detach()


@pytest.mark.parametrize("hr, lr", [((8, 8), (4, 2)), ((11, 9), (4, 3)), ((7, 10), (7, 3))])
def test_grid_round_trip_and_nearest_cell(hr, lr):
    grid = Grid.build(hr, lr)
    image = torch.rand(2, 3, *hr)
    assert torch.equal(grid.from_cells(grid.to_cells(image)), image)
    bands = [grid.from_cells(grid.to_cells(image, (lo, min(lo + 2, lr[0]))), (lo, min(lo + 2, lr[0])))
             for lo in range(0, lr[0], 2)]
    assert torch.equal(torch.cat(bands, 2), image)
    for axis in (grid.y, grid.x):  # every HR pixel sits in the cell whose centre is nearest
        centres = (torch.arange(axis.lr) + 0.5) * axis.hr / axis.lr - 0.5
        for y in range(axis.hr):
            cell = int(axis.inverse[y]) // axis.width
            assert abs(y - centres[cell]) <= (centres - y).abs().min() + 1e-9


@pytest.mark.parametrize("hr, lr, channels", [((8, 8), (2, 2), 1), ((11, 9), (4, 3), 3), ((10, 7), (5, 7), 2)])
def test_apply_matches_slow_reference(hr, lr, channels):
    b = 2
    torch.manual_seed(0)
    guide, signal = torch.rand(b, 3, *hr), torch.randn(b, channels, *lr)
    guide_lr = torch.rand(b, 3, *lr)
    sx, sy, th, sr = random_maps(b, *lr, seed=1)
    # a window wider than the grid: every cell is a neighbour, as in the slow reference
    k = BilateralKernels(sx, sy, th, sr, guide, guide_lr, truncate=1e3, radius_max=16)
    ours = k.apply(signal)
    ref = slow_upsample(signal, guide, guide_lr, sx, sy, th, sr)
    assert ours.dtype == torch.float32 and ours.shape == (b, channels, *hr)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)


def test_gradient_matches_autograd_of_dense_formula():
    hr, lr, guide, signal, guide_lr, upstream, maps = gradient_case()
    grid = Grid.build(hr, lr)
    rows = (0, lr[0])
    cells = grid.to_cells(guide, rows)
    coef = coefficients(*maps)
    pad = 16
    grad = torch.zeros(guide.shape[0], 4, lr[0] + 2 * pad, lr[1] + 2 * pad)
    band = FitBand(grid, window(grid, 1e3, pad), rows, pad, pad_lr(coef.detach(), pad), cells, guide_lr,
                   signal, grad, cache_range=True)
    weights, out = band.forward(band.shifts)
    grad_out = grid.to_cells(upstream) * grid.valid_cells(rows, guide.device)  # padded slots: no loss
    band.accumulate_grad(weights, band.shifts, grad_out)
    coef.backward(grad[:, :, pad:-pad, pad:-pad])
    ours = [m.grad.clone() for m in maps]
    torch.testing.assert_close(grid.from_cells(out), BilateralKernels(
        *(m.detach() for m in maps), guide, guide_lr, truncate=1e3, radius_max=16).apply(signal))
    assert_gradients_match_dense(ours, maps, signal, guide, guide_lr, upstream)


def test_window_covers_reach_and_stays_in_disc():
    grid = Grid.build((64, 48), (16, 8))  # scales 4 and 6
    offsets = set(window(grid, reach=9.0, radius_max=8))
    for dy in range(-8, 9):
        for dx in range(-8, 9):
            # the nearest pixel of cell (dy, dx) to a pixel of cell 0 is at least this far
            near = math.hypot(max(abs(dy) - 0.5, 0) * 4, max(abs(dx) - 0.5, 0) * 6)
            assert ((dy, dx) in offsets) == (near <= 9.0)
    assert all(dy * dy + dx * dx <= 4 for dy, dx in window(grid, reach=1e3, radius_max=2))
    assert len(window(Grid.build((64, 48), (16, 9)), reach=1e3, radius_max=8)) == 197  # the reference's R = 8 disc
    assert max(abs(dx) for _, dx in window(grid, reach=1e3, radius_max=8)) == 7  # no cell has a neighbour 8 away


def test_weights_are_exact_where_energies_are_huge():
    """Energies far beyond exp's range: the smallest-energy shift keeps the result exact."""
    hr, lr = (8, 8), (2, 2)
    guide = torch.zeros(1, 1, *hr)
    guide[..., :, 4:] = 1.0
    guide_lr = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])
    signal = torch.tensor([[[[-3.0, 5.0], [-3.0, 5.0]]]])
    tiny = torch.full((1, *lr), 1e-3)  # sigma_r 1e-3: energies ~ 5e5 across the edge
    k = BilateralKernels(torch.full((1, *lr), 2.0), torch.full((1, *lr), 2.0), torch.zeros(1, *lr), tiny,
                         guide, guide_lr, truncate=1e3, radius_max=4)
    out = k.apply(signal)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[..., :4], torch.full_like(out[..., :4], -3.0), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[..., 4:], torch.full_like(out[..., 4:], 5.0), rtol=0, atol=1e-6)

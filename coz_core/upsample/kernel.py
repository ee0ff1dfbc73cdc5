"""The kernel maths of Upsample Anything, streamed over neighbours.

Every LR cell q owns an anisotropic Gaussian (sigma_x, sigma_y in HR pixels, rotated by theta)
and a range width sigma_r. An HR pixel p takes from each LR neighbour q in a window the weight

    w(p, q) = exp(-E(p, q)),   E = x'^2 / (2 sigma_x^2) + y'^2 / (2 sigma_y^2)
                                 + |guide_hr(p) - guide_lr(q)|^2 / (2 sigma_r^2)

where (x', y') is p's offset from q's centre rotated by theta, and the output is the
normalised sum ``sum_q w(p, q) signal(q) / sum_q w(p, q)``. The spatial part is written as a
quadratic form ``a dx^2 + b dy^2 + c dx dy`` with per-cell coefficients (``coefficients``), so
the per-pair work is a few multiply-adds.

Neighbours are visited one LR offset (a "shift") at a time in the cell layout of ``grid``: the
neighbour's maps are the LR maps shifted (edge-padded by the window radius), broadcast over the
HR pixels of each cell; every op covers all pixels of a band at once, on contiguous memory.
Neighbours that fall outside the LR grid get an enormous range term, hence weight ~1e-18, and
their gradients land in the padding, which is dropped. Nothing of size (HR pixels x neighbours
x channels) exists; weights are held for one band of LR rows at a time. Normalisation subtracts
each pixel's smallest energy first (exact, no overflow) and divides once at the end. The gradient
of the energies is written by hand (``FitBand.accumulate_grad``), so fitting needs no autograd
graph over the HR image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .grid import Grid

# exp() floor: keeps exp and the gradient products out of denormals (100x slower on CPUs);
# changes results by < 1e-15 relative since the best neighbour always has weight 1
_LOG_FLOOR = -40.0
_OUTSIDE = 1e20  # range term of neighbours outside the LR grid


def coefficients(sigma_x: torch.Tensor, sigma_y: torch.Tensor, theta: torch.Tensor,
                 sigma_r: torch.Tensor) -> torch.Tensor:
    """Per-cell maps [B, h, w] -> energy coefficients [B, 4, h, w]: (a, b, c, d) with
    E = a dx^2 + b dy^2 + c dx dy + d |dg|^2."""
    ix, iy = 0.5 / sigma_x.square(), 0.5 / sigma_y.square()
    cos, sin = torch.cos(theta), torch.sin(theta)
    a = cos.square() * ix + sin.square() * iy
    b = sin.square() * ix + cos.square() * iy
    c = 2.0 * cos * sin * (ix - iy)
    return torch.stack([a, b, c, 0.5 / sigma_r.square()], dim=1)


def window(grid: Grid, reach: float, radius_max: int) -> list[tuple[int, int]]:
    """LR offsets (dy, dx) whose cells can hold pixels within ``reach`` HR pixels of a pixel of
    the centre cell (a pixel lies within half a cell of its cell's centre), within the disc
    dy^2 + dx^2 <= radius_max^2 (the reference's largest window), leaving out offsets that
    no cell of the LR grid has a neighbour at."""
    ry, rx = reach / grid.y.scale, reach / grid.x.scale
    out = []
    for dy in range(-min(radius_max, grid.y.lr - 1), min(radius_max, grid.y.lr - 1) + 1):
        for dx in range(-min(radius_max, grid.x.lr - 1), min(radius_max, grid.x.lr - 1) + 1):
            ey = max(abs(dy) - 0.5, 0.0) / ry
            ex = max(abs(dx) - 0.5, 0.0) / rx
            if ey * ey + ex * ex <= 1.0 and dy * dy + dx * dx <= radius_max * radius_max:
                out.append((dy, dx))
    return out


def pad_lr(lr_map: torch.Tensor, pad: int) -> torch.Tensor:
    """Edge-pad LR maps [B, C, h, w] by ``pad`` cells on every side (shifts index into this)."""
    return F.pad(lr_map, (pad, pad, pad, pad), mode="replicate")


@dataclass
class Shift:
    """One LR offset over one band of LR rows [lo, hi), with views into the band's buffers
    (``Band`` binds them)."""

    dy: int
    dx: int
    lr_rows: slice  # the neighbours' rows in the padded LR maps
    lr_cols: slice
    ty: torch.Tensor  # [Ly, 1, n, 1] HR offset along y from the neighbour's centre
    tx: torch.Tensor  # [Lx, 1, m] same along x
    ty2: torch.Tensor  # squares of both
    tx2: torch.Tensor
    outside: torch.Tensor | None  # [n, m] bool: the neighbour is off the LR grid (None: never)
    rng: torch.Tensor | None = None  # cached range term [B, Ly, Lx, n, m], if any
    views: dict[str, Any] = field(default_factory=dict)


def band_shifts(grid: Grid, offsets: list[tuple[int, int]], rows: tuple[int, int], pad: int,
                device: torch.device) -> list[Shift]:
    """The shifts that reach at least one cell of the band from inside the LR grid."""
    lo, hi = rows
    h, w = grid.lr_size
    out = []
    for dy, dx in offsets:
        i, j = torch.arange(lo, hi) + dy, torch.arange(w) + dx
        off_y, off_x = (i < 0) | (i >= h), (j < 0) | (j >= w)
        if off_y.all() or off_x.all():
            continue
        outside = off_y[:, None] | off_x[None, :]
        ty = grid.y.offsets_from_centre(dy, lo, hi).float().T[:, None, :, None].contiguous().to(device)
        tx = grid.x.offsets_from_centre(dx, 0, w).float().T[:, None, :].contiguous().to(device)
        out.append(Shift(dy, dx, slice(lo + dy + pad, hi + dy + pad), slice(dx + pad, dx + pad + w),
                         ty, tx, ty.square(), tx.square(), outside.to(device) if outside.any() else None))
    return out


def _lr_block(padded: torch.Tensor, s: Shift) -> torch.Tensor:
    """Padded LR maps [B, C, h + 2p, w + 2p] -> the shift's neighbours [B, C, 1, 1, n, w] for
    broadcasting over slots."""
    return padded[:, :, None, None, s.lr_rows, s.lr_cols]


def range_term(guide_cells: torch.Tensor, guide_lr_padded: torch.Tensor, s: Shift) -> torch.Tensor:
    """|guide_hr(p) - guide_lr(q)|^2: [B, Ly, Lx, n, w]; ``_OUTSIDE`` off the grid."""
    rng = (guide_cells - _lr_block(guide_lr_padded, s)).square_().sum(1)
    return rng if s.outside is None else rng.masked_fill_(s.outside, _OUTSIDE)


class Band:
    """One band of LR rows: its shifts and their weights.

    ``coef_padded`` ([B, 4, h, w] coefficients through ``pad_lr``) is read through views made
    once (update it in place between calls): at these sizes, making a view costs about as much
    as the arithmetic on it. ``guide_cells`` is the band of the guide [B, Cg, Ly, Lx, n, w],
    ``guide_lr`` the LR guide [B, Cg, h, w].
    """

    def __init__(self, grid: Grid, offsets: list[tuple[int, int]], rows: tuple[int, int], pad: int,
                 coef_padded: torch.Tensor, guide_cells: torch.Tensor, guide_lr: torch.Tensor,
                 cache_range: bool = False):
        self.rows, self.pad, self.cells = rows, pad, guide_cells
        self.guide_lr = pad_lr(guide_lr, pad)
        self.shifts = band_shifts(grid, offsets, rows, pad, coef_padded.device)
        b, _, ly, lx, n, m = guide_cells.shape
        self.e_min = torch.empty(b, ly, lx, n, m, device=coef_padded.device, dtype=coef_padded.dtype)
        self.total = torch.empty_like(self.e_min)
        for s in self.shifts:
            s.views["coef"] = _lr_block(coef_padded, s).unbind(1)
            if cache_range:
                s.rng = range_term(guide_cells, self.guide_lr, s)

    def _range(self, s: Shift) -> torch.Tensor:
        return s.rng if s.rng is not None else range_term(self.cells, self.guide_lr, s)

    def weights(self, shifts: list[Shift]) -> list[torch.Tensor]:
        """Unnormalised weights of ``shifts`` (a subset of the band's); their per-pixel sum is
        left in ``self.total``. Each pixel's smallest energy is subtracted before
        exponentiating: the best neighbour gets weight 1, so the total is >= 1 and nothing
        overflows."""
        self.e_min.fill_(math.inf)
        energies = []
        for s in shifts:
            a, b, c, d = s.views["coef"]
            e = torch.mul(d, self._range(s))  # the fastest order of these broadcasts
            e.addcmul_(c * s.ty, s.tx)
            e += b * s.ty2
            e += a * s.tx2
            torch.minimum(self.e_min, e, out=self.e_min)
            energies.append(e)
        self.total.zero_()
        for e in energies:
            torch.sub(self.e_min, e, out=e).clamp_(min=_LOG_FLOOR).exp_()  # e -> weight
            self.total += e
        return energies

    def weighted_sum(self, weights: list[torch.Tensor], shifts: list[Shift], signal_lr: torch.Tensor,
                     out: torch.Tensor) -> torch.Tensor:
        """out[B, C, Ly, Lx, n, w] = normalised sum over shifts of weight * shifted signal."""
        padded = pad_lr(signal_lr.to(out.dtype), self.pad)
        for s, w in zip(shifts, weights):
            out.addcmul_(w[:, None], _lr_block(padded, s))
        return out.div_(self.total[:, None].to(out.dtype))


class FitBand(Band):
    """A band that also upsamples one fixed signal (the LR guide) and back-propagates to the
    coefficients, with persistent buffers and views for all of it. Gradients go to
    ``grad_padded`` ([B, 4, h + 2p, w + 2p]; the caller drops the padding)."""

    def __init__(self, grid: Grid, offsets: list[tuple[int, int]], rows: tuple[int, int], pad: int,
                 coef_padded: torch.Tensor, guide_cells: torch.Tensor, guide_lr: torch.Tensor,
                 signal_lr: torch.Tensor, grad_padded: torch.Tensor, cache_range: bool):
        super().__init__(grid, offsets, rows, pad, coef_padded, guide_cells, guide_lr, cache_range)
        self.out = torch.empty(guide_cells.shape[0], signal_lr.shape[1], *guide_cells.shape[2:],
                               device=coef_padded.device, dtype=coef_padded.dtype)
        self.g = torch.empty_like(self.out)
        self.neg_g_dot_out = torch.empty_like(self.e_min)
        signal = pad_lr(signal_lr, pad)
        for s in self.shifts:
            block = _lr_block(signal, s)
            s.views.update(signal_block=block, signal=block.unbind(1),
                           grad=grad_padded[:, :, s.lr_rows, s.lr_cols])
        self.g_channels = self.g.unbind(1)

    def forward(self, shifts: list[Shift]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(weights, the normalised output in ``self.out``)."""
        ws = self.weights(shifts)
        self.out.zero_()
        for s, w in zip(shifts, ws):
            self.out.addcmul_(w[:, None], s.views["signal_block"])
        return ws, self.out.div_(self.total[:, None])

    def accumulate_grad(self, weights: list[torch.Tensor], shifts: list[Shift],
                        grad_out: torch.Tensor) -> None:
        """Add d(loss)/d(coef) to the bound gradient given d(loss)/d(out) over the band.

        With P = weight / total, d out / d E_k = -P_k (signal_k - out), so
        -d loss / d E_k = P_k (g . signal_k - g . out) for the upstream gradient g; the chain
        to (a, b, c, d) multiplies by (dx^2, dy^2, dx dy, |dg|^2) and sums over each cell's
        pixels.
        """
        torch.div(grad_out, self.total[:, None], out=self.g)
        torch.sum(self.g * self.out, 1, out=self.neg_g_dot_out).neg_()
        g = self.g_channels
        for s, w in zip(shifts, weights):
            sig = s.views["signal"]
            t = torch.addcmul(self.neg_g_dot_out, g[0], sig[0])
            for ch in range(1, len(sig)):
                t.addcmul_(g[ch], sig[ch])
            t.mul_(w)  # = -d loss / d E, [B, Ly, Lx, n, w]
            ga = (t.sum(1) * s.tx2).sum(1)
            gb = (t.sum(2) * s.ty2[:, 0]).sum(1)
            gc = ((t * s.ty).sum(1) * s.tx).sum(1)
            gd = t.mul_(self._range(s)).sum((1, 2))
            s.views["grad"].sub_(torch.stack([ga, gb, gc, gd], 1))

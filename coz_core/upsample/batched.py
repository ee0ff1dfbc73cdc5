"""The kernel maths of ``kernel.py`` with every neighbour at once: few, large ops (for GPUs).

The banded path (``kernel.py``) visits one LR offset at a time with a few dozen small ops each,
launch-bound on a GPU (torch.profiler counts 10,600 aten calls per fitting step at the 197
offset window). Here a band of LR rows is laid out cell-major, [B, n, w, K, Ly, Lx] (LR cell,
neighbour, slot inside the cell), so a fitting step is about 450 aten calls (views, autograd of
the small parameter maps and Adam included) whatever the window:

- the neighbours' coefficients and signal values are one gather each (``idx``: flat index of
  every (cell, neighbour) pair in the edge-padded LR maps);
- energies are four broadcast multiply-adds, weights a min, an exp and a sum over K;
- the weighted sum is one batched matmul per LR cell: [C, K] @ [K, Ly * Lx];
- the hand-written gradient (the same formulas as ``FitBand.accumulate_grad``) is one more
  batched matmul, a few reductions and one ``index_add_`` back onto the padded maps.

Offsets are sorted by how near their cell can come to the centre cell, so the window a
fitting step uses (``window`` at the current reach) is a prefix: a slice, never a gather.
Results equal the banded path's to float rounding (tests compare both on CPU).
"""
from __future__ import annotations

import math

import torch

from .grid import Grid
from .kernel import _LOG_FLOOR, _OUTSIDE, pad_lr


def nearness(grid: Grid, offset: tuple[int, int]) -> float:
    """The HR distance below which ``window`` includes ``offset`` (its cell's nearest pixel to
    the centre cell, as ``window`` measures it)."""
    dy, dx = offset
    return math.hypot(max(abs(dy) - 0.5, 0.0) * grid.y.scale, max(abs(dx) - 0.5, 0.0) * grid.x.scale)


def sort_offsets(grid: Grid, offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return sorted(offsets, key=lambda o: (nearness(grid, o), o))


def prefix(grid: Grid, sorted_offsets: list[tuple[int, int]], active: list[tuple[int, int]]) -> int:
    """How many of ``sorted_offsets`` a window ``active`` (from ``window``, a subset) covers."""
    n = len(active)
    if set(sorted_offsets[:n]) != set(active):  # ties in nearness are all in or all out
        raise AssertionError("the active window is not a prefix of the sorted offsets")
    return n


class BatchedBand:
    """One band of LR rows [lo, hi) with all ``offsets`` (sorted by ``sort_offsets``) at once.

    ``guide`` is the HR guide [B, Cg, H, W], ``guide_lr`` the LR range guide [B, Cg, h, w];
    ``pad`` the edge padding of the coefficient maps passed to ``weights``.
    """

    def __init__(self, grid: Grid, offsets: list[tuple[int, int]], rows: tuple[int, int], pad: int,
                 guide: torch.Tensor, guide_lr: torch.Tensor, cache_range: bool = False):
        self.grid, self.rows, self.pad = grid, rows, pad
        lo, hi = rows
        h, w = grid.lr_size
        dev = guide.device
        self.n, self.w, self.ly, self.lx = hi - lo, w, grid.y.width, grid.x.width
        self.K = len(offsets)
        dy = torch.tensor([o[0] for o in offsets])
        dx = torch.tensor([o[1] for o in offsets])
        i, j = torch.arange(lo, hi), torch.arange(w)
        ni, nj = i[:, None, None] + dy, j[None, :, None] + dx  # [n, 1, K], [1, w, K]
        self.outside = (((ni < 0) | (ni >= h)) | ((nj < 0) | (nj >= w))).to(dev)  # [n, w, K]
        wp = w + 2 * pad
        self.idx = ((ni + pad) * wp + (nj + pad)).to(dev)  # [n, w, K] into the padded maps
        # HR offsets of every slot from each neighbour's centre
        ty = grid.y.offsets_from_centres(dy, lo, hi).transpose(0, 1)  # [n, K, Ly]
        tx = grid.x.offsets_from_centres(dx, 0, w).transpose(0, 1)  # [w, K, Lx]
        self.ty = ty.float()[:, None, :, :, None].contiguous().to(dev)  # [n, 1, K, Ly, 1]
        self.tx = tx.float()[:, :, None, :].contiguous().to(dev)  # [w, K, 1, Lx]
        self.ty2, self.tx2 = self.ty.square(), self.tx.square()
        # the guide in cell-major layout [B, Cg, n, w, Ly, Lx] and its neighbours' LR colours
        self.cells = grid.to_cell_major(guide, rows)
        self.guide_lr = pad_lr(guide_lr, pad)
        self.rng = self._range(self.K) if cache_range else None

    def gather(self, padded: torch.Tensor, k: int) -> torch.Tensor:
        """Padded LR maps [B, C, h + 2p, w + 2p] -> neighbour values [B, C, n, w, k]."""
        return padded.flatten(2)[:, :, self.idx[..., :k]]

    def _range(self, k: int) -> torch.Tensor:
        """|guide_hr(p) - guide_lr(q)|^2 [B, n, w, k, Ly, Lx]; ``_OUTSIDE`` off the grid."""
        near = self.gather(self.guide_lr, k)[..., None, None]  # [B, Cg, n, w, k, 1, 1]
        cells = self.cells[:, :, :, :, None]  # [B, Cg, n, w, 1, Ly, Lx]
        rng = (cells[:, 0] - near[:, 0]).square_()
        for c in range(1, cells.shape[1]):
            rng.add_((cells[:, c] - near[:, c]).square_())
        return rng.masked_fill_(self.outside[..., :k, None, None], _OUTSIDE)

    def range_term(self, k: int) -> torch.Tensor:
        return self.rng[:, :, :, :k] if self.rng is not None else self._range(k)

    def weights(self, coef_padded: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [B, n, w, k, Ly, Lx], their per-pixel sum [B, n, w, 1, Ly, Lx]) of the first
        ``k`` offsets; each pixel's smallest energy is subtracted first (the best neighbour gets
        weight 1, so nothing overflows)."""
        a, b, c, d = (m[..., None, None] for m in self.gather(coef_padded, k).unbind(1))  # [B, n, w, k, 1, 1]
        e = d * self.range_term(k)
        e.addcmul_(a, self.tx2[:, :k])
        e.addcmul_(b, self.ty2[:, :, :k])
        e.addcmul_(c * self.ty[:, :, :k], self.tx[:, :k])
        e_min = e.amin(3, keepdim=True)
        w = torch.sub(e_min, e, out=e).clamp_(min=_LOG_FLOOR).exp_()
        return w, w.sum(3, keepdim=True)

    def weighted_sum(self, w: torch.Tensor, total: torch.Tensor, signal_padded: torch.Tensor) -> torch.Tensor:
        """Normalised sum of the neighbours of ``signal_padded`` [B, C, h + 2p, w + 2p] under the
        weights ``w``: [B, n, w, C, Ly, Lx] (in ``w``'s dtype)."""
        k = w.shape[3]
        near = self.neighbours(signal_padded, k)  # [B, n, w, C, k]
        return self._matmul(near, w, total)

    def neighbours(self, signal_padded: torch.Tensor, k: int) -> torch.Tensor:
        return self.gather(signal_padded, k).permute(0, 2, 3, 1, 4)

    def _matmul(self, near: torch.Tensor, w: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        b, n, wd, c, k = near.shape
        cells, slots = b * n * wd, self.ly * self.lx
        out = torch.bmm(near.reshape(cells, c, k), w.reshape(cells, k, slots))
        return out.div_(total.reshape(cells, 1, slots)).view(b, n, wd, c, self.ly, self.lx)

    def accumulate_grad(self, w: torch.Tensor, total: torch.Tensor, near: torch.Tensor, out: torch.Tensor,
                        grad_out: torch.Tensor, grad_padded: torch.Tensor) -> None:
        """Add d(loss)/d(coef) to ``grad_padded`` [B, 4, h + 2p, w + 2p] given d(loss)/d(out)
        ``grad_out`` [B, n, w, C, Ly, Lx] (see ``FitBand.accumulate_grad`` for the formulas)."""
        b, n, wd, c, k = near.shape
        cells, slots = b * n * wd, self.ly * self.lx
        g = grad_out.reshape(cells, c, slots) / total.reshape(cells, 1, slots)
        g_out = (g * out.reshape(cells, c, slots)).sum(1, keepdim=True)
        t = torch.bmm(near.reshape(cells, c, k).transpose(1, 2), g)  # [cells, k, slots]
        t = t.sub_(g_out).mul_(w.reshape(cells, k, slots)).view(b, n, wd, k, self.ly, self.lx)  # -dloss/dE
        ga = (t.sum(4) * self.tx2[:, :k, 0]).sum(-1)
        gb = (t.sum(5) * self.ty2[:, :, :k, :, 0]).sum(-1)
        gc = ((t * self.ty[:, :, :k]).sum(4) * self.tx[:, :k, 0]).sum(-1)
        gd = (t.mul_(self.range_term(k))).sum((4, 5))
        grad = torch.stack([ga, gb, gc, gd], 1)  # [B, 4, n, w, k]
        grad_padded.flatten(2).index_add_(2, self.idx[..., :k].reshape(-1), grad.reshape(b, 4, -1), alpha=-1.0)

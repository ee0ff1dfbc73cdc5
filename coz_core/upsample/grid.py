"""Geometry of a guided upsampling: which low-res cell each high-res pixel falls in, and the
"cell layout" that groups high-res pixels by cell.

Along one axis, HR pixel ``Y`` (centre ``Y + 0.5``) falls in LR cell ``floor((Y + 0.5) * n / N)``
(the nearest LR centre), and LR cell ``i`` has its centre at HR coordinate
``(i + 0.5) * N / n - 0.5``. Any scale ``N / n >= 1`` works, integer or not.

Cells hold ``floor`` or ``ceil`` of ``N / n`` pixels. The cell layout pads every cell to the
largest count ``L`` and puts the slot first, so an image [B, C, H, W] becomes
[B, C, Ly, Lx, h, w]: Ly * Lx LR-sized images, one per position inside a cell. The neighbour of
every pixel at an LR offset (dy, dx) is then a plain shift of the LR maps, broadcast over the
slots, with no gathers, and the inner loops run along LR rows. Padded slots repeat a real pixel
of their cell; they are masked out of the fitting loss and dropped on the way back.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Axis:
    """One axis: ``hr`` pixels over ``lr`` cells."""

    hr: int
    lr: int
    index: torch.Tensor  # [lr, L] long: HR pixel held by each slot (padding repeats the last)
    valid: torch.Tensor  # [lr, L] bool: slot holds a real pixel
    inverse: torch.Tensor  # [hr] long: flat slot (cell * L + slot) of each HR pixel
    start: torch.Tensor  # [lr + 1] long: first HR pixel of each cell (and hr at the end)

    @staticmethod
    def build(hr: int, lr: int) -> "Axis":
        if lr < 1 or hr < lr:
            raise ValueError(f"an axis needs 1 <= low-res size <= high-res size, got {lr} -> {hr}")
        y = torch.arange(hr)
        cell = torch.div((2 * y + 1) * lr, 2 * hr, rounding_mode="floor")
        count = torch.bincount(cell, minlength=lr)
        start = torch.cat([torch.zeros(1, dtype=torch.long), count.cumsum(0)])
        width = int(count.max())
        slot = torch.arange(width)
        index = start[:-1, None] + torch.minimum(slot[None], count[:, None] - 1)
        inverse = cell * width + (y - start[cell])
        return Axis(hr, lr, index, slot[None] < count[:, None], inverse, start)

    @property
    def width(self) -> int:
        return self.index.shape[1]

    @property
    def scale(self) -> float:
        return self.hr / self.lr

    def offsets_from_centre(self, shift: int, lo: int, hi: int) -> torch.Tensor:
        """[hi - lo, L] float64: HR coordinate of each slot of cells lo..hi-1 minus the centre
        of the cell ``shift`` further on."""
        cells = torch.arange(lo, hi, dtype=torch.float64)
        centre = (cells + shift + 0.5) * self.scale - 0.5
        return self.index[lo:hi].double() - centre[:, None]

    def offsets_from_centres(self, shifts: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """``offsets_from_centre`` for many shifts at once: [len(shifts), hi - lo, L] float64."""
        cells = torch.arange(lo, hi, dtype=torch.float64)
        centre = (cells[None] + shifts.double()[:, None] + 0.5) * self.scale - 0.5
        return self.index[lo:hi].double()[None] - centre[..., None]

    def overlap(self, shift: int, lo: int, hi: int) -> tuple[int, int]:
        """Cells i in [lo, hi) whose neighbour i + shift exists: returns the (possibly empty)
        range."""
        return max(lo, -shift), min(hi, self.lr - shift)


@dataclass(frozen=True)
class Grid:
    """Both axes of an upsampling from (h, w) to (H, W)."""

    y: Axis
    x: Axis

    @staticmethod
    def build(hr_size: tuple[int, int], lr_size: tuple[int, int]) -> "Grid":
        return Grid(Axis.build(hr_size[0], lr_size[0]), Axis.build(hr_size[1], lr_size[1]))

    @property
    def hr_size(self) -> tuple[int, int]:
        return self.y.hr, self.x.hr

    @property
    def lr_size(self) -> tuple[int, int]:
        return self.y.lr, self.x.lr

    def to_cells(self, image: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """[B, C, H, W] -> [B, C, Ly, Lx, n, w] for the LR rows ``rows`` (all by default)."""
        lo, hi = rows if rows is not None else (0, self.y.lr)
        b, c = image.shape[:2]
        iy = self.y.index[lo:hi].T.reshape(-1).to(image.device)
        ix = self.x.index.T.reshape(-1).to(image.device)
        cells = image.index_select(2, iy).index_select(3, ix)
        cells = cells.view(b, c, self.y.width, hi - lo, self.x.width, self.x.lr)
        return cells.transpose(3, 4).contiguous()

    def from_cells(self, cells: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Inverse of ``to_cells``: [B, C, Ly, Lx, n, w] -> [B, C, HR rows of those cells, W]."""
        lo, hi = rows if rows is not None else (0, self.y.lr)
        b, c, ly, lx, n, w = cells.shape
        y0, y1 = int(self.y.start[lo]), int(self.y.start[hi])
        # flat position of each HR pixel in the [Ly * n] and [Lx * w] orders of the layout
        iy = self.y.inverse[y0:y1] - lo * ly
        iy = ((iy % ly) * n + iy // ly).to(cells.device)
        ix = self.x.inverse
        ix = ((ix % lx) * w + ix // lx).to(cells.device)
        flat = cells.transpose(3, 4).reshape(b, c, ly * n, lx * w)
        return flat.index_select(2, iy).index_select(3, ix)

    def to_cell_major(self, image: torch.Tensor, rows: tuple[int, int]) -> torch.Tensor:
        """[B, C, H, W] -> [B, C, n, w, Ly, Lx] for the LR rows ``rows``: cell first, then the
        slot inside it (the layout of ``batched``)."""
        lo, hi = rows
        b, c = image.shape[:2]
        iy = self.y.index[lo:hi].reshape(-1).to(image.device)
        ix = self.x.index.reshape(-1).to(image.device)
        cells = image.index_select(2, iy).index_select(3, ix)
        cells = cells.view(b, c, hi - lo, self.y.width, self.x.lr, self.x.width)
        return cells.transpose(3, 4).contiguous()

    def from_cell_major(self, cells: torch.Tensor, rows: tuple[int, int]) -> torch.Tensor:
        """[B, n, w, C, Ly, Lx] -> [B, C, HR rows of those cells, W]. In this layout HR pixel Y
        sits at flat position ``inverse[Y]`` (cell * L + slot), so only padded slots need a
        gather."""
        lo, hi = rows
        b, n, w, c, ly, lx = cells.shape
        flat = cells.permute(0, 3, 1, 4, 2, 5).reshape(b, c, n * ly, w * lx)
        y0, y1 = int(self.y.start[lo]), int(self.y.start[hi])
        if y1 - y0 != n * ly:
            flat = flat.index_select(2, (self.y.inverse[y0:y1] - lo * ly).to(cells.device))
        if self.x.hr != w * lx:
            flat = flat.index_select(3, self.x.inverse.to(cells.device))
        return flat

    def valid_cells(self, rows: tuple[int, int], device: torch.device) -> torch.Tensor:
        """[Ly, Lx, n, w] bool: which slots of the cell layout hold real pixels."""
        vy = self.y.valid[rows[0]:rows[1]].T.to(device)  # [Ly, n]
        vx = self.x.valid.T.to(device)  # [Lx, w]
        return vy[:, None, :, None] & vx[None, :, None, :]

    def valid_cell_major(self, rows: tuple[int, int], device: torch.device) -> torch.Tensor:
        """[n, w, 1, Ly, Lx] bool: ``valid_cells`` in the cell-major layout (broadcast over C)."""
        return self.valid_cells(rows, device).permute(2, 3, 0, 1)[:, :, None]

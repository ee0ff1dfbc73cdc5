"""Tiles for models too large to run on a whole image at once: the pack's one tiling module.

Two strategies (as UltimateSDUpscale names its seam fixes):

- ``context_tiled_map``: disjoint tiles, each run with extra context on every side of which only
  the centre is kept. No blending: exact where the model's reach is within the context (the
  upscale models: Real-ESRGAN's influence fades to ~1e-3 at 64 pixels).
- ``tiled_map``: overlapping tiles blended with smooth weights (for models whose output would
  show a seam when cut, e.g. the VAE of the SD3 backbone); the whole-image engine streams tiles
  with the same ``ramp`` weights.

``tiled_map(fn, x, ...)`` cuts ``x`` [B, C, H, W] into overlapping tiles, runs ``fn`` on each
(``fn`` may change the channel count and scale the size, e.g. a VAE encoder by 1/8 or a decoder
by 8) and blends the outputs with weights that are 1 inside a tile and fall smoothly to exactly
0 at edges shared with a neighbour (a zero margin, then a raised-cosine ramp). Image borders get
no ramp. Where ``fn`` is local with a reach within that margin, the result equals the untiled one.
"""
from __future__ import annotations

import math
from typing import Callable

import torch


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of tiles of ``tile`` cells covering ``length`` with at least ``overlap`` shared."""
    if tile >= length:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be between 0 and the tile size ({tile}), got {overlap}")
    n = math.ceil((length - overlap) / (tile - overlap))
    # even spacing, aligned down; alignment can only shrink the gaps, so coverage holds
    return [min((round(i * (length - tile) / (n - 1)) // align) * align, length - tile) for i in range(n)]


def ramp(size: int, overlap: int, rise: bool, fall: bool, device, dtype) -> torch.Tensor:
    """1-D weights: 1 in the middle, 0 -> 1 over ``overlap`` cells at a shared edge (zero margin first)."""
    w = torch.ones(size, device=device, dtype=dtype)
    if overlap <= 0:
        return w
    margin = overlap // 4
    length = max(overlap - 2 * margin, 1)
    t = (torch.arange(overlap, device=device, dtype=dtype) - margin + 0.5) / length
    edge = 0.5 - 0.5 * torch.cos(math.pi * t.clamp(0, 1))
    if rise:
        w[:overlap] = torch.minimum(w[:overlap], edge)
    if fall:
        w[size - overlap:] = torch.minimum(w[size - overlap:], edge.flip(0))
    return w


def tiled_map(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    overlap: int,
    scale: float = 1.0,
    align: int = 1,
) -> torch.Tensor:
    """``fn`` applied to ``x`` [B, C, H, W] tile by tile (``tile``/``overlap`` in input cells), blended.

    ``scale`` is the output/input size ratio of ``fn``; ``align`` keeps tile offsets and sizes on
    multiples the model needs (e.g. 8 pixels for a VAE encoder). A tile at least as large as the
    input means one call of ``fn`` on the whole input.
    """
    h, w = x.shape[-2:]
    if tile <= 0 or (tile >= h and tile >= w):
        return fn(x)
    tile = max(align, tile // align * align)
    tile_h, tile_w = min(tile, h), min(tile, w)
    ys, xs = tile_starts(h, tile_h, overlap, align), tile_starts(w, tile_w, overlap, align)
    out = weight = None
    for y in ys:
        for x0 in xs:
            piece = fn(x[..., y:y + tile_h, x0:x0 + tile_w])
            if out is None:
                oh, ow = round(h * scale), round(w * scale)
                out = torch.zeros(*piece.shape[:-2], oh, ow, device=piece.device, dtype=torch.float32)
                weight = torch.zeros(oh, ow, device=piece.device, dtype=torch.float32)
            ph, pw = piece.shape[-2:]
            if (ph, pw) != (round(tile_h * scale), round(tile_w * scale)):
                raise ValueError(f"a {tile_h}x{tile_w} tile gave {ph}x{pw}, expected the tile scaled by {scale}")
            oy, ox = round(y * scale), round(x0 * scale)
            ov_h = ov_w = round(overlap * scale)
            wy = ramp(ph, ov_h, y > 0, y + tile_h < h, piece.device, torch.float32)
            wx = ramp(pw, ov_w, x0 > 0, x0 + tile_w < w, piece.device, torch.float32)
            w2 = wy[:, None] * wx[None, :]
            out[..., oy:oy + ph, ox:ox + pw] += piece.float() * w2
            weight[oy:oy + ph, ox:ox + pw] += w2
    return out / weight  # float32


def spans(length: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` disjoint spans covering ``length`` cells, as even as integers allow."""
    edges = [round(i * length / parts) for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


def context_tiled_map(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    context: int,
    scale: int = 1,
) -> torch.Tensor:
    """``fn`` (output ``scale`` times the input size) applied to ``x`` [B, C, H, W] in disjoint
    tiles of at most ``tile`` cells, each run with ``context`` extra cells on every side (fewer at
    the image border) of which only the centre is kept. Returns float32."""
    _, _, h, w = x.shape
    out = None
    for y0, y1 in spans(h, math.ceil(h / tile)):
        for x0, x1 in spans(w, math.ceil(w / tile)):
            cy0, cy1 = max(y0 - context, 0), min(y1 + context, h)
            cx0, cx1 = max(x0 - context, 0), min(x1 + context, w)
            piece = fn(x[..., cy0:cy1, cx0:cx1])
            if out is None:
                out = torch.empty(*piece.shape[:-2], h * scale, w * scale, device=piece.device, dtype=torch.float32)
            out[..., y0 * scale:y1 * scale, x0 * scale:x1 * scale] = piece[
                ..., (y0 - cy0) * scale:(y1 - cy0) * scale, (x0 - cx0) * scale:(x1 - cx0) * scale]
    return out

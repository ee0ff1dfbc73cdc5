"""Pillow's bicubic resize of 8-bit images, bit for bit, in torch: on a GPU, where the images are.

Pillow (``libImaging/Resample.c``) resizes in two separable passes. An output pixel is a weighted
sum of the input pixels in its window: the bicubic kernel (a = -0.5), widened by the reduction
factor, sampled in float64, normalised to sum 1 and rounded to 22-bit fixed point. Each pass adds
half a unit, shifts right and clips to 0..255 (the intermediate image is 8-bit too). Here the same
fixed-point weights are applied tap by tap, in int64: every product and sum is exact, so every
pixel equals Pillow's (tests compare them over many sizes). A window holds about five taps near the
VLM's sizes, so a pass is a few gathers and multiply-adds: no float64, which most GPUs other than
data-centre ones run at 1/64 of their float32 rate.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

PRECISION_BITS = 32 - 8 - 2  # Resample.c: fixed-point weights for 8-bit images
SUPPORT = 2.0  # of the bicubic kernel


def _kernel(x: np.ndarray) -> np.ndarray:
    """Resample.c's ``bicubic_filter`` (a = -0.5), the same float64 operations in the same order."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def weights(in_size: int, out_size: int) -> np.ndarray:
    """The int64 [out_size, in_size] fixed-point weights of one pass (``precompute_coeffs`` and
    ``normalize_coeffs_8bpc``); the weights Pillow leaves out of a pixel's window are zero."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = SUPPORT * filterscale
    ksize = math.ceil(support) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)  # C's (int) truncates
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - first
    taps = np.arange(ksize)
    inside = taps[None, :] < count[:, None]
    w = np.where(inside, _kernel(((taps[None, :] + first[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale)), 0.0)
    total = np.zeros(out_size)
    for tap in range(ksize):  # summed tap by tap, in Pillow's order (not numpy's pairwise sum)
        total = total + w[:, tap]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    fixed = np.trunc(np.where(w < 0, -0.5, 0.5) + w * (1 << PRECISION_BITS)).astype(np.int64)
    matrix = np.zeros((out_size, in_size), dtype=np.int64)
    rows = np.broadcast_to(np.arange(out_size)[:, None], fixed.shape)
    columns = first[:, None] + taps[None, :]
    matrix[rows[inside], columns[inside]] = fixed[inside]
    return matrix


@lru_cache(maxsize=8)  # a chain resizes to one or two sizes
def _taps(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each output pixel's window as int64 [taps, out_size] input indices and weights (windows
    shorter than the longest are padded with weight 0)."""
    matrix = weights(in_size, out_size)
    nonzero = matrix != 0
    taps = max(int(nonzero.sum(1).max()), 1)
    columns = np.argsort(~nonzero, axis=1, kind="stable")[:, :taps]  # each row's nonzero columns first
    values = np.take_along_axis(matrix, columns, axis=1)
    return (torch.from_numpy(columns.T.copy()).to(device), torch.from_numpy(values.T.copy()).to(device))


def vertical_first(in_size: tuple[int, int], out_size: tuple[int, int]) -> bool:
    """Whether Pillow runs the vertical pass first: from Pillow 13 on, when the height shrinks by
    more than twice as many pixels as the width (the passes round in between, so order matters)."""
    from PIL import __version__

    (in_h, in_w), (out_h, out_w) = in_size, out_size
    shrink = in_h - out_h
    return int(__version__.split(".")[0]) >= 13 and shrink > 0 and shrink > (in_w - out_w) * 2


def _pass(x: torch.Tensor, taps: tuple[torch.Tensor, torch.Tensor], axis: int) -> torch.Tensor:
    """One pass over ``axis`` (-1 columns, -2 rows) of int64 pixels [N, C, H, W]: the exact
    fixed-point sum of each window, plus half a unit, shifted right and clipped to 0..255
    (Resample.c's ``clip8``)."""
    columns, values = taps
    x = x if axis == -1 else x.transpose(-1, -2)
    total = x.index_select(-1, columns[0]) * values[0]
    for index, weight in zip(columns[1:], values[1:]):
        total.addcmul_(x.index_select(-1, index), weight)
    out = ((total + (1 << (PRECISION_BITS - 1))) >> PRECISION_BITS).clamp_(0, 255)
    return out if axis == -1 else out.transpose(-1, -2)


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 images [N, H, W, C] resized to (h, w) ``size`` exactly as ``Image.resize(..., BICUBIC)``
    resizes each of them (no pass along an axis that keeps its size, as Pillow), on their device."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images [N, H, W, C], got {images.dtype} {tuple(images.shape)}")
    in_size = (int(images.shape[1]), int(images.shape[2]))
    out_size = (int(size[0]), int(size[1]))
    if min(out_size) < 1:
        raise ValueError(f"cannot resize to {out_size[1]}x{out_size[0]}")
    x = images.permute(0, 3, 1, 2).to(torch.int64)
    passes = [(-1, in_size[1], out_size[1]), (-2, in_size[0], out_size[0])]
    if vertical_first(in_size, out_size):
        passes.reverse()
    for axis, before, after in passes:
        if before != after:
            x = _pass(x, _taps(before, after, images.device), axis)
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous()

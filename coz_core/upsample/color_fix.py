"""Bilateral colour fix for the zoom chain: the zoomed input's low frequencies carried onto the
SR output along the output's own edges.

Both images are averaged over cells of ``cell`` x ``cell`` pixels; the per-cell colour
difference (input minus output) is upsampled with fixed joint bilateral kernels guided by the
output and added to it. Unlike the wavelet fix, which blurs the input's colour isotropically
across edges (halos where the SR output moved or sharpened an edge), each output pixel only
takes corrections from cells of similar colour on its side of an edge; the output's detail is
untouched because the correction is a difference of cell averages.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .model import fixed_kernels


def bilateral_color_fix(output: torch.Tensor, reference: torch.Tensor, cell: int = 8,
                        sigma_range: float = 0.1) -> torch.Tensor:
    """``output`` [B, 3, H, W] (the SR result) with the low-frequency colour of ``reference``
    (the zoomed input, same size); values in 0..1."""
    if reference.shape != output.shape:
        raise ValueError(f"colour reference {tuple(reference.shape)} and output {tuple(output.shape)} "
                         "must have the same shape")
    if cell < 1:
        raise ValueError(f"cell must be >= 1 pixel, got {cell}")
    output, reference = output.float(), reference.float().to(output.device)
    h, w = output.shape[-2:]
    lr = (max(1, round(h / cell)), max(1, round(w / cell)))
    correction = F.adaptive_avg_pool2d(reference, lr) - F.adaptive_avg_pool2d(output, lr)
    kernels = fixed_kernels(output, lr_size=lr, sigma_range=sigma_range)
    return (output + kernels.apply(correction)).clamp_(0, 1)

"""Shared helpers for the upsampler tests: a small real photo and a slow, obviously-correct
implementation of the kernel (every LR cell is a neighbour, plain loops, float64)."""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image


def photo(size: int = 64) -> torch.Tensor:
    """skimage's astronaut (public domain), Lanczos-resized: [1, 3, size, size] in 0..1."""
    import skimage.data

    img = Image.fromarray(skimage.data.astronaut()).resize((size, size), Image.LANCZOS)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(1.0 / float(((a.double() - b.double()) ** 2).mean()))


def slow_upsample(signal: torch.Tensor, guide: torch.Tensor, guide_lr: torch.Tensor,
                  sigma_x: torch.Tensor, sigma_y: torch.Tensor, theta: torch.Tensor,
                  sigma_r: torch.Tensor) -> torch.Tensor:
    """The paper's formula pixel by pixel: HR pixel (Y, X), every LR cell (i, j) with centre
    ((i + .5) H / h - .5, (j + .5) W / w - .5), offset rotated by theta(i, j), Gaussian in the
    rotated frame times exp(-|g(Y, X) - g_lr(i, j)|^2 / (2 sigma_r^2)), normalised."""
    b, c, h, w = signal.shape
    H, W = guide.shape[-2:]
    out = torch.zeros(b, c, H, W, dtype=torch.float64)
    for n in range(b):
        for Y in range(H):
            for X in range(W):
                num, den = torch.zeros(c, dtype=torch.float64), 0.0
                for i in range(h):
                    for j in range(w):
                        dy = Y - ((i + 0.5) * H / h - 0.5)
                        dx = X - ((j + 0.5) * W / w - 0.5)
                        t = float(theta[n, i, j])
                        xr = dx * math.cos(t) + dy * math.sin(t)
                        yr = -dx * math.sin(t) + dy * math.cos(t)
                        dg = float(((guide[n, :, Y, X].double() - guide_lr[n, :, i, j].double()) ** 2).sum())
                        e = (xr**2 / (2 * float(sigma_x[n, i, j]) ** 2) + yr**2 / (2 * float(sigma_y[n, i, j]) ** 2)
                             + dg / (2 * float(sigma_r[n, i, j]) ** 2))
                        wgt = math.exp(-e)
                        num += wgt * signal[n, :, i, j].double()
                        den += wgt
                out[n, :, Y, X] = num / den
    return out


def dense_upsample(signal: torch.Tensor, guide: torch.Tensor, guide_lr: torch.Tensor,
                   sigma_x: torch.Tensor, sigma_y: torch.Tensor, theta: torch.Tensor,
                   sigma_r: torch.Tensor) -> torch.Tensor:
    """The same formula as ``slow_upsample`` as one differentiable float64 tensor expression
    (all pixel x cell pairs at once; tiny inputs only), for checking gradients."""
    b, c, h, w = signal.shape
    H, W = guide.shape[-2:]
    Y = torch.arange(H, dtype=torch.float64)[:, None, None, None]
    X = torch.arange(W, dtype=torch.float64)[None, :, None, None]
    cy = (torch.arange(h, dtype=torch.float64) + 0.5) * H / h - 0.5
    cx = (torch.arange(w, dtype=torch.float64) + 0.5) * W / w - 0.5
    dy, dx = Y - cy[None, None, :, None], X - cx[None, None, None, :]  # [H, W, h, w]
    t = theta[:, None, None]
    xr = dx * torch.cos(t) + dy * torch.sin(t)
    yr = -dx * torch.sin(t) + dy * torch.cos(t)
    dg = ((guide.double()[:, :, :, :, None, None] - guide_lr.double()[:, :, None, None]) ** 2).sum(1)
    e = (xr**2 / (2 * sigma_x[:, None, None] ** 2) + yr**2 / (2 * sigma_y[:, None, None] ** 2)
         + dg / (2 * sigma_r[:, None, None] ** 2))
    p = torch.softmax(-e.reshape(b, H, W, h * w), -1)
    return torch.einsum("byxk,bck->bcyx", p, signal.double().reshape(b, c, h * w))

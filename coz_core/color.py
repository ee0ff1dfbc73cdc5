"""Colour alignment of an SR output to its input (the zoomed image), as CoZ's reference does.

- ``adain``: per-channel mean and std of the output matched to the input's.
- ``wavelet``: the output's high frequencies over the input's low frequency (5 levels of a
  dilated 3x3 [1,2,1]x[1,2,1]/16 blur with replicate padding, radius 2^i).
- ``none``: unchanged (the reference default).
More methods register in ``COLOR_METHODS``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

_EPS = 1e-5


def adain_color_fix(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Match each channel's mean and (unbiased) std of ``output`` [B, C, H, W] to ``reference``."""
    def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.flatten(2)
        return flat.mean(2)[..., None, None], (flat.var(2) + _EPS).sqrt()[..., None, None]

    out_mean, out_std = stats(output)
    ref_mean, ref_std = stats(reference)
    return ((output - out_mean) / out_std * ref_std + ref_mean).clamp(0, 1)


def _wavelet_blur(image: torch.Tensor, radius: int) -> torch.Tensor:
    """The 3x3 [1,2,1]x[1,2,1]/16 blur dilated by ``radius``, replicate padding.

    Written as two separable passes of shifted adds: a dilated conv2d is far slower on CPU.
    """
    h, w = image.shape[-2:]
    p = F.pad(image, (0, 0, radius, radius), mode="replicate")
    image = p[..., :h, :] + p[..., 2 * radius :, :]
    image.add_(p[..., radius : radius + h, :], alpha=2).mul_(0.25)
    p = F.pad(image, (radius, radius, 0, 0), mode="replicate")
    image = p[..., :w] + p[..., 2 * radius :]
    return image.add_(p[..., radius : radius + w], alpha=2).mul_(0.25)


def wavelet_decomposition(image: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(high frequencies, low frequency) with ``high + low == image``."""
    low = image
    for i in range(levels):
        low = _wavelet_blur(low, 2**i)
    return image - low, low


def wavelet_color_fix(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The output's detail over the reference's low-frequency colour.

    ``high(output) + low(reference)`` equals ``output + low(reference - output)`` because the
    blur is linear: one decomposition instead of two.
    """
    if reference.shape[-2:] != output.shape[-2:]:
        raise ValueError(
            f"colour reference {tuple(reference.shape[-2:])} and output "
            f"{tuple(output.shape[-2:])} must have the same size"
        )
    _, low = wavelet_decomposition(reference - output)
    return (output + low).clamp(0, 1)


COLOR_METHODS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None] = {
    "none": None,
    "adain": adain_color_fix,
    "wavelet": wavelet_color_fix,
}


def align_color(output: torch.Tensor, reference: torch.Tensor, method: str = "wavelet") -> torch.Tensor:
    """Apply a colour alignment method by name (see ``COLOR_METHODS``)."""
    if method not in COLOR_METHODS:
        raise ValueError(f"unknown colour method {method!r}; choose one of {sorted(COLOR_METHODS)}")
    fn = COLOR_METHODS[method]
    if fn is None:
        return output
    return fn(output.float(), reference.float().to(output.device)).to(output.dtype)


def bilateral_color_fix(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The input's low frequencies carried onto the output along the output's edges
    (``coz_core.upsample.bilateral_color_fix``; imported here lazily, it imports this module)."""
    from .upsample import bilateral_color_fix as fix

    return fix(output, reference)


COLOR_METHODS["bilateral"] = bilateral_color_fix

"""Any image-to-image upscale model (x2, x4, ...) as an SR backbone of the chain.

The model magnifies the native-resolution region by its own factor; the result is resized to the
requested size only when the two differ (a x4 model at zoom 4 matches exactly). Large inputs are
split into tiles that each see ``overlap`` extra pixels of context on every side; only their
centres are kept, so tiled output matches untiled output up to the model's far-field influence.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import policy
from ..imageops import resize
from ..tiling import context_tiled_map
from .base import SRRequest


def _placement(module: nn.Module | None) -> tuple[torch.device, torch.dtype]:
    for tensor in (module.parameters() if module is not None else ()):
        return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


class UpscaleModelBackbone:
    """SR backbone around a callable upscale model ([B, 3, h, w] -> [B, 3, h*scale, w*scale]).

    ``module``: an ``nn.Module`` or anything callable with a ``scale``. It runs on ``device``
    (default: where its weights are) in ``dtype`` (default: the policy's ``auto``, see
    :func:`coz_core.policy.auto_dtype`). The weights are moved and cast
    in place once; with ``restore=True`` they are instead moved for each call and put back
    afterwards (for a model shared with other code, such as ComfyUI's UPSCALE_MODEL).
    ``tile``: inputs wider or taller than ``tile``, or above ``tile * tile`` pixels with the
    batch, are split per image into tiles of at most ``tile`` x ``tile`` pixels, each run with
    ``overlap`` pixels of context on every side (None: never tile). An overlap of 64 keeps
    Real-ESRGAN x4plus within about 1e-3 of the untiled result (its influence reaches far: 0.015
    at 32 pixels). x4plus needs about 12 kB per input pixel in float32 and 5 kB in bfloat16
    (measured on CPU): a 256 + 2 x 64 pixel tile takes about 1.8 GB / 0.75 GB.
    """

    size_multiple = 1
    uses_prompt = False

    def __init__(self, module: Any, scale: int | None = None, name: str | None = None,
                 tile: int | None = policy.TILE, overlap: int = policy.TILE_OVERLAP, dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None, channels_last: bool = True,
                 restore: bool = False, weights: nn.Module | None = None):
        scale = scale if scale is not None else getattr(module, "scale", None)
        if not callable(module) or scale is None:
            raise TypeError(
                f"expected a callable upscale model with a scale, got {type(module).__name__}; "
                f"pass scale= for a plain module"
            )
        if int(scale) != scale or scale < 1:
            raise ValueError(f"the upscale factor must be a positive integer, got {scale}")
        if tile is not None and tile < 16:
            raise ValueError(f"tile must be at least 16 pixels (or None), got {tile}")
        if overlap < 0:
            raise ValueError(f"overlap must not be negative, got {overlap}")
        self.module = module
        # the nn.Module holding the weights (moved and cast); the callable itself when it is one
        self.weights = weights if weights is not None else module if isinstance(module, nn.Module) else None
        self.scale = int(scale)
        self.name = name or f"{type(module).__name__} x{self.scale}"
        self.tile = tile
        self.overlap = int(overlap)
        self.channels_last = channels_last
        self.restore = restore
        self.to(device, dtype)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "UpscaleModelBackbone":
        """Run on ``device`` (default: where the weights are) in ``dtype`` (default: the policy's auto)."""
        weights = self.weights
        self.device = torch.device(device) if device is not None else _placement(weights)[0]
        # a model whose weights cannot be seen (a bare function) gets float32 images
        self.dtype = dtype or (policy.auto_dtype(self.device, getattr(self.module, "supports_half", True),
                                                  getattr(self.module, "supports_bfloat16", True))
                               if weights is not None else torch.float32)
        if not self.restore:
            self._place(self.device, self.dtype, self.channels_last)
        return self

    def _place(self, device: torch.device, dtype: torch.dtype, channels_last: bool) -> None:
        weights = self.weights
        if weights is not None:
            layout = torch.channels_last if channels_last else torch.contiguous_format
            weights.to(device=device, dtype=dtype, memory_format=layout).eval()

    def __call__(self, request: SRRequest) -> torch.Tensor:
        out = self.upscale(request.region)
        if tuple(out.shape[-2:]) != request.size:
            out = resize(out, request.size, "bicubic")
        return out.clamp(0, 1)

    @torch.no_grad()  # not inference_mode: callers may modify the result in place
    def upscale(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 3, h, w] float 0..1 -> [B, 3, h*scale, w*scale] float32 on the input's device."""
        original = _placement(self.weights) if self.restore else None
        if original is not None:
            self._place(self.device, self.dtype, self.channels_last)
        try:
            b, _, h, w = image.shape
            x = image.to(self.device, self.dtype)
            if self.tile is None or (max(h, w) <= self.tile and b * h * w <= self.tile**2):
                out = self._run(x)
            else:
                # per image: a tile's pixel budget is for one image
                out = torch.cat([context_tiled_map(self._run, x[i:i + 1], self.tile, self.overlap, self.scale)
                                 for i in range(b)])
        finally:
            if original is not None:
                self._place(*original, channels_last=False)
        return out.to(image.device)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.module(x)
        expected = (x.shape[0], x.shape[1], x.shape[2] * self.scale, x.shape[3] * self.scale)
        if tuple(out.shape) != expected:
            raise RuntimeError(
                f"the upscale model {self.name} turned {tuple(x.shape)} into {tuple(out.shape)}, "
                f"expected {expected} for scale {self.scale}"
            )
        return out.float().contiguous()

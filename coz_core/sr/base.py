"""The SR backbone protocol: what every super-resolution model in the chain looks like.

A backbone gets the region to magnify twice: at its native resolution (``region``, for
upscale models that magnify by their own factor) and already resized to the output size with
the chain's zoom filter (``zoomed``, what CoZ's one-step diffusion model takes). It returns an
image of exactly ``request.size``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class SRRequest:
    region: torch.Tensor  # [B, 3, h, w] float 0..1: crop of the previous scale, native pixels
    zoomed: torch.Tensor  # [B, 3, H, W] float 0..1: region resized to the output size
    prompts: list[str] | None = None  # one per batch element; None when there is no text
    # Backbone-specific precomputed text conditioning (e.g. SD3 sequence + pooled embeddings);
    # when given it replaces ``prompts``.
    conditioning: Any = None
    seed: int | None = None  # for backbones that sample (None: deterministic where possible)

    @property
    def size(self) -> tuple[int, int]:
        """Output (height, width)."""
        return int(self.zoomed.shape[-2]), int(self.zoomed.shape[-1])

    @property
    def batch(self) -> int:
        return int(self.zoomed.shape[0])


@runtime_checkable
class SRBackbone(Protocol):
    """Anything that turns an :class:`SRRequest` into a [B, 3, H, W] float 0..1 image."""

    name: str
    # Output height and width must be multiples of this (e.g. 16 for SD3: VAE 8 x patch 2).
    size_multiple: int
    uses_prompt: bool

    def __call__(self, request: SRRequest) -> torch.Tensor: ...

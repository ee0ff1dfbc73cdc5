"""What the node families share: socket types, the zoom inputs, image and prompt conversions."""
from __future__ import annotations

import torch

from ..coz_core.imageops import resize, to_bchw, to_bhwc

CATEGORY = "CoZ"
# sub-categories of the node menu, one per family
LOADERS, STEPS, CHAIN, UPSCALING = (f"{CATEGORY}/loaders", f"{CATEGORY}/steps", f"{CATEGORY}/chain",
                                    f"{CATEGORY}/upscaling")
VIDEO = f"{CATEGORY}/video"

# socket types of the pack (prefixed so they never meet another pack's or ComfyUI's own types)
SR_MODEL = "COZ_SR_MODEL"  # an SR backbone (coz_core.sr.base.SRBackbone)
VLM = "COZ_VLM"  # a prompt source (coz_core.prompt.base.PromptSource)
ZOOM_LOOP = "COZ_ZOOM_LOOP"  # the state a Zoom Loop Start hands to its Zoom Loop End
CROP_BOX = "COZ_CROP_BOX"  # (left, top, right, bottom) pixels of a zoom crop
ZOOM_BOXES = "COZ_ZOOM_BOXES"  # tuple of coz_core.zoom.Box: the region of the input each scale shows


# auto precision is coz_core.policy's, the same inside ComfyUI and in coz-zoom
PRECISION_TOOLTIP = ("Weight precision. auto (the pack's one policy, as on the command line): bf16 on "
                     "GPUs that support it (fp16 on older ones and on Apple MPS), bf16 on CPUs with "
                     "native bf16 (2.5-5x faster than fp32 there, visually identical), else fp32. "
                     "fp16 on a CPU is about 10x slower.")


def zoom_inputs(steps: bool = True) -> dict:
    """The chain geometry inputs shared by Zoom Chain and Zoom Loop Start."""
    inputs = {}
    if steps:
        inputs["steps"] = ("INT", {"default": 4, "min": 1, "max": 64, "tooltip":
                                   "Zoom steps. The total magnification is zoom ^ steps (4 ^ 4 = 256x), at most "
                                   "2^40 (20 steps at zoom 4)."})
    inputs.update({
        "zoom": ("FLOAT", {"default": 4.0, "min": 1.01, "max": 64.0, "step": 0.01, "tooltip":
                           "Magnification of each step: every step crops 1/zoom of the previous scale."}),
        "width": ("INT", {"default": 512, "min": 8, "max": 16384, "step": 8, "tooltip":
                          "Process width in pixels: every scale has this size (SD3 needs multiples of 16)."}),
        "height": ("INT", {"default": 512, "min": 8, "max": 16384, "step": 8, "tooltip":
                           "Process height in pixels: every scale has this size (SD3 needs multiples of 16)."}),
        "center_x": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip":
                               "Where to zoom, horizontally: 0 = left edge, 0.5 = centre, 1 = right edge "
                               "of the input image."}),
        "center_y": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip":
                               "Where to zoom, vertically: 0 = top edge, 0.5 = centre, 1 = bottom edge "
                               "of the input image."}),
    })
    return inputs


def empty_image(height: int = 1, width: int = 1) -> torch.Tensor:
    """An IMAGE with no pictures ([0, H, W, 3]): what an optional output gives when its input was
    not connected (None would crash the next node; preview and save nodes show nothing)."""
    return torch.zeros(0, height, width, 3)


def empty_mask(height: int = 1, width: int = 1) -> torch.Tensor:
    """A MASK with no masks ([0, H, W]), see :func:`empty_image`."""
    return torch.zeros(0, height, width)


def empty_latent(height: int = 1, width: int = 1, channels: int = 4) -> dict:
    """A LATENT with no samples ({"samples": [0, C, h, w]}), see :func:`empty_image`."""
    return {"samples": torch.zeros(0, channels, height, width)}


def image_in(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [B, H, W, C] -> coz_core float32 [B, C, H, W]."""
    return to_bchw(image.float())


def image_out(image: torch.Tensor) -> torch.Tensor:
    """coz_core [B, C, H, W] -> ComfyUI IMAGE [B, H, W, C] float32 on the CPU."""
    return to_bhwc(image.detach().float().clamp(0, 1)).cpu()


def fit_batch(image: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """``image`` [B, ...] with B == batch, or B == 1 repeated to it."""
    if image.shape[0] == batch:
        return image
    if image.shape[0] == 1:
        return image.expand(batch, *image.shape[1:])
    raise ValueError(f"{what} has {image.shape[0]} images but the batch has {batch}; "
                     f"give one image or one per batch element")


def match_size(image: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """[B, C, H, W] resized (bicubic) to ``size_hw`` when it differs."""
    if tuple(image.shape[-2:]) == tuple(size_hw):
        return image
    return resize(image, size_hw, "bicubic").clamp(0, 1)


def split_prompts(text: str | None, batch: int) -> list[str]:
    """A STRING socket -> one prompt per batch element: one line each, or the same text for all."""
    text = (text or "").strip()
    lines = [line.strip() for line in text.splitlines()]
    if batch > 1 and len(lines) == batch:
        return lines
    return [text] * batch


def join_prompts(prompts: list[str]) -> str:
    """One prompt per batch element -> a STRING (one line each; a single prompt as it is)."""
    return "\n".join(p.replace("\n", " ") for p in prompts) if len(prompts) > 1 else (prompts[0] if prompts else "")

"""CoZ Upscale Image: the whole picture made x2 to x16 larger, a prompt per tile
(coz_core.upscale_image.upscale_image)."""
from __future__ import annotations

import math

import torch

from ..coz_core.color import COLOR_METHODS
from ..coz_core.prompt.base import FixedPrompts
from ..coz_core.upscale_image import BLENDS, PROMPT_BATCH, PROMPT_TOKENS, UpscaleConfig, is_sd3, upscale_image
from . import host
from .common import UPSCALING, SR_MODEL, VLM, image_in

FACTORS = ["2", "4", "8", "16"]


def _preview(image: torch.Tensor) -> torch.Tensor:
    """A small [1, h, w, 3] IMAGE of a [1, C, H, W] output, by striding (no copy of the whole image)."""
    step = max(1, math.ceil(max(image.shape[-2:]) / host.PREVIEW_SIZE))
    return image[:1, :3, ::step, ::step].permute(0, 2, 3, 1).clamp(0, 1)


class UpscaleImage:
    DESCRIPTION = ("Whole-image Chain-of-Zoom: makes the entire picture 2x to 16x larger in overlapping tiles. "
                   "With CoZ's SD3 model every tile gets its own prompt (from the VLM, which sees the whole "
                   "picture and the tile) and one diffusion step; with an upscale model such as the embedded "
                   "Real-ESRGAN it is a seam-free tiled upscale of any size.")
    CATEGORY = UPSCALING
    FUNCTION = "upscale"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("image", "prompts")
    OUTPUT_TOOLTIPS = (
        "The enlarged image (with its alpha channel when the input had one).",
        "Every tile's prompt, one line each: pass, tile, row, column and the prompt.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The picture to enlarge (every image of the batch)."}),
                "sr_model": (SR_MODEL, {"tooltip": "CoZ Load SR Model (SD3) for the CoZ method, or CoZ Load "
                                                   "Real-ESRGAN / an upscale model for a plain tiled upscale."}),
                "factor": (FACTORS, {"default": "4", "tooltip":
                                     "Magnification. x4 per pass, x2 for the rest: x8 = 4 then 2, x16 = 4 then 4."}),
                "tile": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 16, "tooltip":
                                 "Tile side in output pixels; 0 = the default (512 for SD3, 64 latent cells as "
                                 "upstream; 1024 for upscale models). Smaller tiles use less memory."}),
                "overlap": ("INT", {"default": 0, "min": 0, "max": 2048, "step": 8, "tooltip":
                                    "Output pixels shared by neighbouring tiles, blended smoothly; 0 = the "
                                    "default (128 for SD3, 64 for upscale models)."}),
                "color": (list(COLOR_METHODS), {"default": "wavelet", "tooltip":
                                                "Colour alignment of every tile to the enlarged input."}),
                "blend": (list(BLENDS), {"default": "cosine", "tooltip":
                                         "Tile weights: a raised cosine over the overlap, or upstream's Gaussian."}),
                "user_prompt": ("STRING", {"default": "", "multiline": True, "tooltip":
                                           "Your own words, appended to every tile's prompt (the only prompt "
                                           "without a VLM)."}),
                "seed": ("INT", {"default": 42, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip":
                                 "Seed of the latent sample (SD3)."}),
            },
            "optional": {
                "vlm": (VLM, {"tooltip": "From CoZ Load VLM: writes a prompt for every tile from the whole "
                                         "picture and the tile."}),
                "prompt_tokens": ("INT", {"default": PROMPT_TOKENS, "min": 1, "max": 512, "tooltip":
                                          "New tokens per tile prompt from the VLM (upstream: 16); replaces the "
                                          "VLM loader's setting for this node only."}),
                "prompt_batch": ("INT", {"default": PROMPT_BATCH, "min": 1, "max": 64, "tooltip":
                                         "Tile prompts the VLM writes at once (on a GPU they are decoded "
                                         "together by the fast path: each batch size compiles once; halved "
                                         "automatically when memory runs out)."}),
                "tile_prompts": ("STRING", {"default": "", "multiline": True, "forceInput": True, "tooltip":
                                            "Without a VLM: one prompt per line, per tile in raster order "
                                            "(the last line repeats)."}),
            },
        }

    def upscale(self, image, sr_model, factor, tile, overlap, color, blend, user_prompt, seed,
                vlm=None, prompt_tokens=PROMPT_TOKENS, prompt_batch=PROMPT_BATCH, tile_prompts=None):
        config = UpscaleConfig(factor=int(factor), tile=int(tile) or None, overlap=int(overlap) or None,
                               color=color, blend=blend, user_prompt=user_prompt, seed=int(seed))
        source = vlm
        if source is None:
            lines = [line.strip() for line in (tile_prompts or "").splitlines() if line.strip()]
            source = FixedPrompts(lines or "")
        backbone, load_models = sr_model, None
        if isinstance(sr_model, host.Hosted) and is_sd3(sr_model.inner):
            # the engine calls SD3's pieces itself: load its modules once per pass, after the prompts
            backbone, load_models = sr_model.inner, (lambda: host.load_all(sr_model.managed))
        progress = None

        def on_tile(event):
            nonlocal progress
            if progress is None:
                progress = host.Progress(event.total)
            progress.update(event.done, preview=_preview(event.image) if event.phase == "tile" else None)

        def should_stop() -> bool:
            host.throw_if_cancelled()
            return False

        # the VLM loader's object is shared with other nodes: this node's settings are restored afterwards
        inner = source.inner if isinstance(source, host.Hosted) else source
        settings = {"max_new_tokens": int(prompt_tokens), "batch_size": int(prompt_batch)}
        saved = {k: getattr(inner, k) for k in settings if hasattr(inner, k)}
        for key in saved:
            setattr(inner, key, settings[key])
        try:
            result = upscale_image(image_in(image), backbone, config, source, on_tile, should_stop, load_models)
        finally:
            for key, value in saved.items():
                setattr(inner, key, value)
        lines = [f"pass {t.pass_index} tile {t.tile.index} (row {t.tile.row}, col {t.tile.col}): {t.prompt}"
                 for t in result.tiles]
        # the result's storage is already [B, H, W, C]: no copy of the large image
        return result.image.permute(0, 2, 3, 1), "\n".join(lines)


NODE_CLASS_MAPPINGS = {"CoZUpscaleImage": UpscaleImage}
NODE_DISPLAY_NAME_MAPPINGS = {"CoZUpscaleImage": "CoZ Upscale Image"}

"""Zoom Chain: the whole Chain-of-Zoom in one node (coz_core.zoom.run_chain)."""
from __future__ import annotations

import torch

from ..coz_core.color import COLOR_METHODS
from ..coz_core.prompt.base import FixedPrompts, describe_prompts, prompt_info
from ..coz_core.zoom import MODES, ChainConfig, ChainResult, run_chain
from . import host
from .common import CHAIN, SR_MODEL, VLM, ZOOM_BOXES, image_in, image_out, join_prompts, zoom_inputs


class ZoomChain:
    DESCRIPTION = ("The whole Chain-of-Zoom in one node: zooms into the image step by step, each step "
                   "super-resolved by the SR model with a prompt from the VLM. 4 steps of 4x make 256x. "
                   "Cancel keeps the finished scales: they are returned (the prompts output says so) and "
                   "the rest of the graph runs on them; cancel again to stop it.")
    partial_runs = 0  # cancelled runs so far: a partial result is never reused from ComfyUI's cache
    CATEGORY = CHAIN
    FUNCTION = "zoom"
    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING", ZOOM_BOXES, "STRING")
    RETURN_NAMES = ("image", "scales", "prompts", "boxes", "info")
    OUTPUT_TOOLTIPS = (
        "The last scale: the most magnified image.",
        "Every scale, scale 0 first (steps + 1 images per input image).",
        "The prompt of every step, one line each (one per batch element).",
        "The region of the input image each scale shows (for CoZ Zoom Video).",
        "Which prompts ran: prompt type (vlm, vlm_base, none), model, adapter and token limit.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The picture to zoom into (every image of the batch is zoomed)."}),
                "mode": (list(MODES), {"default": "recursive_multiscale", "tooltip":
                                       "recursive_multiscale: CoZ (the VLM sees both scales); recursive: "
                                       "prompts from the zoom alone; onestep: one SR pass from scale 0 "
                                       "(direct SR); bicubic / nearest: no model, for comparison."}),
                **zoom_inputs(),
                "color": (list(COLOR_METHODS), {"default": "wavelet", "tooltip":
                                                "Colour alignment after every SR step (against colour drift): "
                                                "wavelet, adain, bilateral (edge-aware) or none (the reference)."}),
                "user_prompt": ("STRING", {"default": "", "multiline": True, "tooltip":
                                           "Your own words, appended to every step's prompt."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip":
                                 "Noise seed for models that sample; step k uses seed + k (wrapping past 2^64 - 1)."}),
            },
            "optional": {
                "sr_model": (SR_MODEL, {"tooltip": "From a CoZ loader; needed by every mode but bicubic/nearest."}),
                "vlm": (VLM, {"tooltip": "From CoZ Load VLM; without it the prompt is your text alone."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return cls.partial_runs

    def zoom(self, image, mode, steps, zoom, width, height, center_x, center_y, color, user_prompt, seed,
             sr_model=None, vlm=None):
        config = ChainConfig(mode=mode, steps=int(steps), zoom=float(zoom), size=(int(width), int(height)),
                             center=(center_x, center_y), color=color, user_prompt=user_prompt, seed=int(seed))
        progress = host.Progress(config.steps)

        done = []

        def on_step(step):
            done.append(step)
            if step.index:
                progress.update(step.index, preview=image_out(step.image[:1]))

        def should_stop() -> bool:
            host.throw_if_cancelled()
            return False

        picture = image_in(image)
        try:
            result = run_chain(picture, sr_model, config, vlm or FixedPrompts(""), on_step, should_stop)
        except host.interrupts():
            # ComfyUI drops the outputs of a node that raises: return the finished scales instead
            # (the raise cleared ComfyUI's interrupt flag, so the graph goes on with them)
            if not done:
                raise
            result = ChainResult(done, config, (picture.shape[-1], picture.shape[-2]), cancelled=True,
                                 prompt=prompt_info(vlm))
            type(self).partial_runs += 1
        scales = torch.cat([image_out(s) for s in result.images])
        prompts = "\n".join(join_prompts(p) for p in result.prompts)
        if result.cancelled:
            note = f"# cancelled: {len(result.steps) - 1} of {config.steps} steps done, these scales are returned"
            prompts = f"{prompts}\n{note}" if prompts else note
        return (image_out(result.final), scales, prompts, tuple(s.box for s in result.steps),
                describe_prompts(result.prompt))


NODE_CLASS_MAPPINGS = {"CoZZoomChain": ZoomChain}
NODE_DISPLAY_NAME_MAPPINGS = {"CoZZoomChain": "CoZ Zoom Chain (all-in-one)"}

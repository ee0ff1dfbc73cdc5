"""The single steps of the chain as nodes: Zoom Crop, VLM Prompt, SR Step, Color Fix."""
from __future__ import annotations

import torch

from ..coz_core.color import COLOR_METHODS, align_color
from ..coz_core.prompt.base import PromptRequest, compose_prompt
from ..coz_core.sr.base import SRRequest
from ..coz_core.zoom import zoom_box, zoom_in
from . import host
from .common import (STEPS, CROP_BOX, SR_MODEL, VLM, fit_batch, image_in, image_out, join_prompts,
                     match_size, split_prompts, zoom_inputs)


class ZoomCrop:
    DESCRIPTION = ("One zoom of the chain by hand: crops 1/zoom of the image around the centre and "
                   "resizes it (bicubic, like the CoZ reference) to the process size.")
    CATEGORY = STEPS
    FUNCTION = "crop"
    RETURN_TYPES = ("IMAGE", "IMAGE", CROP_BOX, "MASK")
    RETURN_NAMES = ("zoomed", "region", "box", "mask_region")
    OUTPUT_TOOLTIPS = (
        "The crop resized to the process size (the SR input).",
        "The crop at its native resolution.",
        "The crop box (left, top, right, bottom) in pixels of the input image.",
        "The same crop of the mask at its native resolution (empty when no mask is given).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        geometry = zoom_inputs(steps=False)
        for side in ("width", "height"):  # 0 keeps the input's own size
            geometry[side][1].update(default=0, min=0, tooltip=geometry[side][1]["tooltip"]
                                     + " 0 = the input image's own size.")
        return {
            "required": {"image": ("IMAGE", {"tooltip": "The image to zoom into."}), **geometry},
            "optional": {"mask": ("MASK", {"tooltip": "A mask (or depth map) of the image's size to crop "
                                                      "with the same box."})},
        }

    def crop(self, image, zoom, width, height, center_x, center_y, mask=None):
        picture = image_in(image)
        in_h, in_w = picture.shape[-2:]
        box = zoom_box((in_w, in_h), zoom, (center_x, center_y))
        region, zoomed = zoom_in(picture, box)
        zoomed = match_size(zoomed, (height or in_h, width or in_w))
        if mask is None:
            mask_region = torch.zeros(1, box[3] - box[1], box[2] - box[0])
        else:
            if mask.ndim == 2:
                mask = mask.unsqueeze(0)
            if tuple(mask.shape[-2:]) != (in_h, in_w):
                raise ValueError(f"the mask is {mask.shape[-1]}x{mask.shape[-2]} but the image is "
                                 f"{in_w}x{in_h}; give a mask of the image's size")
            mask_region = mask[:, box[1]:box[3], box[0]:box[2]].float().clone()
        return image_out(zoomed), image_out(region), box, mask_region


class VLMPrompt:
    DESCRIPTION = ("Asks the vision-language model what the zoomed input shows, looking at the previous "
                   "scale too (CoZ's multi-scale prompt). Output: the prompt for CoZ SR Step "
                   "(one line per batch element).")
    CATEGORY = STEPS
    FUNCTION = "describe"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("prompt",)
    OUTPUT_TOOLTIPS = ("The prompt: the VLM's words, then your text.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vlm": (VLM, {"tooltip": "From CoZ Load VLM."}),
                "previous": ("IMAGE", {"tooltip": "The previous scale (Zoom Loop Start's 'previous')."}),
                "zoomed": ("IMAGE", {"tooltip": "The zoomed input of this step (Zoom Loop Start's 'zoomed')."}),
                "multiscale": ("BOOLEAN", {"default": True, "tooltip":
                                           "On: the VLM sees the previous scale and the zoom (CoZ's method). "
                                           "Off: only the zoomed input."}),
                "user_prompt": ("STRING", {"default": "", "multiline": True, "tooltip":
                                           "Your own words, appended to the VLM's (e.g. a style)."}),
            },
            "optional": {
                "step": ("INT", {"default": 1, "min": 1, "max": 64, "forceInput": True, "tooltip":
                                 "The step number (Zoom Loop Start's 'step'); only fixed per-step prompt "
                                 "lists use it."}),
            },
        }

    def describe(self, vlm, previous, zoomed, multiscale, user_prompt, step=1):
        zoomed_t = image_in(zoomed)
        previous_t = fit_batch(image_in(previous), zoomed_t.shape[0], "previous")
        host.throw_if_cancelled()
        generated = vlm(PromptRequest(previous_t, zoomed_t, int(step), multiscale=bool(multiscale),
                                      user_prompt=user_prompt))
        return (join_prompts([compose_prompt(g, user_prompt) for g in generated]),)


class SRStep:
    DESCRIPTION = ("One super-resolution step: the SR model turns the zoomed input into a sharp image of "
                   "the same size, guided by a prompt (text, or CONDITIONING from CLIPTextEncode with "
                   "SD3's text encoders).")
    CATEGORY = STEPS
    FUNCTION = "upscale"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The super-resolved image, the size of the zoomed input.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "sr_model": (SR_MODEL, {"tooltip": "From a CoZ loader (SD3, Real-ESRGAN, or an upscale model)."}),
                "zoomed": ("IMAGE", {"tooltip": "The zoomed input (Zoom Loop Start's or Zoom Crop's 'zoomed')."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip":
                                 "Noise seed for models that sample (the CoZ SD3 model draws its VAE latent)."}),
            },
            "optional": {
                "region": ("IMAGE", {"tooltip": "The crop at its native resolution (Zoom Loop Start's "
                                                "'region'); upscale models magnify it. Without it they get "
                                                "the zoomed input."}),
                "prompt": ("STRING", {"forceInput": True, "tooltip":
                                      "The prompt (e.g. from CoZ VLM Prompt); one line per batch element."}),
                "conditioning": ("CONDITIONING", {"tooltip":
                                                  "Instead of the prompt: CLIPTextEncode's output with SD3's "
                                                  "text encoders (TripleCLIPLoader)."}),
            },
        }

    def upscale(self, sr_model, zoomed, seed, region=None, prompt=None, conditioning=None):
        zoomed_t = image_in(zoomed)
        region_t = zoomed_t if region is None else fit_batch(image_in(region), zoomed_t.shape[0], "region")
        host.throw_if_cancelled()
        if conditioning is not None and not sr_model.uses_prompt:
            raise ValueError(f"the {sr_model.name} SR model uses no text: disconnect the CONDITIONING")
        # CONDITIONING goes to the backbone as ComfyUI made it ([[tokens, {"pooled_output": ...}]])
        request = SRRequest(region_t, zoomed_t, split_prompts(prompt, zoomed_t.shape[0]),
                            conditioning=conditioning, seed=int(seed))
        return (image_out(sr_model(request)),)


class ColorFix:
    DESCRIPTION = ("Aligns the colours of an SR result to its input, against the colour drift that "
                   "builds up over zoom steps: wavelet (keeps the input's low frequencies), AdaIN "
                   "(matches channel mean and spread) or bilateral (edge-aware).")
    CATEGORY = STEPS
    FUNCTION = "fix"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The SR result with the reference's colours.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The SR result."}),
                "reference": ("IMAGE", {"tooltip": "The SR input (the zoomed input) whose colours to keep; "
                                                   "resized to the result's size if needed."}),
                "method": (list(COLOR_METHODS), {"default": "wavelet", "tooltip":
                                                 "wavelet: detail of the result over the colour of the input; "
                                                 "adain: per-channel mean and spread; bilateral: the input's "
                                                 "low frequencies carried along the result's own edges "
                                                 "(edge-aware, slower); none: unchanged."}),
            },
        }

    def fix(self, image, reference, method):
        out = image_in(image)
        ref = match_size(fit_batch(image_in(reference), out.shape[0], "reference"), tuple(out.shape[-2:]))
        return (image_out(align_color(out, ref, method)),)


NODE_CLASS_MAPPINGS = {"CoZZoomCrop": ZoomCrop, "CoZVLMPrompt": VLMPrompt, "CoZSRStep": SRStep,
                       "CoZColorFix": ColorFix}
NODE_DISPLAY_NAME_MAPPINGS = {"CoZZoomCrop": "CoZ Zoom Crop", "CoZVLMPrompt": "CoZ VLM Prompt",
                              "CoZSRStep": "CoZ SR Step", "CoZColorFix": "CoZ Color Fix"}

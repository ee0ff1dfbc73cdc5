"""Upscale-model backbones: the embedded Real-ESRGAN and ComfyUI's own UPSCALE_MODEL."""
from __future__ import annotations

import torch

from ..coz_core import factory, policy
from ..coz_core.sr.realesrgan import DEFAULT_MODEL, EMBEDDED_MODELS
from . import host
from .common import LOADERS, PRECISION_TOOLTIP, SR_MODEL

TILE = ("INT", {"default": policy.TILE, "min": 0, "max": 4096, "step": 16, "tooltip":
                "Largest input processed at once, in pixels per side (0 = never tile). Smaller saves memory."})


class LoadRealESRGAN:
    DESCRIPTION = ("The Real-ESRGAN x4 model that ships with the pack (no download): a fast SR backbone "
                   "for the chain on any machine. It is converted once into models/upscale_models, where "
                   "ComfyUI's Load Upscale Model finds it too.")
    CATEGORY = LOADERS
    FUNCTION = "load"
    RETURN_TYPES = (SR_MODEL,)
    RETURN_NAMES = ("sr_model",)
    OUTPUT_TOOLTIPS = ("The SR backbone for CoZ SR Step or CoZ Zoom Chain.",)

    @classmethod
    def INPUT_TYPES(cls):
        names = list(EMBEDDED_MODELS)
        tips = "; ".join(f"{m.name}: {m.description}" for m in EMBEDDED_MODELS.values())
        return {
            "required": {
                "model": (names, {"default": DEFAULT_MODEL, "tooltip": tips}),
                "precision": (list(policy.PRECISIONS), {"default": "auto", "tooltip": PRECISION_TOOLTIP}),
                "tile": TILE,
            },
        }

    def load(self, model, precision, tile):
        backbone = factory.upscale_backbone(model, host.torch_device(), precision, tile=tile or None,
                                            cache_dir=host.folder_paths("upscale_models")[0],
                                            load_device=host.offload_device())
        return (host.Hosted(backbone, {f"Real-ESRGAN {model}": backbone.weights}),)


class UpscaleModelToSR:
    DESCRIPTION = ("Turns ComfyUI's UPSCALE_MODEL (from Load Upscale Model: ESRGAN, SwinIR, HAT, ...) into "
                   "an SR backbone of the chain. The model magnifies the crop by its own factor; the result "
                   "is resized to the process size when the zoom differs.")
    CATEGORY = LOADERS
    FUNCTION = "adapt"
    RETURN_TYPES = (SR_MODEL,)
    RETURN_NAMES = ("sr_model",)
    OUTPUT_TOOLTIPS = ("The SR backbone for CoZ SR Step or CoZ Zoom Chain.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "upscale_model": ("UPSCALE_MODEL", {"tooltip": "From ComfyUI's Load Upscale Model."}),
                "tile": TILE,
            },
        }

    def adapt(self, upscale_model, tile):
        # a spandrel ImageModelDescriptor: callable, its weights in .model, its factor in .scale
        weights = getattr(upscale_model, "model", None)
        if (not callable(upscale_model) or not isinstance(weights, torch.nn.Module)
                or not hasattr(upscale_model, "scale")):
            raise TypeError(f"expected an UPSCALE_MODEL from Load Upscale Model, got {type(upscale_model).__name__}")
        # shared with other nodes (e.g. Upscale Image (using Model)): keep its dtype and layout, move
        # it to the compute device only while it runs, as ComfyUI's own upscale node does
        return (factory.module_backbone(upscale_model, weights, upscale_model.scale, host.torch_device(),
                                        tile=tile or None),)


NODE_CLASS_MAPPINGS = {"CoZLoadRealESRGAN": LoadRealESRGAN, "CoZUpscaleModelToSR": UpscaleModelToSR}
NODE_DISPLAY_NAME_MAPPINGS = {"CoZLoadRealESRGAN": "CoZ Load Real-ESRGAN (embedded)",
                              "CoZUpscaleModelToSR": "CoZ Upscale Model as SR Model"}

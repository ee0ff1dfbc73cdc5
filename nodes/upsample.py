"""Bilateral Upsampler: lift a low-resolution image, mask or latent to a guide image's resolution
along the guide's edges (coz_core.upsample: Upsample Anything's fitted kernels, or fixed ones)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..coz_core.upsample import fit_kernels, fixed_kernels
from . import host
from .common import UPSCALING, empty_image, empty_latent, empty_mask, image_in, image_out

LATENT_CELL = 8  # pixels per latent cell of the VAEs the pack meets (SD, SDXL, SD3, Flux)


class BilateralUpsampler:
    DESCRIPTION = ("Upsamples a low-resolution image, mask/depth map or latent to the size of a guide image, "
                   "following the guide's edges (Upsample Anything: per-pixel kernels fitted to the guide; "
                   "or classic fixed joint-bilateral kernels). E.g. carry a mask through a zoom: the crop "
                   "of the old mask, guided by the new SR image.")
    CATEGORY = UPSCALING
    FUNCTION = "upsample"
    RETURN_TYPES = ("IMAGE", "MASK", "LATENT")
    RETURN_NAMES = ("image", "mask", "latent")
    OUTPUT_TOOLTIPS = (
        "The image input at the guide's size (an empty batch when not given).",
        "The mask input at the guide's size (an empty batch when not given).",
        "The latent input on the guide's latent grid, 1/8 of its size (an empty batch when not given).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "guide": ("IMAGE", {"tooltip": "The high-resolution image whose edges the result follows."}),
                "kernels": (["learned", "fixed"], {"default": "learned", "tooltip":
                                                   "learned: kernels fitted to the guide (better edges, a few "
                                                   "seconds); fixed: the same Gaussian everywhere (instant)."}),
                "fit_steps": ("INT", {"default": 50, "min": 1, "max": 500, "tooltip":
                                      "Optimisation steps of the learned kernels (stops early when converged)."}),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "A low-resolution image to upsample."}),
                "mask": ("MASK", {"tooltip": "A low-resolution mask or depth map (0..1) to upsample."}),
                "latent": ("LATENT", {"tooltip": "A low-resolution latent to upsample to the guide's latent grid."}),
            },
        }

    def upsample(self, guide, kernels, fit_steps, image=None, mask=None, latent=None):
        device = host.torch_device()
        guide_t = image_in(guide).to(device)
        fitted: dict[tuple, object] = {}  # one fit per (guide size, low-res size)

        def lift(signal: torch.Tensor, kind: str, guide_hr: torch.Tensor) -> torch.Tensor:
            key = (tuple(guide_hr.shape[-2:]), tuple(signal.shape[-2:]))
            if key not in fitted:
                host.throw_if_cancelled()
                if kernels == "learned":
                    fitted[key] = fit_kernels(guide_hr, lr_size=key[1], steps=int(fit_steps))
                else:
                    fitted[key] = fixed_kernels(guide_hr, lr_size=key[1])
            return fitted[key].apply(signal.float().to(device), kind=kind)

        hg, wg = guide_t.shape[-2], guide_t.shape[-1]  # unconnected inputs give empty outputs, never None
        out_image, out_mask = empty_image(hg, wg), empty_mask(hg, wg)
        out_latent = empty_latent(hg // LATENT_CELL, wg // LATENT_CELL)
        if image is not None:
            out_image = image_out(lift(image_in(image), "features", guide_t))
        if mask is not None:
            m = mask.unsqueeze(0) if mask.ndim == 2 else mask
            out_mask = lift(m[:, None], "mask", guide_t)[:, 0].cpu()
        if latent is not None:
            h, w = guide_t.shape[-2] // LATENT_CELL, guide_t.shape[-1] // LATENT_CELL
            guide_lat = F.interpolate(guide_t, size=(h, w), mode="area")
            samples = lift(latent["samples"], "latent", guide_lat).to(latent["samples"].dtype).cpu()
            out_latent = {**latent, "samples": samples}
        return out_image, out_mask, out_latent


NODE_CLASS_MAPPINGS = {"CoZBilateralUpsampler": BilateralUpsampler}
NODE_DISPLAY_NAME_MAPPINGS = {"CoZBilateralUpsampler": "CoZ Bilateral Upsampler"}

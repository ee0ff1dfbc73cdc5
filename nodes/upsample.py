"""Bilateral Upsampler: lift a low-resolution image, mask or latent to a guide image's resolution
along the guide's edges (coz_core.upsample: Upsample Anything's fitted kernels, or fixed ones)."""
from __future__ import annotations

import torch.nn.functional as F

from ..coz_core.upsample import fit_kernels, fixed_kernels
from . import host
from .common import UPSCALING, empty_image, empty_latent, empty_mask, image_in, image_out

LATENT_CELL = 8  # pixels per latent cell of the VAEs the pack meets (SD, SDXL, SD3, Flux)
# On a CPU the learned kernels are fitted on the guide resized to this longer side (the fit's
# cost grows with the guide's pixels; the kernels are then used at full size). Measured on a
# 512 px guide with a 128 px signal: 2.3x faster, chroma upsampled as well (43.2 vs 43.1 and
# 43.1 vs 43.4 dB on two photos).
CPU_FIT_SIDE = 256


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
                                                   "learned: kernels fitted to the guide in 'fit_steps' "
                                                   "optimisation steps (better edges). On a CPU the fit runs on "
                                                   "the guide resized to 256 px: 50 steps took 4 to 8 s on an idle "
                                                   "2-core CPU (256 and 512 px guides at x4), up to 40x longer "
                                                   "when the CPU is busy. The bar advances per step; Cancel stops "
                                                   "within one step. fixed: the same Gaussian everywhere (no fit: "
                                                   "a few seconds at most on a CPU)."}),
                "fit_steps": ("INT", {"default": 50, "min": 1, "max": 500, "tooltip":
                                      "Optimisation steps of the learned kernels (stops early when converged). "
                                      "The cost is proportional: 20 steps take 2/5 of the time of 50 and "
                                      "reconstruct the guide about 0.8 dB worse."}),
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
        signals = []  # (signal [B, C, h, w], kind, guide it follows)
        if image is not None:
            signals.append((image_in(image), "features", guide_t))
        if mask is not None:
            m = mask.unsqueeze(0) if mask.ndim == 2 else mask
            signals.append((m[:, None], "mask", guide_t))
        if latent is not None:
            h, w = guide_t.shape[-2] // LATENT_CELL, guide_t.shape[-1] // LATENT_CELL
            signals.append((latent["samples"], "latent", F.interpolate(guide_t, size=(h, w), mode="area")))
        # one fit per (guide size, low-res size); the bar advances per fitting step
        keys = list(dict.fromkeys((tuple(g.shape[-2:]), tuple(s.shape[-2:])) for s, _, g in signals))
        steps = int(fit_steps)
        progress = host.Progress(len(keys) * steps) if kernels == "learned" and keys else None
        fit_side = CPU_FIT_SIDE if device.type == "cpu" else None
        fitted: dict[tuple, object] = {}
        outs = []
        for signal, kind, guide_hr in signals:
            key = (tuple(guide_hr.shape[-2:]), tuple(signal.shape[-2:]))
            if key not in fitted:
                host.throw_if_cancelled()
                if progress is None:
                    fitted[key] = fixed_kernels(guide_hr, lr_size=key[1])
                else:
                    done = len(fitted) * steps
                    fitted[key] = fit_kernels(guide_hr, lr_size=key[1], steps=steps, fit_side=fit_side,
                                              callback=lambda step, _total, _loss: progress.update(done + step))
                    progress.update(done + steps)  # an early stop skips the rest of this fit
            outs.append(fitted[key].apply(signal.float().to(device), kind=kind))
        hg, wg = guide_t.shape[-2], guide_t.shape[-1]  # unconnected inputs give empty outputs, never None
        out_image, out_mask = empty_image(hg, wg), empty_mask(hg, wg)
        out_latent = empty_latent(hg // LATENT_CELL, wg // LATENT_CELL)
        if image is not None:
            out_image = image_out(outs.pop(0))
        if mask is not None:
            out_mask = outs.pop(0)[:, 0].cpu()
        if latent is not None:
            out_latent = {**latent, "samples": outs.pop(0).to(latent["samples"].dtype).cpu()}
        return out_image, out_mask, out_latent


NODE_CLASS_MAPPINGS = {"CoZBilateralUpsampler": BilateralUpsampler}
NODE_DISPLAY_NAME_MAPPINGS = {"CoZBilateralUpsampler": "CoZ Bilateral Upsampler"}

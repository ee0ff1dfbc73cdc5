"""ComfyUI nodes of the Chain-of-Zoom pack: thin wrappers over coz_core, one module per family.

Only nodes/host.py touches ComfyUI; everything here also imports and runs without it.
"""
from pathlib import Path

from . import chain, host, loop, sd3, steps, upsample, upscale_image, upscalers, video, vlm

host.register_folders()
host.install_sample_image(Path(__file__).resolve().parent.parent / "coz_core" / "data" / "sample.png")

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _family in (sd3, vlm, upscalers, steps, upsample, loop, chain, upscale_image, video):
    NODE_CLASS_MAPPINGS.update(_family.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_family.NODE_DISPLAY_NAME_MAPPINGS)

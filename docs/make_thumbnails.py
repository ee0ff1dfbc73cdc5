"""Regenerate the template thumbnails of workflows 01 and 04 from what those workflows produce:
their API copies (workflows/api/) run through the pack's real nodes, with minimal stand-ins for
the four ComfyUI core nodes they use (Load Image, Image To Mask, Mask To Image, Save Image).

    COZ_MODELS_DIR=/tmp/models python docs/make_thumbnails.py

Thumbnails: tiles of 160 px with 4 px gaps, every scale left to right (01: a 2x2 grid; 04: the
scales above the carried mask).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from node_fixtures import GraphRun, load_pack  # noqa: E402

TILE, GAP = 160, 4


class LoadImage:
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {}

    def load(self, image):
        rgba = Image.open(ROOT / "coz_core" / "data" / "sample.png").convert("RGBA")
        array = torch.from_numpy(np.asarray(rgba).astype(np.float32) / 255)[None]
        return array[..., :3], 1.0 - array[..., 3]


class ImageToMask:
    FUNCTION = "convert"

    @classmethod
    def INPUT_TYPES(cls):
        return {}

    def convert(self, image, channel):
        return (image[..., "rgba".index(channel[0])],)


class MaskToImage:
    FUNCTION = "convert"

    @classmethod
    def INPUT_TYPES(cls):
        return {}

    def convert(self, mask):
        return (mask[..., None].expand(-1, -1, -1, 3),)


class SaveImage:
    FUNCTION = "save"
    saved: dict = {}

    @classmethod
    def INPUT_TYPES(cls):
        return {}

    def save(self, images, filename_prefix):
        SaveImage.saved[filename_prefix] = images
        return ()


def tiles(images: torch.Tensor) -> list[Image.Image]:
    arrays = (images.clamp(0, 1) * 255 + 0.5).byte().numpy()
    return [Image.fromarray(a).resize((TILE, TILE), Image.LANCZOS) for a in arrays]


def grid(rows: list[list[Image.Image]]) -> Image.Image:
    width = max(len(r) for r in rows)
    out = Image.new("RGB", (width * TILE + (width - 1) * GAP, len(rows) * TILE + (len(rows) - 1) * GAP), "black")
    for y, row in enumerate(rows):
        for x, tile in enumerate(row):
            out.paste(tile, (x * (TILE + GAP), y * (TILE + GAP)))
    return out


def run(name: str) -> dict:
    pack = load_pack()
    classes = {**pack.NODE_CLASS_MAPPINGS, "LoadImage": LoadImage, "ImageToMask": ImageToMask,
               "MaskToImage": MaskToImage, "SaveImage": SaveImage}
    prompt = json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())
    outputs = [k for k, v in prompt.items() if v["class_type"] == "SaveImage"]
    graph = GraphRun(classes, {k: v for k, v in prompt.items() if v["class_type"] != "PreviewImage"})
    SaveImage.saved = {}
    for node in outputs:
        graph.execute(node)
    return dict(SaveImage.saved)


if __name__ == "__main__":
    saved = run("CoZ 1 - Offline zoom (Real-ESRGAN)")
    scales = tiles(saved["coz/offline_zoom"])
    grid([scales[:2], scales[2:4]]).save(ROOT / "workflows" / "CoZ 1 - Offline zoom (Real-ESRGAN).jpg", quality=90)
    saved = run("CoZ 4 - Mask through the zoom")
    grid([tiles(saved["coz/mask_zoom"]), tiles(saved["coz/mask_zoom_mask"])]).save(
        ROOT / "workflows" / "CoZ 4 - Mask through the zoom.jpg", quality=90)
    print("written")

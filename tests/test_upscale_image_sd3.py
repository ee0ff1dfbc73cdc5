"""Whole-image upscaling with CoZ's one-step SD3 (tiny SD3 in the real layouts): the step per tile, its
prompt, and no seams on a real photo."""
from __future__ import annotations

import pytest
import torch

from coz_core.imageops import resize
from coz_core.prompt.base import FixedPrompts
from coz_core.sr.base import SRRequest
from coz_core.sr.coz_sd3 import CoZSD3Backbone
from coz_core.upscale_image import UpscaleConfig, upscale_image
from tests.sd3_fixtures import FP32, shared_tiny_sd3
from tests.test_upscale_image import photo

PROMPTS = ["a cat", "a dog", "a cat", "wood", "a dog", "sky"]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> CoZSD3Backbone:
    tiny = shared_tiny_sd3(tmp_path_factory)
    return CoZSD3Backbone.from_files(tiny.folder, tiny.lora_pkl, tiny.vae_pt, precision=FP32, latent_mode="sample")


def test_one_tile_is_the_backbones_own_step_on_the_enlarged_image(backbone):
    image = photo(48, 64)
    backbone.latent_mode = "mean"
    try:
        result = upscale_image(image, backbone, UpscaleConfig(factor=2, tile=128, overlap=0, color="none"),
                               FixedPrompts("a cat"))
        enlarged = resize(image, (96, 128), "lanczos").clamp(0, 1)
        expected = backbone(SRRequest(image, enlarged, ["a cat"]))
    finally:
        backbone.latent_mode = "sample"
    assert len(result.tiles) == 1
    assert torch.allclose(result.image, expected, atol=1e-5)


def test_every_tile_is_stepped_with_its_own_prompt_encoded_once(backbone, monkeypatch):
    encoded, seen = [], []
    encode, velocity = backbone.text_encoder.__call__, backbone.velocity
    monkeypatch.setattr(backbone.text_encoder, "__call__", None, raising=False)

    class Counting(type(backbone.text_encoder)):
        def __call__(self, prompts):
            encoded.extend(prompts)
            return encode(prompts)

    monkeypatch.setattr(backbone.text_encoder, "__class__", Counting)
    monkeypatch.setattr(backbone, "velocity", lambda z, cond: (seen.append(cond.pooled.clone()), velocity(z, cond))[1])
    result = upscale_image(photo(96, 128), backbone, UpscaleConfig(factor=2, tile=128, overlap=32),
                           FixedPrompts(PROMPTS))
    assert result.prompts == PROMPTS and sorted(encoded) == sorted(set(PROMPTS))  # each distinct prompt once
    for prompt, pooled in zip(PROMPTS, seen, strict=True):
        assert torch.allclose(pooled, encode([prompt]).pooled)


def seam_ratio(image: torch.Tensor, tiles, axis: int) -> float:
    """Mean gradient energy across the columns (axis -1) or rows (-2) within 2 pixels of an interior tile
    edge, over the mean elsewhere (1 = no seam)."""
    grad = (image.diff(dim=axis) ** 2).mean(dim=(0, 1, 3 if axis == -2 else 2))  # per boundary
    size = image.shape[axis]
    lo, hi = (0, 2) if axis == -1 else (1, 3)
    edges = {t.tile.box[lo] for t in tiles} | {t.tile.box[hi] for t in tiles}
    near = torch.zeros(size - 1, dtype=torch.bool)
    for e in edges - {0, size}:
        near[max(e - 3, 0):e + 2] = True
    return float(grad[near].mean() / grad[~near].mean())


def test_no_seam_on_a_real_photo(backbone):
    image = photo(96, 128)  # 192 x 256 output: 2 x 3 tiles
    ours = upscale_image(image, backbone, UpscaleConfig(factor=2, tile=128, overlap=32), FixedPrompts(PROMPTS))
    hard = upscale_image(image, backbone, UpscaleConfig(factor=2, tile=128, overlap=0), FixedPrompts(PROMPTS))
    assert len(ours.tiles) == 6 and len(hard.tiles) == 4
    for axis in (-1, -2):
        assert seam_ratio(ours.image, ours.tiles, axis) < 1.3
    assert seam_ratio(hard.image, hard.tiles, -1) > 3  # the measure sees butt-joined tiles


def test_seed_fixes_the_sample(backbone):
    image = photo(32, 48)

    def run(seed):
        return upscale_image(image, backbone, UpscaleConfig(factor=2, tile=64, overlap=16, seed=seed)).image

    assert torch.equal(run(1), run(1)) and not torch.allclose(run(1), run(2), atol=1e-4)


class BatchedNames:
    """A prompt source taking tiles in batches (like the VLM): names each tile by its number."""

    batch_size = 4

    def __init__(self):
        self.requests = []

    def __call__(self, request):
        self.requests.append(tuple(request.zoomed.shape))
        return [f"tile {request.step + i}" for i in range(request.batch)]


def test_sizes_off_the_sd3_grid_and_batched_prompts(backbone):
    source = BatchedNames()
    result = upscale_image(photo(45, 70), backbone, UpscaleConfig(factor=2, tile=64, overlap=16), source)
    assert result.image.shape == (1, 3, 90, 140) and torch.isfinite(result.image).all()
    n = len(result.tiles)
    assert result.prompts == [f"tile {i + 1}" for i in range(n)]
    assert [s[0] for s in source.requests] == [4] * (n // 4) + ([n % 4] if n % 4 else [])
    assert {s[-2:] for s in source.requests} == {(64, 64)}  # the padded grid's tiles, all one size

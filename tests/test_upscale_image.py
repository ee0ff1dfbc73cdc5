"""Whole-image upscaling: tiling exactness, seams, per-tile prompts, memory, bad input."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from coz_core.imageops import load_image, resize
from coz_core.prompt.base import FixedPrompts
from coz_core.sr.upscale import UpscaleModelBackbone
from coz_core.upscale_image import (
    MemoryLimitError, UpscaleConfig, enlarge, plan_passes, tile_grid, upscale_image,
)

SAMPLE = Path(__file__).resolve().parent.parent / "coz_core" / "data" / "sample.png"


def local_model(scale: int = 2, seed: int = 0) -> nn.Module:
    """A x``scale`` model whose output pixel sees at most 2 input pixels around it."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="replicate"), nn.Tanh(),
                          nn.Upsample(scale_factor=scale, mode="nearest"),
                          nn.Conv2d(8, 3, 3, padding=1, padding_mode="replicate"), nn.Sigmoid())
    return model.eval()


def photo(h: int, w: int) -> torch.Tensor:
    return resize(load_image(SAMPLE), (h, w), "lanczos").clamp(0, 1)


def test_passes():
    assert [plan_passes(f) for f in (2, 4, 8, 16, 32)] == [[2], [4], [4, 2], [4, 4], [4, 4, 2]]
    for bad in (1, 3, 6, 12, 0, -4, 2.5):
        with pytest.raises(ValueError, match="x4 and x2 passes"):
            plan_passes(bad)


def test_enlarged_tiles_equal_the_whole_enlargement():
    image = photo(37, 53)
    whole = resize(image, (37 * 4, 53 * 4), "lanczos").clamp(0, 1)
    for box in [(0, 0, 64, 48), (40, 24, 212, 148), (200, 100, 212, 148)]:
        assert torch.allclose(enlarge(image, 4, box), whole[..., box[1]:box[3], box[0]:box[2]], atol=1e-5)
    padded = enlarge(image, 4, (200, 140, 224, 160))  # beyond the image: edge repeated
    assert padded.shape[-2:] == (20, 24) and torch.equal(padded[..., -1, :12], padded[..., 7, :12])


@pytest.mark.parametrize("blend", ["cosine", "gaussian"])
def test_tiled_equals_untiled_within_the_receptive_field(blend):
    model = local_model(2)
    image = photo(45, 70)  # non-square, no multiple of the tile
    backbone = UpscaleModelBackbone(model, 2, tile=None, dtype=torch.float32, device="cpu")
    config = UpscaleConfig(factor=2, tile=64, overlap=16, context=4, color="none", blend=blend)
    result = upscale_image(image, backbone, config)
    assert len(result.tiles) == 6 and result.passes[0].grid == (2, 3)  # 90 x 140 output in 64-pixel tiles
    with torch.no_grad():
        reference = model(image)
    assert result.image.shape == reference.shape == (1, 3, 90, 140)
    assert torch.allclose(result.image, reference, atol=1e-5)


def test_two_passes_and_alpha_carried():
    model = local_model(2)
    backbone = UpscaleModelBackbone(model, 2, tile=None, dtype=torch.float32, device="cpu")
    rgba = torch.cat([photo(20, 24), torch.linspace(0, 1, 24).expand(1, 1, 20, 24)], dim=1)
    result = upscale_image(rgba, backbone, UpscaleConfig(factor=8, tile=64, overlap=16, context=4, color="none"))
    assert [p.factor for p in result.passes] == [4, 2] and result.image.shape == (1, 4, 160, 192)
    expected_alpha = resize(rgba[:, 3:], (160, 192), "lanczos").clamp(0, 1)
    assert torch.allclose(result.image[:, 3:], expected_alpha, atol=1e-5)
    with torch.no_grad():  # pass 1: the model x2 then bicubic to x4 (the backbone's rule), pass 2: the model
        expected = model(resize(model(rgba[:, :3]), (80, 96), "bicubic").clamp(0, 1))
    assert torch.allclose(result.image[:, :3], expected, atol=1e-4)


class PromptPainter:
    """A backbone that paints each tile with the grey level its prompt names ("0.25" -> 0.25)."""

    name, size_multiple, uses_prompt = "painter", 1, True

    def __call__(self, request):
        return torch.full_like(request.zoomed, float(request.prompts[0]))


class TileMean:
    """A prompt source naming the mean of the tile it sees, and checking the zoom-out view."""

    def __init__(self):
        self.context_sizes = set()

    def __call__(self, request):
        self.context_sizes.add(tuple(request.previous.shape[-2:]))
        return [f"{request.zoomed.mean():.4f}"]


def test_each_tile_gets_its_prompt_and_its_own_view():
    image = photo(48, 80)
    levels = ["0.1", "0.3", "0.5", "0.7", "0.9", "0.2"]
    result = upscale_image(image, PromptPainter(), UpscaleConfig(factor=2, tile=64, overlap=16, color="none"),
                           FixedPrompts(levels))
    assert result.passes[0].grid == (2, 3) and result.prompts == levels
    for t in result.tiles:  # the middle of every tile has its own level, only there
        left, top, right, bottom = t.tile.box
        middle = result.image[..., (top + bottom) // 2, (left + right) // 2]
        assert torch.allclose(middle, torch.tensor(float(t.prompt)), atol=1e-5)

    source = TileMean()
    result = upscale_image(image, PromptPainter(), UpscaleConfig(factor=2, tile=64, overlap=16, color="none",
                                                                 user_prompt=""), source)
    whole = resize(image, (96, 160), "lanczos").clamp(0, 1)
    for t in result.tiles:
        left, top, right, bottom = t.tile.box
        assert float(t.prompt) == pytest.approx(float(whole[..., top:bottom, left:right].mean()), abs=2e-4)
    assert source.context_sizes == {(512, 853)}  # the whole input, 512 on its short side


def test_user_prompt_is_appended():
    result = upscale_image(photo(16, 16), PromptPainter(), UpscaleConfig(factor=2, tile=64, overlap=16,
                                                                        user_prompt="1.0"),
                           FixedPrompts(""))
    assert result.prompts == ["1.0"]


def test_cancel_keeps_the_tiles_done():
    image = photo(48, 80)
    events = []

    def stop() -> bool:
        return sum(e.phase == "tile" for e in events) >= 2

    result = upscale_image(image, PromptPainter(), UpscaleConfig(factor=2, tile=64, overlap=16, color="none"),
                           FixedPrompts("0.5"), on_tile=events.append, should_stop=stop)
    assert result.cancelled and [e.done for e in events] == list(range(1, 9)) and events[0].total == 12
    assert result.image[..., 10, 10].allclose(torch.tensor(0.5)) and float(result.image[..., 90, 150].max()) == 0


@pytest.mark.parametrize("config, message", [
    (dict(factor=3), "x4 and x2 passes"),
    (dict(factor=4, tile=32), "tile must be at least"),
    (dict(factor=4, tile=128, overlap=100), "overlap must be between"),
    (dict(factor=4, color="sepia"), "colour method"),
    (dict(factor=16, memory_limit=10**6), "GB"),
])
def test_bad_settings_are_refused_before_any_work(config, message):
    with pytest.raises((ValueError, MemoryLimitError), match=message):
        upscale_image(photo(32, 32), PromptPainter(), UpscaleConfig(**config))


def test_bad_images_are_refused():
    for bad, message in [(torch.zeros(1, 5, 8, 8), "channels"), (torch.zeros(1, 3, 0, 8), "non-empty"),
                         (torch.full((1, 3, 8, 8), float("nan")), "NaN")]:
        with pytest.raises(ValueError, match=message):
            upscale_image(bad, PromptPainter(), UpscaleConfig(factor=2, tile=64, overlap=16))


def test_memory_estimate_names_the_sizes():
    with pytest.raises(MemoryLimitError) as info:
        upscale_image(photo(100, 150), PromptPainter(), UpscaleConfig(factor=16, memory_limit=2**24))
    assert "2400x1600" in str(info.value) and "lower the factor" in str(info.value)


def test_grid_covers_with_equal_tiles():
    tiles = tile_grid(144, 400, 128, 32, 16)
    assert {(t.box[2] - t.box[0], t.box[3] - t.box[1]) for t in tiles} == {(128, 128)}
    assert all(t.box[0] % 16 == 0 and t.box[1] % 16 == 0 for t in tiles)
    covered = torch.zeros(144, 400, dtype=torch.bool)
    for t in tiles:
        covered[t.box[1]:t.box[3], t.box[0]:t.box[2]] = True
    assert covered.all()


MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from torch import nn
    from coz_core.sr.upscale import UpscaleModelBackbone
    from coz_core.upscale_image import UpscaleConfig, upscale_image
    torch.set_num_threads(1)
    side = int(sys.argv[1])
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Upsample(scale_factor=4), nn.Conv2d(16, 3, 3, padding=1))
    backbone = UpscaleModelBackbone(model.eval(), 4, tile=None, dtype=torch.float32, device="cpu")
    image = torch.rand(1, 3, side, side)
    config = UpscaleConfig(factor=4, tile=256, overlap=32, context=8)
    upscale_image(torch.rand(1, 3, 64, 64), backbone, config)  # warm up: allocator, kernels
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = upscale_image(image, backbone, config)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((peak - base) * 1024, result.image.numel() * 4)
""")


def test_memory_is_the_output_plus_one_tile():
    """Peak RSS beyond the output stays nearly flat when the image grows 9x in area (what grows is
    input-sized: 1/16 of the output)."""
    extra, outputs = [], []
    for side in (256, 768):
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(side)], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).resolve().parent.parent)
        grown, output = map(int, out.stdout.split())
        extra.append(grown - output)
        outputs.append(output)
    # the output grows by 101 MB (12 -> 113 MB); the rest (~30 MB here, allocator noise ~8 MB) by far less
    assert extra[1] - extra[0] < 0.25 * (outputs[1] - outputs[0]), (extra, outputs)

"""The chain end to end on a real photo with the embedded default backbone (Real-ESRGAN x4plus)."""
import json

import pytest
import torch

from coz_core import ChainConfig, run_chain
from coz_core.cli import main, sample_image_path
from coz_core.imageops import load_image, resize


def laplacian_variance(x: torch.Tensor) -> float:
    grey = x.mean(1, keepdim=True)
    k = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3)
    return torch.nn.functional.conv2d(grey, k).var().item()


@pytest.fixture(scope="module")
def photo():
    return load_image(sample_image_path())


@pytest.mark.parametrize("mode", ["recursive_multiscale", "recursive", "onestep", "bicubic", "nearest"])
def test_every_mode(default_backbone, photo, mode):
    config = ChainConfig(mode=mode, steps=2, size=64, center=(0.34, 0.75))
    result = run_chain(photo, default_backbone, config)
    assert len(result.steps) == 3 and not result.cancelled
    for step in result.steps:
        assert step.image.shape == (1, 3, 64, 64) and torch.isfinite(step.image).all()
        assert 0 <= step.image.min() and step.image.max() <= 1
    assert [round(result.zoom_of(s)) for s in result.steps] == [1, 4, 16]
    if mode in ("recursive_multiscale", "recursive", "onestep"):
        # the model adds detail that the bicubic zoom of the same region lacks
        step1 = result.steps[1]
        assert laplacian_variance(step1.image) > 1.5 * laplacian_variance(step1.zoomed)


def test_recursive_uses_the_model_on_its_own_output(default_backbone, photo):
    config = ChainConfig(steps=2, size=64, color="none")
    result = run_chain(photo, default_backbone, config)
    region = result.steps[1].image[..., 24:40, 24:40]  # the centre 16x16 of scale 1
    expected = default_backbone.upscale(region).clamp(0, 1)
    assert torch.allclose(result.steps[2].image, expected, atol=1e-6)


def test_batch_and_cancel(default_backbone, photo):
    batch = torch.cat([photo, photo.flip(-1)])
    seen = []
    result = run_chain(batch, default_backbone, ChainConfig(steps=3, size=64), on_step=seen.append,
                       should_stop=lambda: len(seen) == 2)
    assert result.cancelled and len(result.steps) == 2
    # element 1 is the mirror image of element 0 all the way through (both were processed)
    mirrored = (result.final[1] - result.final[0].flip(-1)).abs().mean()
    assert mirrored < 0.25 * (result.final[1] - result.final[0]).abs().mean()


def test_cli_with_the_default_backbone(tmp_path, default_backbone):
    rc = main(["-o", str(tmp_path), "--size", "64", "--steps", "2", "--precision", "bf16", "--quiet"])
    assert rc == 0
    manifest = json.loads((tmp_path / "sample" / "manifest.json").read_text())
    assert manifest["backbone"] == default_backbone.name
    assert all(s["seconds"]["model"] > 0 for s in manifest["steps"][1:])
    scale2 = load_image(tmp_path / "sample" / "scale_2.png")
    scale1 = load_image(tmp_path / "sample" / "scale_1.png")
    # the zoom is where the manifest says: scale 2 looks like the middle of scale 1, magnified
    left, top, right, bottom = manifest["steps"][2]["crop"]
    assert right - left == 16 and bottom - top == 16
    centre = resize(scale1[..., top:bottom, left:right], (64, 64), "bicubic").clamp(0, 1)
    assert (centre - scale2).abs().mean() < 0.08

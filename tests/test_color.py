"""Colour alignment: AdaIN matches statistics, wavelet swaps low frequencies, both per image."""
import pytest
import torch
import torch.nn.functional as F

from coz_core.color import adain_color_fix, align_color, wavelet_color_fix, wavelet_decomposition
from coz_core.imageops import load_image, resize
from coz_core.cli import sample_image_path


@pytest.fixture(scope="module")
def pair():
    photo = load_image(sample_image_path())[..., 128:256, 128:256]
    sharp = resize(photo, (64, 64), "lanczos").clamp(0, 1)
    tinted = (sharp * torch.tensor([1.2, 0.9, 0.7]).view(1, 3, 1, 1) + 0.05).clamp(0, 1)
    return sharp, tinted


def test_adain_matches_reference_statistics(pair):
    sharp, tinted = pair
    fixed = adain_color_fix(tinted, sharp)
    for c in range(3):
        assert fixed[0, c].mean() == pytest.approx(sharp[0, c].mean().item(), abs=2e-3)
        assert fixed[0, c].std() == pytest.approx(sharp[0, c].std().item(), abs=3e-3)


def blur_reference(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Independent blur: the 3x3 [1,2,1]^2/16 kernel written as 9 shifted replicate-padded copies."""
    padded = F.pad(x, (radius,) * 4, mode="replicate")
    h, w = x.shape[-2:]
    weights = {-1: 1.0, 0: 2.0, 1: 1.0}
    out = torch.zeros_like(x)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            sy, sx = radius + dy * radius, radius + dx * radius
            out += weights[dy] * weights[dx] / 16 * padded[..., sy:sy + h, sx:sx + w]
    return out


def test_wavelet_decomposition_against_independent_blur(pair):
    sharp, _ = pair
    high, low = wavelet_decomposition(sharp)
    ref_low = sharp
    for i in range(5):
        ref_low = blur_reference(ref_low, 2**i)
    assert torch.allclose(low, ref_low, atol=1e-5)
    assert torch.allclose(high + low, sharp, atol=1e-5)


def test_wavelet_keeps_detail_and_reference_colour(pair):
    sharp, tinted = pair
    fixed = wavelet_color_fix(tinted, sharp)
    _, low_fixed = wavelet_decomposition(fixed)
    _, low_sharp = wavelet_decomposition(sharp)
    assert (low_fixed - low_sharp).abs().mean() < 0.01  # colour back to the reference
    high_fixed, _ = wavelet_decomposition(fixed)
    high_tinted, _ = wavelet_decomposition(tinted)
    assert (high_fixed - high_tinted).abs().mean() < 0.01  # detail of the output kept
    assert (tinted - sharp).abs().mean() > 0.05  # and there was a real tint to remove


def test_align_color_dispatch_and_batch(pair):
    sharp, tinted = pair
    batch_out, batch_ref = torch.cat([tinted, sharp]), torch.cat([sharp, tinted])
    for method in ("adain", "wavelet"):
        both = align_color(batch_out, batch_ref, method)
        assert torch.allclose(both[:1], align_color(tinted, sharp, method), atol=1e-6)
        assert torch.allclose(both[1:], align_color(sharp, tinted, method), atol=1e-6)
    assert align_color(tinted, sharp, "none") is tinted
    with pytest.raises(ValueError, match="unknown colour method"):
        align_color(tinted, sharp, "sepia")
    with pytest.raises(ValueError, match="same size"):
        wavelet_color_fix(tinted, sharp[..., :32, :32])

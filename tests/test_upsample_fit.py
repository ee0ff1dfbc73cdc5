"""The fitted kernels: they reconstruct the guide better than bicubic, and beat bicubic on a
guided-upsampling task with ground truth (a real photo's chroma at x4)."""
import torch
import torch.nn.functional as F

from coz_core.upsample import fit_kernels, fixed_kernels, guided_upsample
from tests.upsample_fixtures import photo, psnr


def test_fit_reconstructs_the_guide_better_than_bicubic():
    guide = photo(64)
    k = fit_kernels(guide, lr_size=(16, 16), steps=20)
    low = F.interpolate(guide, size=(16, 16), mode="bicubic", align_corners=False)
    bicubic = F.interpolate(low, size=(64, 64), mode="bicubic", align_corners=False).clamp(0, 1)
    recon = k.apply(low).clamp(0, 1)
    assert k.losses[-1] < 0.6 * k.losses[0]  # the loss fell
    assert psnr(recon, guide) > psnr(bicubic, guide) + 8
    untrained = fit_kernels(guide, lr_size=(16, 16), steps=1).apply(low).clamp(0, 1)
    assert psnr(recon, guide) > psnr(untrained, guide) + 3  # the fit, not the init, does it
    assert (k.sigma_x > 0).all() and (k.sigma_r > 0).all() and (k.theta.abs() < torch.pi).all()


def test_learned_beats_bicubic_on_chroma_with_ground_truth():
    """HR chroma (Cb, Cr) of a photo is the ground truth; its x4 area reduction the signal;
    the HR photo the guide."""
    image = photo(64)
    r, g, b = image.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    chroma = torch.stack([0.564 * (b - y), 0.713 * (r - y)], 1) + 0.5
    low = F.adaptive_avg_pool2d(chroma, (16, 16))
    bicubic = F.interpolate(low, size=(64, 64), mode="bicubic", align_corners=False)
    learned = guided_upsample(low, image, mode="learned", steps=20)
    fixed = fixed_kernels(image, lr_size=(16, 16)).apply(low)
    assert psnr(learned, chroma) > psnr(bicubic, chroma) + 2
    assert psnr(fixed, chroma) > psnr(bicubic, chroma)


def test_early_exit_when_converged():
    flat = torch.full((1, 3, 32, 32), 0.5)  # nothing to learn: the loss is 0 from the start
    k = fit_kernels(flat, lr_size=(8, 8), steps=50, patience=3)
    assert len(k.losses) <= 4 and max(k.losses) < 1e-6


def test_fit_works_in_inference_mode():
    """ComfyUI runs nodes under torch.inference_mode()."""
    guide = photo(32)
    with torch.inference_mode():
        k = fit_kernels(guide, lr_size=(8, 8), steps=2, radius_max=3)
        out = k.apply(torch.rand(1, 2, 8, 8))
    assert out.shape == (1, 2, 32, 32) and len(k.losses) == 2


def test_fit_at_non_integer_scales_different_per_axis():
    guide = F.interpolate(photo(64), size=(50, 41), mode="bilinear", align_corners=False)  # x3.85, x4.56
    k = fit_kernels(guide, lr_size=(13, 9), steps=15)
    low = F.interpolate(guide, size=(13, 9), mode="bicubic", align_corners=False)
    bicubic = F.interpolate(low, size=(50, 41), mode="bicubic", align_corners=False).clamp(0, 1)
    assert k.losses[-1] < 0.6 * k.losses[0]
    assert psnr(k.apply(low).clamp(0, 1), guide) > psnr(bicubic, guide) + 8


def test_fit_on_a_reduced_guide_still_follows_the_full_guide():
    """``fit_side``: the fit sees the guide at half size (on the same LR grid), the kernels
    apply at full size with sigmas in full-size pixels, and still beat bicubic clearly."""
    guide = photo(64)
    low = F.interpolate(guide, size=(16, 16), mode="bicubic", align_corners=False)
    bicubic = F.interpolate(low, size=(64, 64), mode="bicubic", align_corners=False).clamp(0, 1)
    seen = []
    k = fit_kernels(guide, lr_size=(16, 16), steps=15, fit_side=32, callback=lambda s, n, loss: seen.append(s))
    assert k.hr_size == (64, 64) and k.lr_size == (16, 16) and seen == list(range(1, len(k.losses) + 1))
    assert psnr(k.apply(low).clamp(0, 1), guide) > psnr(bicubic, guide) + 5
    full = fit_kernels(guide, lr_size=(16, 16), steps=2, fit_side=64)  # already small enough: no resize
    torch.testing.assert_close(full.sigma_x, fit_kernels(guide, lr_size=(16, 16), steps=2).sigma_x)


def test_callback_can_end_the_fit():
    k = fit_kernels(photo(32), lr_size=(8, 8), steps=50, callback=lambda step, total, loss: step == 3)
    assert len(k.losses) == 3

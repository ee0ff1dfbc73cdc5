"""Shapes, scales, dtypes, batches, channel counts, signal kinds and input errors of the
guided upsampler, and the bilateral colour fix."""
import pytest
import torch
import torch.nn.functional as F

from coz_core.color import COLOR_METHODS, align_color
from coz_core.upsample import bilateral_color_fix, fit_kernels, fixed_kernels, guided_upsample
from tests.upsample_fixtures import photo, psnr


@pytest.fixture(scope="module")
def guide():
    return photo(48)


@pytest.mark.parametrize("lr_size", [(12, 12), (16, 9), (48, 48), (5, 31)])
def test_any_scale_and_channel_count(guide, lr_size):
    k = fixed_kernels(guide, lr_size=lr_size)
    for channels in (1, 3, 70):
        out = k.apply(torch.randn(1, channels, *lr_size), channel_chunk=64)
        assert out.shape == (1, channels, 48, 48) and torch.isfinite(out).all()


def test_scale_argument_and_identity_at_scale_one(guide):
    k = fixed_kernels(guide, scale=(4, 2.5))
    assert k.lr_size == (12, 19) and k.hr_size == (48, 48)
    signal = torch.randn(1, 2, 48, 48)  # scale 1: each pixel is its own cell centre
    torch.testing.assert_close(fixed_kernels(guide, scale=1, sigma_spatial=0.05).apply(signal), signal)


def test_values_stay_in_the_convex_hull_and_constants_are_kept(guide):
    k = fixed_kernels(guide, lr_size=(12, 12))
    signal = torch.randn(1, 4, 12, 12) * 50
    out = k.apply(signal)
    assert (out.amin((2, 3)) >= signal.amin((2, 3)) - 1e-4).all()
    assert (out.amax((2, 3)) <= signal.amax((2, 3)) + 1e-4).all()
    torch.testing.assert_close(k.apply(torch.full((1, 1, 12, 12), 7.5)), torch.full((1, 1, 48, 48), 7.5))


def test_dtypes(guide):
    k = fixed_kernels(guide, lr_size=(12, 12))
    signal = torch.randn(1, 3, 12, 12)
    ref = k.apply(signal)
    assert k.apply(signal.double()).dtype == torch.float64
    assert k.apply(signal.half()).dtype == torch.float16
    assert k.apply(signal, out_dtype=torch.bfloat16).dtype == torch.bfloat16
    assert k.apply(torch.ones(1, 1, 12, 12, dtype=torch.uint8)).dtype == torch.float32
    for acc in (torch.float16, torch.bfloat16):  # the mixed-precision path used on CUDA
        torch.testing.assert_close(k.apply(signal, accumulate_dtype=acc), ref, rtol=0.02, atol=0.03)
    k16 = fixed_kernels(guide.half(), lr_size=(12, 12))  # a half guide is computed in float32
    torch.testing.assert_close(k16.apply(signal), fixed_kernels(guide.half().float(), lr_size=(12, 12)).apply(signal))


def test_batches(guide):
    guides = torch.cat([guide, guide.flip(-1)])
    k = fixed_kernels(guides, lr_size=(12, 12))
    signal = torch.randn(2, 3, 12, 12)
    out = k.apply(signal)
    for n in range(2):
        single = fixed_kernels(guides[n:n + 1], lr_size=(12, 12)).apply(signal[n:n + 1])
        torch.testing.assert_close(out[n:n + 1], single)
    # one guide, many signals (the kernels are reused) and one signal, many guides
    one = fixed_kernels(guide, lr_size=(12, 12))
    many = one.apply(signal)
    torch.testing.assert_close(many[1:], one.apply(signal[1:]))
    torch.testing.assert_close(k.apply(signal[:1])[1:], out[1:] if torch.equal(signal[0], signal[1])
                               else fixed_kernels(guides[1:], lr_size=(12, 12)).apply(signal[:1]))


def test_fitted_batch_matches_single_fits(guide):
    guides = torch.cat([guide, guide.flip(-2)])
    both = fit_kernels(guides, lr_size=(12, 12), steps=3, radius_max=4)
    first = fit_kernels(guides[:1], lr_size=(12, 12), steps=3, radius_max=4)
    # Adam is invariant to the 1/B loss scale, so each element follows its own fit
    torch.testing.assert_close(both.sigma_x[:1], first.sigma_x, rtol=0.01, atol=0)
    assert both.sigma_x.shape == (2, 12, 12) and len(both.losses) == 3


def test_mask_and_probabilities_stay_valid(guide):
    k = fit_kernels(guide, lr_size=(12, 12), steps=5)
    mask = (torch.rand(2, 1, 12, 12) > 0.5).float()
    out = k.apply(mask, kind="mask")
    assert out.min() >= 0 and out.max() <= 1 and out.shape == (2, 1, 48, 48)
    probs = torch.softmax(torch.randn(1, 21, 12, 12) * 3, 1)
    out = k.apply(probs, kind="probabilities")
    assert out.min() >= 0
    torch.testing.assert_close(out.sum(1), torch.ones(1, 48, 48))
    latent = torch.randn(1, 16, 12, 12)
    out = k.apply(latent, kind="latent")  # no renormalisation: affine maps commute with it
    torch.testing.assert_close(k.apply(latent * 5.0 - 3.0, kind="latent"), out * 5.0 - 3.0, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("call, message", [
    (lambda g: fixed_kernels(g, lr_size=(12, 12)).apply(torch.rand(1, 3, 11, 12)), "does not match"),
    (lambda g: fixed_kernels(g, lr_size=(96, 48)), "scale must be >= 1"),
    (lambda g: fixed_kernels(g, scale=0.5), "scale must be >= 1"),
    (lambda g: fixed_kernels(g, lr_size=(12, 12), scale=4), "exactly one"),
    (lambda g: fixed_kernels(g, lr_size=(0, 12)), "positive"),
    (lambda g: fixed_kernels(g[:, :, :0], scale=2), "empty"),
    (lambda g: fixed_kernels(g * float("nan"), scale=2), "NaN"),
    (lambda g: fixed_kernels(g[0], scale=2), r"\[B, C, H, W\]"),
    (lambda g: fixed_kernels(g, scale=4).apply(torch.full((1, 1, 12, 12), float("inf"))), "NaN or infinite"),
    (lambda g: fixed_kernels(g, scale=4).apply(torch.rand(1, 12, 12)), "mask"),
    (lambda g: fixed_kernels(g, scale=4).apply(torch.rand(1, 1, 0, 12)), "empty|does not match"),
    (lambda g: fixed_kernels(g, scale=4).apply(torch.rand(1, 1, 12, 12) * 2, kind="mask"), "0..1"),
    (lambda g: fixed_kernels(g, scale=4).apply(torch.rand(1, 3, 12, 12), kind="probabilities"), "softmax"),
    (lambda g: fixed_kernels(g, scale=4).apply(torch.rand(1, 3, 12, 12), kind="depthmap"), "unknown signal kind"),
    (lambda g: fixed_kernels(torch.cat([g, g]), scale=4).apply(torch.rand(3, 1, 12, 12)), "batch"),
    (lambda g: fixed_kernels(g, scale=4, sigma_range=0), "positive"),
    (lambda g: fit_kernels(g, scale=4, steps=0), "steps"),
    (lambda g: guided_upsample(torch.rand(1, 3, 12, 12), g, mode="magic"), "unknown mode"),
    (lambda g: bilateral_color_fix(g, g[..., :40]), "same shape"),
])
def test_bad_inputs_get_clear_errors(guide, call, message):
    with pytest.raises(ValueError, match=message):
        call(guide)


def test_guided_upsample_modes(guide):
    lr = F.adaptive_avg_pool2d(guide, (12, 12))
    for mode in ("fixed", "learned"):
        out = guided_upsample(lr, guide, mode=mode, **({"steps": 3} if mode == "learned" else {}))
        assert out.shape == guide.shape


def test_bilateral_color_fix_follows_the_outputs_edges():
    """A chain step in miniature: the input is the bicubic zoom of a photo's x4 reduction, the
    SR output is the sharp photo with a tint on its bright regions (a colour drift with edges).
    The bilateral fix removes most of the tint and beats AdaIN and wavelet, whose corrections
    ignore the region's edges."""
    sharp = photo(128)
    zoomed = F.interpolate(F.adaptive_avg_pool2d(sharp, (32, 32)), size=(128, 128), mode="bicubic",
                           align_corners=False).clamp(0, 1)
    region = (sharp.mean(1, keepdim=True) > 0.5).float()
    output = (sharp + region * torch.tensor([0.08, -0.06, 0.05])[:, None, None]).clamp(0, 1)
    fixed = bilateral_color_fix(output, zoomed)
    torch.testing.assert_close(align_color(output, zoomed, "bilateral"), fixed)
    assert fixed.shape == output.shape and 0 <= fixed.min() and fixed.max() <= 1
    assert psnr(fixed, sharp) > psnr(output, sharp) + 6
    for other in ("wavelet", "adain"):
        assert psnr(fixed, sharp) > psnr(COLOR_METHODS[other](output, zoomed), sharp) + 2


def test_kernels_move_and_are_reused_across_signals(guide):
    k = fit_kernels(guide, lr_size=(12, 12), steps=2, radius_max=4)
    moved = k.to("cpu")
    assert moved.lr_size == (12, 12) and moved.losses == k.losses and moved.losses is not k.losses
    depth, mask = torch.rand(1, 1, 12, 12), (torch.rand(1, 1, 12, 12) > 0.5).float()
    torch.testing.assert_close(moved.apply(depth), k.apply(depth))
    # channels are independent: one apply of a stack equals separate applies
    torch.testing.assert_close(k.apply(torch.cat([depth, mask], 1)),
                               torch.cat([k.apply(depth), k.apply(mask, kind="mask")], 1))

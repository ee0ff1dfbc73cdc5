"""The zoom chain: reference semantics, per-step records, batches, prompts, cancel, bad input."""
import numpy as np
import pytest
import torch
from PIL import Image

from coz_core import ChainConfig, FixedPrompts, SRRequest, run_chain
from coz_core.cli import sample_image_path
from coz_core.imageops import load_image, resize


class LanczosBackbone:
    """A model-free SR backbone: Lanczos-magnifies the native region. Records what it was given."""

    name = "lanczos"
    size_multiple = 1
    uses_prompt = True

    def __init__(self):
        self.requests: list[SRRequest] = []

    def __call__(self, request: SRRequest) -> torch.Tensor:
        self.requests.append(request)
        return resize(request.region, request.size, "lanczos").clamp(0, 1)


@pytest.fixture(scope="module")
def photo():
    return load_image(sample_image_path())[..., 64:448, :]  # 512 x 384, not square


def pil_reference_chain(img: Image.Image, size: int, upscale: int, steps: int, mode: str):
    """The reference's bicubic / nearest modes with Pillow on float images (no 8-bit rounding)."""
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = int(w * scale), int(h * scale)
    chans = [Image.fromarray(np.asarray(img, np.float32)[..., c] / 255) for c in range(3)]
    first = [c.resize((new_w, new_h), Image.LANCZOS) for c in chans]
    left, top = (new_w - size) // 2, (new_h - size) // 2
    first = [c.crop((left, top, left + size, top + size)) for c in first]
    first = [Image.fromarray(np.clip(np.asarray(c), 0, 1)) for c in first]
    outs = []
    for rec in range(steps):
        r = upscale ** (rec + 1)
        nw, nh = size // r, size // r
        box = ((size - nw) // 2, (size - nh) // 2, (size + nw) // 2, (size + nh) // 2)
        filt = Image.NEAREST if mode == "nearest" else Image.BICUBIC
        outs.append(np.stack([np.asarray(c.crop(box).resize((size, size), filt)) for c in first], 0))
    return np.stack([np.asarray(c) for c in first], 0), outs


@pytest.mark.parametrize("mode", ["bicubic", "nearest"])
def test_baseline_modes_equal_the_reference(mode):
    img = Image.open(sample_image_path()).crop((0, 30, 500, 400))
    x = torch.from_numpy(np.asarray(img, np.float32) / 255).permute(2, 0, 1)[None]
    result = run_chain(x, None, ChainConfig(mode=mode, steps=3, zoom=4, size=128))
    first, outs = pil_reference_chain(img, 128, 4, 3, mode)
    np.testing.assert_allclose(result.steps[0].image[0].numpy(), first, atol=1e-4)
    for step, ref in zip(result.steps[1:], outs):
        np.testing.assert_allclose(step.image[0].clamp(0, 1).numpy(), np.clip(ref, 0, 1), atol=1e-4)


def test_recursive_multiscale_records_everything(photo):
    backbone = LanczosBackbone()
    seen = []
    config = ChainConfig(steps=3, zoom=4, size=(128, 96), color="none", seed=5)
    result = run_chain(photo, backbone, config, FixedPrompts(["a", "b"]), on_step=seen.append)
    assert [s.index for s in seen] == [0, 1, 2, 3] and not result.cancelled
    assert all(s.image.shape == (1, 3, 96, 128) for s in result.steps)
    # every step crops the previous output and resizes it back: 32x24 region -> 128x96
    for prev, step, req in zip(result.steps, result.steps[1:], backbone.requests):
        assert step.crop == (48, 36, 80, 60)
        assert req.region.shape[-2:] == (24, 32)
        assert torch.equal(req.region, prev.image[..., 36:60, 48:80])
        assert torch.allclose(step.zoomed, resize(req.region, (96, 128), "bicubic").clamp(0, 1))
        assert torch.equal(step.image, resize(req.region, (96, 128), "lanczos").clamp(0, 1))
    assert [r.seed for r in backbone.requests] == [6, 7, 8]
    assert result.prompts == [["a"], ["b"], ["b"]]  # per-step list, last one repeats
    # magnification relative to scale 0 is exactly 4^k here; boxes nest inside each other
    mags = [s.magnification / result.steps[0].magnification for s in result.steps]
    assert mags == pytest.approx([1, 4, 16, 64])
    for outer, inner in zip(result.steps, result.steps[1:]):
        assert outer.box.left <= inner.box.left < inner.box.right <= outer.box.right


def test_user_prompt_is_appended_like_the_reference(photo):
    backbone = LanczosBackbone()
    run_chain(photo, backbone, ChainConfig(steps=2, size=64, user_prompt="film grain"),
              FixedPrompts("red fabric"))
    assert backbone.requests[0].prompts == ["red fabric, film grain,"]
    backbone = LanczosBackbone()
    run_chain(photo, backbone, ChainConfig(steps=1, size=64, user_prompt="film grain"))
    assert backbone.requests[0].prompts == ["film grain"]


def test_every_batch_element_is_processed(photo):
    other = torch.flip(photo, dims=[-1]) * 0.5
    batch = torch.cat([photo, other])
    config = ChainConfig(steps=2, size=64, color="wavelet")
    both = run_chain(batch, LanczosBackbone(), config)
    for i, single in enumerate([photo, other]):
        alone = run_chain(single, LanczosBackbone(), config)
        for a, b in zip(alone.steps, both.steps):
            assert torch.allclose(a.image[0], b.image[i], atol=1e-6)
    assert not torch.allclose(both.final[0], both.final[1])


def test_cancel_between_steps_returns_what_was_done(photo):
    done = []
    result = run_chain(photo, LanczosBackbone(), ChainConfig(steps=4, size=64),
                       on_step=done.append, should_stop=lambda: len(done) >= 3)
    assert result.cancelled and len(result.steps) == 3 and len(done) == 3
    assert result.final.shape == (1, 3, 64, 64)


def test_off_centre_target_is_followed(photo):
    config = ChainConfig(mode="bicubic", steps=3, size=128, center=(0.8, 0.3))
    result = run_chain(photo, None, config)
    h, w = photo.shape[-2:]
    tx, ty = 0.8 * w, 0.3 * h
    for step in result.steps:
        assert step.box.left <= tx <= step.box.right and step.box.top <= ty <= step.box.bottom
    recursive = run_chain(photo, LanczosBackbone(), ChainConfig(steps=3, size=128, center=(0.8, 0.3)))
    for a, b in zip(result.steps, recursive.steps):  # both chains zoom to the same place
        assert a.box.width == pytest.approx(b.box.width, rel=0.05)
        assert abs((a.box.left + a.box.right) - (b.box.left + b.box.right)) / 2 <= 2.0


def test_non_integer_zoom(photo):
    result = run_chain(photo, LanczosBackbone(), ChainConfig(steps=3, zoom=2.5, size=100))
    assert [s.crop[2] - s.crop[0] for s in result.steps[1:]] == [40, 40, 40]
    mags = [s.magnification / result.steps[0].magnification for s in result.steps]
    assert mags == pytest.approx([1, 2.5, 6.25, 15.625])


@pytest.mark.parametrize("kwargs,match", [
    (dict(steps=0), "steps"), (dict(zoom=1.0), "zoom"), (dict(zoom=float("nan")), "zoom"),
    (dict(center=(1.2, 0.5)), "centre"), (dict(size=4), "process size"),
    (dict(mode="sideways"), "unknown mode"), (dict(color="sepia"), "colour"),
    (dict(size=16, zoom=4, steps=3, mode="bicubic"), "too small"),
])
def test_absurd_parameters_are_refused(photo, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_chain(photo, LanczosBackbone(), ChainConfig(**kwargs))


def test_bad_images_and_backbones_are_refused(photo):
    with pytest.raises(ValueError, match="needs an SR backbone"):
        run_chain(photo, None, ChainConfig())
    nan = photo.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        run_chain(nan, LanczosBackbone(), ChainConfig(steps=1, size=64))
    with pytest.raises(ValueError, match="non-empty"):
        run_chain(torch.zeros(0, 3, 8, 8), LanczosBackbone(), ChainConfig(steps=1, size=64))

    class Picky(LanczosBackbone):
        size_multiple = 16
    with pytest.raises(ValueError, match="multiple of 16"):
        run_chain(photo, Picky(), ChainConfig(steps=1, size=(72, 64)))

    class Broken(LanczosBackbone):
        def __call__(self, request):
            return request.zoomed[..., :-1, :]
    with pytest.raises(RuntimeError, match="returned"):
        run_chain(photo, Broken(), ChainConfig(steps=1, size=64))


def test_grey_and_alpha_inputs(photo):
    grey = photo.mean(1, keepdim=True)
    result = run_chain(grey, LanczosBackbone(), ChainConfig(steps=1, size=64))
    assert result.final.shape == (1, 3, 64, 64)
    rgba = torch.cat([photo, torch.ones_like(photo[:, :1])], 1)
    assert torch.allclose(run_chain(rgba, LanczosBackbone(), ChainConfig(steps=1, size=64)).final,
                          run_chain(photo, LanczosBackbone(), ChainConfig(steps=1, size=64)).final)

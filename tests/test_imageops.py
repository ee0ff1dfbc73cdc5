"""Resampling matches Pillow; image files of every common kind load correctly or fail clearly."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from coz_core.imageops import ensure_rgb, load_image, read_image, resize, save_image, to_bchw, to_bhwc
from coz_core.upscale_cli import load_with_alpha

PIL_FILTERS = {"bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS, "bilinear": Image.BILINEAR,
               "nearest": Image.NEAREST}


def pil_float_resize(array: np.ndarray, size_wh, filt, box=None) -> np.ndarray:
    """Independent reference: Pillow on 32-bit float ('F') images, channel by channel."""
    chans = [np.asarray(Image.fromarray(array[..., c]).resize(size_wh, PIL_FILTERS[filt], box=box))
             for c in range(array.shape[-1])]
    return np.stack(chans, -1)


@pytest.mark.parametrize("filt", ["bicubic", "lanczos", "bilinear", "nearest"])
@pytest.mark.parametrize("in_hw,out_hw", [((37, 53), (128, 96)), ((128, 128), (32, 32)),
                                          ((300, 451), (512, 341)), ((17, 19), (17, 61))])
def test_resize_matches_pillow_float(filt, in_hw, out_hw):
    rng = np.random.default_rng(0)
    array = rng.random((*in_hw, 3), dtype=np.float32)
    ours = resize(torch.from_numpy(array).permute(2, 0, 1)[None], out_hw, filt)[0].permute(1, 2, 0).numpy()
    ref = pil_float_resize(array, (out_hw[1], out_hw[0]), filt)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=2e-5)


def test_resize_box_matches_pillow():
    array = np.random.default_rng(1).random((40, 60, 3), dtype=np.float32)
    box = (10.5, 3.25, 34.0, 27.75)
    ours = resize(torch.from_numpy(array).permute(2, 0, 1), (64, 48), "bicubic", box=box).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, pil_float_resize(array, (48, 64), "bicubic", box=box), atol=2e-5)


def test_resize_matches_pillow_uint8_within_rounding():
    """The reference resizes 8-bit RGB images. Pillow's 8-bit path rounds and clips between its
    horizontal and vertical passes; emulating that with our coefficients lands within 1/255."""
    from coz_core.cli import sample_image_path

    img = Image.open(sample_image_path()).crop((200, 200, 328, 328))
    ref = np.asarray(img.resize((512, 512), Image.BICUBIC), dtype=np.float32)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)
    horizontal = resize(x, (128, 512), "bicubic").round().clamp(0, 255)
    ours = resize(horizontal, (512, 512), "bicubic").round().clamp(0, 255).permute(1, 2, 0).numpy()
    assert np.abs(ours - ref).max() <= 1.0
    # and without the intermediate rounding, all but edge overshoots agree within rounding
    plain = resize(x / 255, (512, 512), "bicubic").clamp(0, 1).permute(1, 2, 0).numpy() * 255
    assert np.mean(np.abs(plain - ref) <= 1.0) > 0.995


def test_torch_bicubic_is_not_pillow():
    """Why the resampler exists: torch's bicubic (a = -0.75, no antialias) differs visibly."""
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ours = resize(x, (16, 16), "bicubic")
    theirs = torch.nn.functional.interpolate(x, (16, 16), mode="bicubic", align_corners=False)
    assert (ours - theirs).abs().max() > 0.05


def test_layout_roundtrip_and_rgb():
    x = torch.rand(2, 5, 7, 3)
    assert torch.equal(to_bhwc(to_bchw(x)), x)
    assert ensure_rgb(torch.rand(1, 1, 4, 4)).shape == (1, 3, 4, 4)
    rgba = torch.rand(1, 4, 4, 4)
    assert torch.equal(ensure_rgb(rgba), rgba[:, :3])
    with pytest.raises(ValueError, match="1 to 4 image channels"):
        ensure_rgb(torch.rand(1, 5, 4, 4))


def test_load_image_kinds(tmp_path):
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_allclose(load_image(tmp_path / "rgb.png")[0].permute(1, 2, 0).numpy(), rgb / 255, atol=1e-6)

    grey = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    g = load_image(tmp_path / "grey.png")
    assert g.shape == (1, 3, 20, 30) and torch.equal(g[0, 0], g[0, 2])

    rgba = np.concatenate([rgb, np.full((20, 30, 1), 7, np.uint8)], -1)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    # transparency composited on white: the colour stored under it is not shown as if opaque
    on_white = rgb / 255 * (7 / 255) + (1 - 7 / 255)
    np.testing.assert_allclose(load_image(tmp_path / "rgba.png")[0].permute(1, 2, 0).numpy(), on_white, atol=1e-6)

    deep = rng.integers(0, 65536, (20, 30), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    d = load_image(tmp_path / "deep.png")
    np.testing.assert_allclose(d[0, 0].numpy(), deep / 65535, atol=1e-6)  # 16 bits kept

    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    assert load_image(tmp_path / "palette.png").shape == (1, 3, 20, 30)


def _with_orientation(image: Image.Image, path, orientation: int):
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif)
    return path


def _upright(path) -> np.ndarray:
    """Independent reference: Pillow's own exif_transpose (what ComfyUI's LoadImage applies)."""
    with Image.open(path) as img:
        return np.asarray(ImageOps.exif_transpose(img))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_images_are_read_upright_as_their_exif_orientation_says(tmp_path, orientation):
    rng = np.random.default_rng(orientation)
    rgb = _with_orientation(Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)),
                            tmp_path / "rgb.png", orientation)
    loaded = read_image(rgb)
    want = _upright(rgb) / 255
    np.testing.assert_allclose(loaded.image[0].permute(1, 2, 0).numpy(), want, atol=1e-6)
    assert loaded.size == (want.shape[1], want.shape[0])  # as seen: boxes are given in these pixels
    deep = _with_orientation(Image.fromarray(rng.integers(0, 65536, (20, 30), dtype=np.uint16)),
                             tmp_path / "deep.png", orientation)
    np.testing.assert_allclose(load_image(deep)[0, 0].numpy(), _upright(deep) / 65535, atol=1e-6)
    rgba = _with_orientation(Image.fromarray(rng.integers(0, 256, (20, 30, 4), dtype=np.uint8)),
                             tmp_path / "rgba.png", orientation)  # the upscale CLI keeps alpha
    np.testing.assert_allclose(load_with_alpha(rgba)[0][0].permute(1, 2, 0).numpy(), _upright(rgba) / 255, atol=1e-6)


def test_a_large_image_on_its_side_is_reduced_by_its_upright_size(tmp_path, monkeypatch):
    stored = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 240, 3), dtype=np.uint8))
    path = _with_orientation(stored, tmp_path / "tall.png", 6)  # seen 60 wide, 240 high
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    loaded = read_image(path, allow_large=True, process_size=(10, 20))
    # 3x the 10 x 20 processing size fits in 60 x 240 twice (not 4x, as the stored 240 x 60 would say)
    assert loaded.size == (60, 240) and loaded.image.shape == (1, 3, 120, 30) and loaded.scale == (2.0, 2.0)


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="not an image"):
        load_image(tmp_path / "notes.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.png"):
        load_image(tmp_path / "cut.png")


def test_save_image_roundtrip(tmp_path):
    x = torch.rand(1, 3, 9, 11)
    path = save_image(x, tmp_path / "sub" / "x.png")
    assert (load_image(path) - x).abs().max() <= 0.5 / 255 + 1e-6
    with pytest.raises(ValueError, match="one image"):
        save_image(torch.rand(2, 3, 4, 4), tmp_path / "y.png")


def test_phone_photos_in_heic_are_read_with_pillow_heif(tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif")
    y, x = np.mgrid[0:48, 0:64]
    smooth = np.stack([x * 4, y * 5, (x + y) * 2], -1).astype(np.uint8)  # what lossy HEVC keeps
    pillow_heif.from_bytes(mode="RGB", size=(64, 48), data=smooth.tobytes()).save(tmp_path / "photo.heic", quality=95)
    loaded = read_image(tmp_path / "photo.heic")
    assert loaded.size == (64, 48)
    assert np.abs(loaded.image[0].permute(1, 2, 0).numpy() * 255 - smooth).mean() < 3
    from coz_core.cli import collect_inputs
    assert collect_inputs([str(tmp_path)]) == [tmp_path / "photo.heic"]  # found in folders
    data = (tmp_path / "photo.heic").read_bytes()
    (tmp_path / "cut.heic").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.heic could not be decoded"):  # named, as Pillow's own errors
        read_image(tmp_path / "cut.heic")


def test_an_unreadable_heic_says_what_reads_it(tmp_path, monkeypatch):
    import coz_core.imageops as imageops

    monkeypatch.setattr(imageops, "heif_plugin", lambda: False)  # as without pillow-heif
    (tmp_path / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(40))
    with pytest.raises(ValueError, match="photo.heic is not an image Pillow can read.*pip install pillow-heif"):
        read_image(tmp_path / "photo.heic")

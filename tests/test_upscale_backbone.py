"""The embedded Real-ESRGAN backbone and UpscaleModelBackbone: cache, real photos, tiling, dtypes, chain."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from skimage import data

from coz_core.imageops import resize
from coz_core.sr.base import SRBackbone, SRRequest
from coz_core.sr.realesrgan import (FORMAT, convert, default_cache_dir, ensure_converted, load_embedded,
                                    load_upscale_state_dict, model_spec)
from coz_core.sr.rrdbnet import RRDBNet, SRVGGNetCompact, UnsupportedArchitecture
from coz_core.policy import auto_dtype
from coz_core.sr.upscale import UpscaleModelBackbone
from coz_core.zoom import ChainConfig, run_chain


def as_tensor(picture) -> torch.Tensor:
    return torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0).permute(2, 0, 1)[None].contiguous()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / ((a - b) ** 2).mean()))


def laplacian_variance(image: torch.Tensor) -> float:
    grey = image.mean(1, keepdim=True) * 255
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])[None, None]
    return float(torch.nn.functional.conv2d(grey, kernel).var())


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """Convert x4plus and the compact model once, into a private default cache dir."""
    folder = tmp_path_factory.mktemp("coz-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COZ_CACHE_DIR", str(folder))
        assert ensure_converted("x4plus") == folder / "RealESRGAN_x4plus.safetensors"
        ensure_converted("animevideov3")
    return folder


@pytest.fixture(scope="module")
def x4plus(cache_dir):
    """x4plus in float32 (a module of its own: the backbone casts its weights in place)."""
    return load_embedded("x4plus", cache_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def x4plus_bf16(cache_dir):
    return load_embedded("x4plus", cache_dir, dtype=torch.bfloat16)


@pytest.fixture
def compact(cache_dir):
    return load_upscale_state_dict(cache_dir / "realesr-animevideov3.safetensors")


@pytest.fixture(scope="module")
def coffee():
    """A 256 x 256 crop of a real photo, its 64 x 64 PIL-bicubic reduction and that enlarged again."""
    hr = Image.fromarray(data.coffee()).crop((200, 100, 456, 356))
    lr = hr.resize((64, 64), Image.BICUBIC)
    return as_tensor(hr), as_tensor(lr), as_tensor(lr.resize((256, 256), Image.BICUBIC))


# --- cache and loading ---------------------------------------------------------------------

def test_cache_file_round_trips_and_is_reused(cache_dir):
    path = cache_dir / "RealESRGAN_x4plus.safetensors"
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
        stored = {k: handle.get_tensor(k) for k in handle.keys()}
    assert meta["format"] == FORMAT and meta["architecture"] == "RRDBNet" and meta["scale"] == "4"
    assert sorted(json.loads(meta["source_sha256"]).values()) == sorted(model_spec("x4plus").sha256)
    assert "BSD-3-Clause" in meta["license"]
    fresh, _ = convert("x4plus")
    assert stored.keys() == fresh.keys() and all(torch.equal(stored[k], fresh[k]) for k in fresh)
    # reused: no conversion (the source folder given here does not even exist), file untouched
    mtime = path.stat().st_mtime_ns
    assert ensure_converted("x4plus", cache_dir, source_dir=cache_dir / "absent") == path
    assert path.stat().st_mtime_ns == mtime
    assert not list(cache_dir.glob("*.tmp"))
    assert path.stat().st_mode & 0o777 == 0o644


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("COZ_CACHE_DIR", str(tmp_path / "a"))
    assert default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("COZ_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "coz"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "coz"


def test_stale_cache_is_replaced_foreign_files_are_kept_or_reused(cache_dir, tmp_path):
    name, filename = "animevideov3", "realesr-animevideov3.safetensors"
    source = cache_dir / filename
    state = {k: v.clone() for k, v in load_upscale_state_dict(source).state_dict().items()}
    path = tmp_path / filename
    # a stale file of ours (converted from other sources) is replaced
    save_file(state, str(path), metadata={"format": FORMAT, "source_sha256": json.dumps({"x": "0" * 64})})
    ensure_converted(name, tmp_path)
    with safe_open(str(path), "pt") as handle:
        assert sorted(json.loads(handle.metadata()["source_sha256"]).values()) == sorted(model_spec(name).sha256)
    # a user's own copy with the right tensors is used as it is
    save_file(state, str(path))
    ensure_converted(name, tmp_path)
    with safe_open(str(path), "pt") as handle:
        assert not handle.metadata()
    # a foreign file that is something else is reported and left alone
    path.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="Rename or remove it"):
        ensure_converted(name, tmp_path)
    assert path.read_bytes() == b"not a model"


def test_users_pth_files_load(compact, tmp_path):
    """Real-ESRGAN's release layouts ({'params': ...}, {'params_ema': ...}) in .pth files."""
    torch.save({"params": compact.state_dict()}, tmp_path / "realesr-animevideov3.pth")
    again = load_upscale_state_dict(tmp_path / "realesr-animevideov3.pth")
    x = torch.rand(1, 3, 8, 8)
    assert isinstance(again, SRVGGNetCompact) and torch.equal(again(x), compact(x))
    x2 = RRDBNet(scale=2, num_feat=16, num_block=2, num_grow_ch=8)
    torch.save({"params_ema": x2.state_dict()}, tmp_path / "RealESRGAN_x2plus.pth")
    loaded = load_upscale_state_dict(tmp_path / "RealESRGAN_x2plus.pth")
    assert isinstance(loaded, RRDBNet) and loaded.scale == 2 and len(loaded.body) == 2
    with torch.no_grad():
        assert torch.equal(loaded(x), x2.eval()(x)) and loaded(x).shape == (1, 3, 16, 16)


def test_other_files_are_refused(tmp_path):
    save_file({"model.0.weight": torch.zeros(4, 3, 3, 3)}, str(tmp_path / "esrgan_old.safetensors"))
    with pytest.raises(UnsupportedArchitecture, match="Load Upscale Model"):
        load_upscale_state_dict(tmp_path / "esrgan_old.safetensors")
    torch.save({"params": {"conv_first.weight": torch.zeros(1)}, "net": torch.nn.Conv2d(1, 1, 1)},
               tmp_path / "pickled_module.pth")
    with pytest.raises(ValueError, match="refused to load"):
        load_upscale_state_dict(tmp_path / "pickled_module.pth")
    with pytest.raises(ValueError, match="no such file"):
        load_upscale_state_dict(tmp_path / "missing.pth")


# --- the backbone ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def restored(x4plus, coffee):
    """x4plus (float32) on the 64 x 64 photo."""
    return x4plus(SRRequest(coffee[1], coffee[2]))


def test_x4plus_restores_a_real_photo(x4plus, coffee, restored):
    hr, _, bicubic = coffee
    assert isinstance(x4plus, SRBackbone) and x4plus.dtype == torch.float32
    assert restored.shape == hr.shape and restored.dtype == torch.float32
    assert laplacian_variance(restored) > 5 * laplacian_variance(bicubic)
    assert psnr(restored, hr) > psnr(bicubic, hr) - 2.0


def test_bf16_close_to_fp32(x4plus_bf16, coffee, restored):
    assert next(x4plus_bf16.module.parameters()).is_contiguous(memory_format=torch.channels_last)
    out = x4plus_bf16(SRRequest(coffee[1], coffee[2]))
    assert out.dtype == torch.float32 and psnr(out, restored) > 40


def test_batch_of_two(x4plus, coffee):
    lr = coffee[1]
    batch = torch.cat([lr[..., :16, :16], lr[..., 30:46, 20:36]])
    out = x4plus.upscale(batch)
    assert out.shape == (2, 3, 64, 64)
    for i in range(2):
        assert torch.allclose(out[i:i + 1], x4plus.upscale(batch[i:i + 1]), atol=1e-4)
    assert (out[0] - out[1]).abs().mean() > 0.05


def test_compact_tiles_are_exact_with_enough_context(compact):
    """The compact model sees 18 pixels each way: tiles with 18 pixels of context are exact."""
    image = torch.rand(2, 3, 45, 61, generator=torch.Generator().manual_seed(1))
    whole = UpscaleModelBackbone(copy.deepcopy(compact), tile=None, dtype=torch.float32).upscale(image)
    tiled = UpscaleModelBackbone(copy.deepcopy(compact), tile=16, overlap=18, dtype=torch.float32)
    assert torch.allclose(tiled.upscale(image), whole, atol=1e-5)
    tiled.overlap = 4
    assert (tiled.upscale(image) - whole).abs().max() > 1e-3  # too little context shows


def test_x4plus_tiled_matches_untiled(x4plus, coffee):
    strip = coffee[1][..., 20:28, :]
    strip = torch.cat([strip, strip[..., :56].flip(-1)], -1)  # 8 x 120
    x4plus.tile = None
    whole = x4plus.upscale(strip)
    x4plus.tile = 40  # three tiles: the outer ones cut 64 pixels of context from the middle
    try:
        tiled = x4plus.upscale(strip)
    finally:
        x4plus.tile = 256
    assert 0 < (tiled - whole).abs().max() < 2e-3  # (0: the tiles really differ from the whole)


def test_duck_typed_model_and_resize(compact):
    class Descriptor:  # what spandrel's ImageModelDescriptor offers: callable, .scale, .model
        def __init__(self, model):
            self.model, self.scale, self.supports_bfloat16 = model, 4, False

        def __call__(self, image):
            return self.model(image)

    backbone = UpscaleModelBackbone(Descriptor(compact), restore=True, weights=compact)
    assert backbone.dtype == torch.float32 == auto_dtype(torch.device("cpu"), bf16_ok=False)
    assert backbone.device == torch.device("cpu") and backbone.name == "Descriptor x4"
    region = torch.rand(1, 3, 32, 32)
    out = backbone(SRRequest(region, torch.zeros(1, 3, 64, 64)))  # zoom 2 with a x4 model
    assert out.shape == (1, 3, 64, 64)
    assert torch.allclose(out, resize(backbone.upscale(region), (64, 64)).clamp(0, 1))
    # restore=True leaves the shared model as it was
    bf16 = UpscaleModelBackbone(Descriptor(compact), dtype=torch.bfloat16, restore=True, weights=compact)
    bf16.upscale(region)
    assert next(compact.parameters()).dtype == torch.float32
    assert bf16.dtype == torch.bfloat16


def test_bare_function_with_a_scale():
    def nearest_x2(image):
        assert image.dtype == torch.float32
        return image.repeat_interleave(2, -2).repeat_interleave(2, -1)

    nearest_x2.scale = 2
    backbone = UpscaleModelBackbone(nearest_x2)
    region = torch.rand(2, 3, 300, 10)  # taller than a tile: split into two tiles per image
    assert torch.equal(backbone.upscale(region), nearest_x2(region))


def test_errors(compact):
    with pytest.raises(TypeError, match="scale"):
        UpscaleModelBackbone(torch.nn.Identity())
    wrong = UpscaleModelBackbone(compact, scale=2, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="expected"):
        wrong.upscale(torch.rand(1, 3, 8, 8))


def test_default_dtype_and_device(compact):
    backbone = UpscaleModelBackbone(compact)
    assert backbone.device == torch.device("cpu")
    assert backbone.dtype == auto_dtype(torch.device("cpu"))
    assert next(compact.parameters()).dtype == backbone.dtype


def test_run_chain_end_to_end(x4plus_bf16):
    image = as_tensor(data.astronaut())
    config = ChainConfig(mode="recursive_multiscale", steps=2, zoom=4.0, size=(128, 128))
    result = run_chain(image, x4plus_bf16, config)
    assert len(result.steps) == 3 and not result.cancelled
    blur = lambda x: torch.nn.functional.avg_pool2d(x, 8)  # noqa: E731
    for step in result.steps[1:]:
        sr, zoomed = step.image, step.zoomed
        assert sr.shape == (1, 3, 128, 128) and 0 <= sr.min() and sr.max() <= 1
        assert laplacian_variance(sr) > 10 * laplacian_variance(zoomed)  # real detail added
        assert psnr(blur(sr), blur(zoomed)) > 28  # the same picture
    bicubic = run_chain(image, None, ChainConfig(mode="bicubic", steps=1, zoom=4.0, size=(128, 128)))
    assert psnr(blur(result.images[1]), blur(bicubic.images[1])) > 28

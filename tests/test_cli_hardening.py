"""coz-zoom's defences (issue 12, command line): every bad argument refused before a model
loads, outputs checked before compute and written atomically, one folder per input, large,
transparent, 16-bit and animated inputs, and a manifest that says how the results were made."""
import errno
import json
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import coz_core.cli as cli
from coz_core.cli import main, sample_image_path
from coz_core.output import folder_names

FAST = ["--mode", "bicubic", "--size", "32", "--steps", "2", "--quiet"]


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to build a model fails the test: checks must come first."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")
    monkeypatch.setattr(cli, "build_backbone", refuse)
    monkeypatch.setattr(cli, "build_prompt_source", refuse)


@pytest.mark.parametrize("args,message", [
    (["--steps", "27"], "at most 20 steps"),
    (["--steps", "0"], "steps must be between"),
    (["--zoom", "1"], "zoom per step"),
    (["--size", "4"], "process size"),
    (["--center", "2,0.5"], "centre"),
    (["--device", "banana"], "unknown device"),
    (["--device", "cuda"], "not available here"),
    (["--vlm", "nowhere/Qwen"], "Qwen2.5-VL folder not found: nowhere/Qwen"),
    (["--sd3", "missing.safetensors"], "--sd3 missing.safetensors: no such"),
])
def test_bad_settings_are_refused_before_any_model(tmp_path, capsys, no_model, args, message):
    if args == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["-o", str(tmp_path / "out")] + args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value,message", [("0.3", "both x and y"), ("abc", "two numbers x,y")])
def test_center_needs_two_numbers(tmp_path, capsys, value, message):
    with pytest.raises(SystemExit):
        main(["-o", str(tmp_path), "--center", value])
    err = capsys.readouterr().err
    assert message in err and "must look like 512" not in err


class Resizer:
    """A prompt-free SR backbone: Pillow-exact bicubic resize of the region."""
    name, size_multiple, uses_prompt = "resizer", 1, False

    def __call__(self, request):
        from coz_core.imageops import resize
        return resize(request.region, request.size, "bicubic").clamp(0, 1)


def test_deep_chain_magnification_stays_finite(tmp_path, monkeypatch):
    """20 steps at zoom 4 (2^40, the most allowed): the box width underflows next to its
    coordinates, but magnification is carried in logs and the manifest is written."""
    monkeypatch.setattr(cli, "build_backbone", lambda *a: Resizer())
    assert main(["-o", str(tmp_path), "--mode", "recursive", "--size", "8", "--zoom", "4", "--steps", "20",
                 "--quiet", "--center", "0.31,0.52"]) == 0
    manifest = json.loads((tmp_path / "sample" / "manifest.json").read_text())
    # at 8 px every crop is 2 px: exactly 4x per step
    assert manifest["steps"][-1]["zoom"] == pytest.approx(4.0 ** 20)


def _write(path, w=24, h=16, mode="RGB", color=(200, 30, 60)):
    Image.new(mode, (w, h), color).save(path)
    return path


def test_same_stem_inputs_get_their_own_folders(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _write(src / "photo.png")
    _write(src / "photo.jpg", color=(10, 200, 10))
    _write(src / "other.png")
    assert main([str(src), "-o", str(tmp_path / "out")] + FAST) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["other", "photo_jpg", "photo_png"]
    jpg = json.loads((tmp_path / "out" / "photo_jpg" / "manifest.json").read_text())
    assert jpg["input"].endswith("photo.jpg")


def test_folder_names_rules():
    from pathlib import Path

    names = folder_names([Path("a/photo.png"), Path("b/photo.png"), Path("a/photo.JPG"), Path("x.png")])
    assert names == ["photo_png", "photo_png_2", "photo_jpg", "x"]


def test_existing_results_are_refused_then_replaced_whole(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["-o", str(out), "--mode", "bicubic", "--size", "64", "--steps", "3", "--quiet"]) == 0
    assert (out / "sample" / "scale_3.png").is_file()
    assert main(["-o", str(out)] + FAST) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["-o", str(out), "--overwrite"] + FAST) == 0
    assert not (out / "sample" / "scale_3.png").exists()  # no stale scales beside a 2-step manifest
    assert len(json.loads((out / "sample" / "manifest.json").read_text())["steps"]) == 3
    assert [p.name for p in out.iterdir()] == ["sample"]  # no temporary folders left


def test_output_that_is_a_file_or_under_one(tmp_path, capsys, no_model):
    target = tmp_path / "file.txt"
    target.write_text("x")
    assert main(["-o", str(target)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["-o", str(target / "sub")]) == 2
    assert "under a file" in capsys.readouterr().err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_output_is_refused(tmp_path, capsys, no_model):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["-o", str(ro / "out")]) == 2
        assert "cannot write" in capsys.readouterr().err
    finally:
        ro.chmod(0o755)


def test_read_only_output_is_refused_as_root_too(tmp_path, capsys, no_model, monkeypatch):
    """Where access() cannot tell (root, read-only mounts) the trial write decides."""
    import tempfile

    def full(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(tempfile, "TemporaryFile", full)
    assert main(["-o", str(tmp_path / "out")]) == 2
    assert "Read-only file system" in capsys.readouterr().err


def test_full_disk_leaves_nothing_half_made(tmp_path, capsys, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    _write(src / "a.png")
    _write(src / "b.png")
    real = cli.save_image
    calls = {"n": 0}

    def save(image, path, *rest):
        calls["n"] += 1
        if "a" == path.parent.name.split(".")[1] and path.name == "scale_2.png":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(image, path, *rest)
    monkeypatch.setattr(cli, "save_image", save)
    assert main([str(src), "-o", str(tmp_path / "out")] + FAST) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b"]  # a: nothing, not half


def test_over_the_pixel_limit_is_skipped_then_allowed(tmp_path, capsys, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    Image.open(sample_image_path()).save(src / "big.png")  # 512 x 512
    _write(src / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 512 * 512 // 2 - 1)  # 2x over: Pillow's error
    assert main([str(src), "-o", str(tmp_path / "a")] + FAST) == 1
    err = capsys.readouterr().err
    assert "--allow-large" in err and err.count("big.png") == 1
    assert (tmp_path / "a" / "small").is_dir() and not (tmp_path / "a" / "big").exists()
    assert main([str(src), "-o", str(tmp_path / "b")] + FAST + ["--allow-large"]) == 0
    manifest = json.loads((tmp_path / "b" / "big" / "manifest.json").read_text())
    assert manifest["input_size"] == [512, 512]  # boxes in the file's pixels
    assert any("reduced" in n for n in manifest["input_notes"])
    # 32 px at 512: read reduced 5x (3x the 32 px kept), dropping the last 2 file pixels
    assert manifest["steps"][0]["box"] == pytest.approx([0, 0, 510, 510])
    assert Image.MAX_IMAGE_PIXELS == 512 * 512 // 2 - 1  # the limit is restored
    monkeypatch.undo()
    full = Image.open(sample_image_path()).convert("RGB").crop((0, 0, 510, 510)).resize((32, 32), Image.LANCZOS)
    full = np.asarray(full).astype(float)
    got = np.asarray(Image.open(tmp_path / "b" / "big" / "scale_0.png")).astype(float)
    assert np.abs(full - got).mean() < 1.5  # the reduced copy's scale 0 looks like the full one's


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 255  # red stored under fully transparent pixels ...
    rgba[:8, :, 3] = 255  # ... shown only in the top half
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    assert main([str(tmp_path / "t.png"), "-o", str(tmp_path / "out"), "--mode", "bicubic", "--size", "16",
                 "--steps", "1", "--quiet"]) == 0
    scale0 = np.asarray(Image.open(tmp_path / "out" / "t" / "scale_0.png"))
    assert (scale0[12:, :, :] == 255).all()  # white, not the hidden red
    assert (scale0[:4, :, 0] == 255).all() and (scale0[:4, :, 1] == 0).all()
    manifest = json.loads((tmp_path / "out" / "t" / "manifest.json").read_text())
    assert any("composited" in n for n in manifest["input_notes"])


def test_gif_in_a_folder_reads_its_first_frame(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    frames = [Image.new("RGB", (20, 20), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:])
    assert main([str(src), "-o", str(tmp_path / "out")] + FAST) == 0
    assert np.asarray(Image.open(tmp_path / "out" / "anim" / "scale_0.png"))[..., 0].min() > 240
    manifest = json.loads((tmp_path / "out" / "anim" / "manifest.json").read_text())
    assert "first of 2 frames" in manifest["input_notes"]


def test_other_files_in_a_folder_are_reported(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    _write(src / "a.png")
    (src / "notes.txt").write_text("x")
    assert main([str(src), "-o", str(tmp_path / "out")] + FAST) == 0
    assert "notes.txt" in capsys.readouterr().err


def test_manifest_records_device_precision_and_backbone(tmp_path, monkeypatch, capsys):
    from coz_core.sr.upscale import UpscaleModelBackbone

    class Nearest4(torch.nn.Module):
        scale = 4

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x):
            return torch.nn.functional.interpolate(x, scale_factor=4) * self.w

    monkeypatch.setattr(cli, "build_backbone", lambda args, device: UpscaleModelBackbone(
        Nearest4(), name="near", tile=64, overlap=8, device=device, dtype=torch.float32))
    assert main(["-o", str(tmp_path), "--size", "32", "--steps", "1", "--quiet", "--device", "cpu",
                 "--prompt", "sharp"]) == 0
    assert "takes no prompt" in capsys.readouterr().err
    manifest = json.loads((tmp_path / "sample" / "manifest.json").read_text())
    assert manifest["device"] == "cpu"
    assert manifest["precision"] == {"requested": "auto", "dtypes": {"model": "float32"}}
    details = manifest["backbone_details"]
    assert details["name"] == "near" and details["scale"] == 4 and details["tile"] == 64
    assert details["file"] == "x4plus" and details["uses_prompt"] is False
    assert manifest["prompts_used"] is False
    assert (tmp_path / "sample" / "prompts.txt").read_text().startswith("# unused")


def test_fp16_on_cpu_warns(tmp_path, capsys):
    assert main(["-o", str(tmp_path), "--precision", "fp16", "--device", "cpu"] + FAST) == 0
    assert "slower" in capsys.readouterr().err


def test_ctrl_c_during_start_up_is_one_line(tmp_path, capsys, monkeypatch):
    def interrupted(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "build_backbone", interrupted)
    assert main(["-o", str(tmp_path), "--size", "32", "--quiet"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "coz-zoom: interrupted"


def _png16(path, rgb: np.ndarray) -> None:
    """A 16-bit RGB PNG written by hand (PNG spec), rows with the Sub and Up filters."""
    h, w, _ = rgb.shape
    raw = rgb.astype(">u2").reshape(h, w * 6 // 2).view(np.uint8).reshape(h, w * 6)
    rows = []
    for y in range(h):
        if y % 2:  # Up: difference to the row above
            rows.append(b"\x02" + ((raw[y].astype(int) - raw[y - 1]) % 256).astype(np.uint8).tobytes())
        else:  # Sub: difference to the pixel 6 bytes left
            left = np.concatenate([np.zeros(6, int), raw[y, :-6].astype(int)])
            rows.append(b"\x01" + ((raw[y].astype(int) - left) % 256).astype(np.uint8).tobytes())

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


def test_16_bit_rgb_png_keeps_full_precision(tmp_path):
    from coz_core.imageops import load_image

    rgb = np.random.default_rng(0).integers(0, 65536, size=(7, 9, 3))
    _png16(tmp_path / "deep.png", rgb)
    got = load_image(tmp_path / "deep.png")[0].permute(1, 2, 0).double().numpy() * 65535
    np.testing.assert_allclose(got, rgb, atol=0.02)


def test_the_input_s_rgb_colour_profile_is_kept_in_every_image_written(tmp_path):
    # a phone's Display P3 or an Adobe RGB picture: its pixels are processed as they are, so the
    # images made from them need its profile to look as it does; a non-RGB profile is not carried
    from PIL import ImageCms

    rgb_icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    lab_icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    src = tmp_path / "in"
    src.mkdir()
    _write(src / "tagged.png")
    Image.open(src / "tagged.png").save(src / "tagged.png", icc_profile=rgb_icc)
    _write(src / "odd.png")
    Image.open(src / "odd.png").save(src / "odd.png", icc_profile=lab_icc)
    assert main([str(src), "-o", str(tmp_path / "out")] + FAST) == 0
    tagged = sorted((tmp_path / "out" / "tagged").glob("*.png"))
    assert len(tagged) == 6 and all(Image.open(p).info.get("icc_profile") == rgb_icc for p in tagged)
    assert all("icc_profile" not in Image.open(p).info for p in (tmp_path / "out" / "odd").glob("*.png"))
    manifest = json.loads((tmp_path / "out" / "tagged" / "manifest.json").read_text())
    assert any("colour profile" in n for n in manifest["input_notes"])

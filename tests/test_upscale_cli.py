"""coz-upscale: files written whole, manifest, clear errors with nothing written."""
import json

import torch

import coz_core.upscale_cli as cli
from coz_core.imageops import load_image, resize, save_image
from coz_core.sr.upscale import UpscaleModelBackbone


def small_backbone(*_):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.Upsample(scale_factor=2)).eval()
    return UpscaleModelBackbone(model, 2, name="small", tile=None, dtype=torch.float32, device="cpu")


def test_cli_writes_image_prompts_and_manifest(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "build_backbone", small_backbone)
    src = tmp_path / "in.png"
    save_image(resize(load_image(cli.collect_inputs([])[0]), (40, 56), "lanczos").clamp(0, 1), src)
    assert cli.main([str(src), "-o", str(tmp_path / "out"), "--factor", "2", "--tile", "64", "--overlap", "16",
                     "--tile-prompts", "sky|suit", "--prompt", "photo", "--quiet"]) == 0
    folder = tmp_path / "out" / "in"
    assert load_image(folder / "in_x2.png").shape == (1, 3, 80, 112)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["passes"][0]["grid"] == [2, 2] and len(manifest["tiles"]) == 4
    assert [t["prompt"] for t in manifest["tiles"]] == ["sky, photo,"] + ["suit, photo,"] * 3
    assert manifest["tiles"][0]["seconds"]["model"] > 0 and manifest["config"]["factor"] == 2
    assert not list((tmp_path / "out").glob(".*partial*")) and not list(folder.glob(".*partial*"))


def test_cli_keeps_the_input_s_colour_profile(tmp_path, monkeypatch):
    from PIL import Image, ImageCms

    monkeypatch.setattr(cli, "build_backbone", small_backbone)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    src = tmp_path / "in.png"
    Image.new("RGBA", (24, 16), (200, 30, 60, 128)).save(src, icc_profile=icc)
    assert cli.main([str(src), "-o", str(tmp_path / "out"), "--factor", "2", "--quiet"]) == 0
    with Image.open(tmp_path / "out" / "in" / "in_x2.png") as out:
        assert out.size == (48, 32) and out.info.get("icc_profile") == icc


def test_cli_output_folders_follow_coz_zoom_rules(tmp_path, monkeypatch, capsys):
    """Same-stem inputs get their own folders; existing results are refused before any compute
    unless --overwrite, which replaces the folder as a whole."""
    monkeypatch.setattr(cli, "build_backbone", small_backbone)
    image = resize(load_image(cli.collect_inputs([])[0]), (24, 32), "lanczos").clamp(0, 1)
    inputs = tmp_path / "in"
    inputs.mkdir()
    save_image(image, inputs / "photo.png")
    save_image(image, inputs / "photo.jpg")
    out = tmp_path / "out"
    args = [str(inputs), "-o", str(out), "--factor", "2", "--quiet"]
    assert cli.main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["photo_jpg", "photo_png"]
    (out / "photo_png" / "stale.txt").write_text("x")
    monkeypatch.setattr(cli, "build_backbone", lambda *_: (_ for _ in ()).throw(AssertionError("loaded a model")))
    assert cli.main(args) == 2 and "--overwrite" in capsys.readouterr().err
    monkeypatch.setattr(cli, "build_backbone", small_backbone)
    assert cli.main([*args, "--overwrite"]) == 0
    assert not (out / "photo_png" / "stale.txt").exists() and (out / "photo_png" / "photo_x2.png").is_file()


def test_cli_refuses_bad_factor_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "build_backbone", small_backbone)
    assert cli.main(["-o", str(tmp_path / "out"), "--factor", "3", "--quiet"]) == 2
    assert "x4 and x2 passes" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert cli.main(["-o", str(tmp_path / "out"), "--factor", "16", "--memory-limit", "0.001", "--quiet"]) == 1
    assert "GB" in capsys.readouterr().err and not list((tmp_path / "out").rglob("*.png"))


def test_an_image_over_pillow_s_limit_is_skipped_and_the_others_run(tmp_path, monkeypatch, capsys):
    from PIL import Image

    monkeypatch.setattr(cli, "build_backbone", small_backbone)
    inputs = tmp_path / "in"
    inputs.mkdir()
    image = resize(load_image(cli.collect_inputs([])[0]), (24, 32), "lanczos").clamp(0, 1)
    save_image(image, inputs / "a.png")
    save_image(resize(image, (96, 128), "bicubic").clamp(0, 1), inputs / "b_big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 96 x 128 is over twice this: a bomb
    assert cli.main([str(inputs), "-o", str(tmp_path / "out"), "--factor", "2", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "b_big.png is too large to read safely" in err and "Traceback" not in err
    assert (tmp_path / "out" / "a" / "a_x2.png").is_file()

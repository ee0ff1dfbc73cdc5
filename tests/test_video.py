"""Zoom videos (coz_core.video): every frame against an independent computation of its view and
its crop (the similarity between two boxes raised to a fractional power, by eigendecomposition,
for the camera path; a numerically integrated speed profile for the easing; Pillow's
resize(box=...) for the crop), no jump at scale changes, frame order, the encoded file decoded by
PyAV, and the command line."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from coz_core.cli import main
from coz_core.imageops import resize
from coz_core.prompt.base import FixedPrompts
from coz_core.video import VideoConfig, ZoomVideo, save_zoom_video, write_video
from coz_core.zoom import Box, ChainConfig, run_chain

av = pytest.importorskip("av")


def picture(h=60, w=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    return resize(torch.rand(1, 3, h // 6, w // 6, generator=g), (h, w), "bicubic").clamp(0, 1)


class DetailSR:
    """A model-free backbone that invents detail, as SR does: bicubic plus seeded texture."""

    name = "detail"
    size_multiple = 1
    uses_prompt = False

    def __call__(self, request):
        g = torch.Generator().manual_seed(len(request.prompts[0]) + request.zoomed.shape[-1] + (request.seed or 0))
        b, c, h, w = request.zoomed.shape
        noise = resize(torch.rand(b, c, h // 3, w // 3, generator=g) - 0.5, (h, w), "bicubic")  # band-limited
        return (request.zoomed + 0.5 * noise).clamp(0, 1)


def chain(mode="recursive", steps=3, zoom=2.5, size=(40, 24), center=(0.8, 0.3), batch=1, color="none"):
    image = torch.cat([picture(seed=b) for b in range(batch)])
    config = ChainConfig(mode=mode, steps=steps, zoom=zoom, size=size, center=center, color=color, seed=1)
    return run_chain(image, DetailSR() if mode in ("recursive", "onestep") else None, config, FixedPrompts(""))


# --- the independent reference -------------------------------------------------------------

def eased(t, ease):
    """Position at time t of a speed profile sin^2-ramped over `ease` at both ends, integrated
    numerically (trapezoids on a fine grid) and normalised."""
    if ease == 0:
        return t
    grid = np.linspace(0.0, 1.0, 200_001)
    ramp = np.minimum(grid / ease, (1.0 - grid) / ease).clip(0, 1)
    speed = np.sin(ramp * np.pi / 2) ** 2
    position = np.concatenate([[0.0], np.cumsum((speed[1:] + speed[:-1]) / 2 * np.diff(grid))])
    return float(np.interp(t, grid, position / position[-1]))


def reference_view(boxes, t, ease):
    """(k, f, view): the view at time t, from the similarity box_k -> box_k+1 raised to the power f."""
    areas = [(b.right - b.left) * (b.bottom - b.top) for b in boxes]
    levels = [0.5 * math.log(areas[0] / a) for a in areas]
    level = eased(t, ease) * levels[-1]
    k = max(j for j in range(len(boxes) - 1) if levels[j] <= level + 1e-12)
    f = (level - levels[k]) / (levels[k + 1] - levels[k])
    if k == len(boxes) - 2 and f > 1 - 1e-9:
        return k + 1, 0.0, boxes[-1]
    a, b = boxes[k], boxes[k + 1]
    rx, ry = (b.right - b.left) / (a.right - a.left), (b.bottom - b.top) / (a.bottom - a.top)
    # the affine map taking box a onto box b, in homogeneous coordinates
    m = np.array([[rx, 0, b.left - rx * a.left], [0, ry, b.top - ry * a.top], [0, 0, 1]])
    values, vectors = np.linalg.eig(m)  # m^f = V diag(values^f) V^-1
    mf = vectors @ np.diag(values**f) @ np.linalg.inv(vectors)
    (left, t_), (r, bo) = (mf @ [a.left, a.top, 1])[:2], (mf @ [a.right, a.bottom, 1])[:2]
    return k, f, (left, t_, r, bo)


def pil_crop(image, box, view, size):
    """Pillow's bicubic resize(box=...) of the part of `image` [3, H, W] (showing `box`) that is `view`."""
    h, w = image.shape[-2:]
    sx, sy = w / (box.right - box.left), h / (box.bottom - box.top)
    region = ((view[0] - box.left) * sx, (view[1] - box.top) * sy, (view[2] - box.left) * sx, (view[3] - box.top) * sy)
    region = (max(region[0], 0.0), max(region[1], 0.0), min(region[2], w), min(region[3], h))  # float dust
    channels = [np.asarray(Image.fromarray(c.numpy()).resize(size, Image.BICUBIC, box=region)) for c in image]
    return torch.from_numpy(np.stack(channels))


def as_tuple(box):
    return (box.left, box.top, box.right, box.bottom)


# --- frames against the reference ----------------------------------------------------------

@pytest.mark.parametrize("mode,ease", [("recursive", 0.25), ("bicubic", 0.0), ("nearest", 0.5)])
def test_every_frame_is_the_crop_of_the_sharpest_covering_scale(mode, ease):
    result = chain(mode=mode, zoom=2.5 if mode == "recursive" else 2.0)
    video = ZoomVideo.from_chain(result, VideoConfig(frames_per_step=5, ease=ease, blend=0.0))
    boxes = [s.box for s in result.steps]
    assert len(video) == 5 * 3 + 1
    for i in range(len(video)):
        k, f, view = reference_view(boxes, i / (len(video) - 1), ease)
        expected = pil_crop(result.steps[k].image[0], boxes[k], view if f else as_tuple(boxes[k]), (40, 24))
        frame = video[i][0]
        assert frame.shape == (3, 24, 40)
        assert (frame - expected.clamp(0, 1)).abs().max() < 2e-4, f"frame {i} (scale {k}, f={f:.3f})"
    assert torch.equal(video[0], result.steps[0].image)  # each end is its scale exactly
    assert torch.allclose(video[len(video) - 1], result.final, atol=1e-6)


def test_frames_at_a_scale_s_zoom_are_that_scale_and_blends_stay_between_the_two():
    result = chain(steps=2, zoom=2.0, size=(32, 32), center=(0.5, 0.5))
    video = ZoomVideo.from_chain(result, VideoConfig(frames_per_step=8, ease=0.0, blend=0.5))
    boxes = [s.box for s in result.steps]
    for k in range(3):
        assert torch.allclose(video[8 * k], result.steps[k].image, atol=1e-6), f"scale {k}"
    for i in range(len(video) - 1):
        k, f, view = reference_view(boxes, i / (len(video) - 1), 0.0)
        outer = pil_crop(result.steps[k].image[0], boxes[k], view, (32, 32)).clamp(0, 1)
        frame = video[i][0]
        if f <= 0.5:  # before the blend: the covering scale alone
            assert (frame - outer).abs().max() < 2e-4, f"frame {i}"
            continue
        # in the blend: the outer scale alone where the inner one does not reach (pixel centres outside
        # its box), a mix of the two inside, the inner scale at the blend's weight in the middle
        inner_box, inner_image = boxes[k + 1], result.steps[k + 1].image[0]
        x = view[0] + (np.arange(32) + 0.5) * (view[2] - view[0]) / 32
        y = view[1] + (np.arange(32) + 0.5) * (view[3] - view[1]) / 32
        outside = torch.from_numpy(((x <= inner_box.left) | (x >= inner_box.right))[None, :]
                                   | ((y <= inner_box.top) | (y >= inner_box.bottom))[:, None])
        assert outside.any() and not outside.all()
        assert (frame[:, outside] - outer[:, outside]).abs().max() < 2e-4, f"frame {i}"
        # the inner scale over the whole view: pad it (edge) so Pillow accepts a box beyond it, and
        # compare only where its kernel (2 px) stays inside the real pixels
        pad = 8
        padded = torch.nn.functional.pad(inner_image[None], (pad,) * 4, mode="replicate")[0]
        sx, sy = 32 / (inner_box.right - inner_box.left), 32 / (inner_box.bottom - inner_box.top)
        grown = Box(inner_box.left - pad / sx, inner_box.top - pad / sy,
                    inner_box.right + pad / sx, inner_box.bottom + pad / sy)
        inner = pil_crop(padded, grown, view, (32, 32)).clamp(0, 1)
        ix, iy = (x - inner_box.left) * sx, (y - inner_box.top) * sy
        exact = torch.from_numpy(((ix > 2) & (ix < 30))[None, :] & ((iy > 2) & (iy < 30))[:, None])
        both = torch.stack([outer[:, exact], inner[:, exact]])
        low, high = both.min(0).values - 2e-4, both.max(0).values + 2e-4
        assert (frame[:, exact] >= low).all() and (frame[:, exact] <= high).all()
        weight = ((f - 0.5) / 0.5) ** 2 * (3 - 2 * (f - 0.5) / 0.5)
        mid = torch.lerp(outer[:, 16, 16], inner[:, 16, 16], weight)
        assert (frame[:, 16, 16] - mid).abs().max() < 2e-4, f"frame {i}"


def frame_steps(video, border=0):
    """Mean absolute difference between consecutive frames, leaving out a border of pixels."""
    frames = torch.stack(list(video))
    frames = frames[..., border:frames.shape[-2] - border, border:frames.shape[-1] - border]
    return (frames[1:] - frames[:-1]).abs().mean(dim=(1, 2, 3, 4))


def test_no_jump_where_the_next_scale_takes_over():
    result = chain(steps=3, zoom=2.0, size=(48, 32), center=(0.3, 0.6))  # every step invents strong detail
    per_step = 12

    def diffs(blend, border=0):
        video = ZoomVideo.from_chain(result, VideoConfig(frames_per_step=per_step, ease=0.0, blend=blend))
        return frame_steps(video, border)

    hard, soft, soft_inside = diffs(0.0), diffs(0.5), diffs(0.5, border=2)
    for k in (1, 2, 3):
        h = k * per_step - 1  # the difference into the frame where scale k takes over
        around = [h - 1] + ([h + 1] if h + 1 < len(hard) else [])
        # a hard switch jumps (the test can fail) ...
        assert hard[h] > 1.5 * max(hard[around]), f"scale {k}: {hard[h - 1:h + 2].tolist()}"
        # ... the blend does not: inside the frame the handover is not above its neighbours; the
        # frame's border (the thin strip the next scale's box reaches only at the handover itself)
        # changes with the zoom's own motion there, a few percent more at most
        assert soft_inside[h] <= max(soft_inside[around]) + 1e-6, f"scale {k}: {soft_inside[h - 1:h + 2].tolist()}"
        assert soft[h] <= 1.1 * max(soft[around])


def test_directions_reorder_the_same_frames():
    result = chain(steps=2)
    forward = list(ZoomVideo.from_chain(result, VideoConfig(frames_per_step=3)))
    backward = list(ZoomVideo.from_chain(result, VideoConfig(frames_per_step=3, direction="out")))
    pingpong = list(ZoomVideo.from_chain(result, VideoConfig(frames_per_step=3, direction="pingpong")))
    assert len(forward) == len(backward) == 7 and len(pingpong) == 12  # no end frame twice: loops seamlessly
    assert all(torch.equal(a, b) for a, b in zip(backward, forward[::-1]))
    assert all(torch.equal(a, b) for a, b in zip(pingpong, forward + forward[5:0:-1]))
    # a total frame count instead of frames per step (what --seconds gives)
    assert len(ZoomVideo.from_chain(result, VideoConfig(frames=10, direction="pingpong"))) == 10
    assert len(ZoomVideo.from_chain(result, VideoConfig(frames=11))) == 11


def test_chunks_cover_the_video_in_order():
    video = ZoomVideo.from_chain(chain(steps=1), VideoConfig(frames_per_step=6))
    seen = [(start, c.shape[0]) for start, c in video.chunks(4)]
    assert seen == [(0, 4), (4, 3)]
    start, chunk = list(video.chunks(4))[1]
    assert torch.equal(chunk[2], video[6])


@pytest.mark.parametrize("bad,message", [
    ({"direction": "sideways"}, "direction"), ({"blend": 1.5}, "blend"), ({"ease": 0.7}, "ease"),
    ({"frames": 1}, "at least 2"),
])
def test_bad_settings_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        ZoomVideo.from_chain(chain(steps=1), VideoConfig(**bad))


def test_boxes_of_another_chain_are_refused():
    result = chain(steps=2)
    boxes = [s.box for s in result.steps]
    with pytest.raises(ValueError, match="inside"):
        ZoomVideo([s.image for s in result.steps], [boxes[0], boxes[2], boxes[1]])
    with pytest.raises(ValueError, match="one box per scale"):
        ZoomVideo([s.image for s in result.steps], boxes[:2])


# --- encoding -------------------------------------------------------------------------------

def decode(path):
    """The file's frames as RGB, as a player shows a BT.709 stream, and its frame rate."""
    with av.open(str(path)) as container:
        frames = [bt709_rgb(f) for f in container.decode(video=0)]
        rate = container.streams.video[0].average_rate
    return np.stack(frames), rate


def bt709_rgb(frame) -> np.ndarray:
    """A yuv420p frame to RGB by the BT.709 equations, limited range (written out: PyAV's own
    conversion of decoded frames ignores the colour space asked for in some versions, e.g. 14.2)."""
    assert frame.format.name == "yuv420p"
    planes = frame.to_ndarray().astype(np.float64)  # Y [H, W] over U and V [H/2, W/2], stacked
    h, w = frame.height, frame.width
    u, v = (planes[h:].reshape(2, h // 2, w // 2) - 128) / 224
    u, v = (c.repeat(2, 0).repeat(2, 1) for c in (u, v))
    y = (planes[:h] - 16) / 219
    rgb = np.stack([y + 1.5748 * v, y - 0.1873 * u - 0.4681 * v, y + 1.8556 * u], -1)
    return (rgb.clip(0, 1) * 255 + 0.5).astype(np.uint8)


def psnr(a, b):
    """PSNR of the luma (yuv420p keeps colour at half resolution, which small test images feel)."""
    luma = np.array([0.299, 0.587, 0.114])
    mse = np.mean((a.astype(np.float64) @ luma - b.astype(np.float64) @ luma) ** 2)
    return 10 * math.log10(255.0**2 / mse)


def test_the_video_file_decodes_with_its_frames(tmp_path):
    result = chain(steps=2, zoom=2.0, size=(48, 32), mode="bicubic")
    count = save_zoom_video(result, tmp_path / "zoom.mp4", fps=12, seconds=1.5)
    frames, rate = decode(tmp_path / "zoom.mp4")
    assert count == 18 and frames.shape == (18, 32, 48, 3) and rate == 12
    first = (result.steps[0].image[0].permute(1, 2, 0).numpy() * 255).round()
    last = (result.final[0].permute(1, 2, 0).numpy() * 255).round()
    assert psnr(frames[0], first) > 30 and psnr(frames[-1], last) > 30
    assert psnr(frames[0], last) < 25  # the file holds the zoom, not one picture


@pytest.mark.parametrize("suffix", [".mp4", ".webm"])
def test_colours_are_bt709_and_tagged_so(tmp_path, suffix):
    # players decode HD video as the file's tags say, untagged as BT.709: a file converted by
    # FFmpeg's default BT.601 shifts saturated colours there (green 255 -> 215)
    import av

    colours = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [200 / 255, 30 / 255, 60 / 255], [0.5, 0.5, 0.5]])
    write_video([c.view(3, 1, 1).expand(3, 32, 32) for c in colours], tmp_path / f"c{suffix}", fps=5)
    with av.open(str(tmp_path / f"c{suffix}")) as container:
        stream = container.streams.video[0]
        tags = stream.codec_context
        assert (int(tags.colorspace), int(tags.color_primaries), int(tags.color_trc)) == (1, 1, 1)  # BT.709
        shown = [bt709_rgb(f)[16, 16] for f in container.decode(stream)]
    assert np.abs(np.stack(shown).astype(float) - colours.numpy() * 255).max() <= 4


def test_webm_and_odd_sizes(tmp_path):
    result = chain(steps=1, zoom=2.0, size=(33, 21), mode="bicubic")
    count = save_zoom_video(result, tmp_path / "zoom.webm", fps=8, seconds=1, direction="pingpong")
    frames, _ = decode(tmp_path / "zoom.webm")
    assert count == 8 and frames.shape == (8, 20, 32, 3)  # yuv420p: cut to even sizes
    with pytest.raises(ValueError, match="even"):
        write_video([torch.rand(3, 21, 33)], tmp_path / "odd.mp4")
    with pytest.raises(ValueError, match="mp4"):
        write_video([torch.rand(3, 8, 8)], tmp_path / "zoom.avi")


def test_cli_writes_the_video(tmp_path):
    rc = main(["-o", str(tmp_path), "--mode", "bicubic", "--size", "48x32", "--steps", "2", "--quiet",
               "--video", "zoom.mp4", "--fps", "10", "--seconds", "1.2"])
    assert rc == 0
    frames, rate = decode(tmp_path / "sample" / "zoom.mp4")
    assert frames.shape == (12, 32, 48, 3) and rate == 10
    scale0 = np.asarray(Image.open(tmp_path / "sample" / "scale_0.png"))
    assert psnr(frames[0], scale0) > 30

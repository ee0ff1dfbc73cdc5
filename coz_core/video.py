"""Zoom videos from a finished chain: a continuous zoom from scale 0 to the last scale.

Geometry. Scale k shows the region ``box_k`` of the original image (``ZoomStep.box``); a chain's
boxes are nested (``box_k+1`` lies inside ``box_k``; in the direct modes too, since all crops of
scale 0 are centred on one target and clamped alike). The camera's view is a box that starts as
``box_0`` and ends as ``box_n``. Within step k it goes from ``box_k`` to ``box_k+1`` along the
similarity that maps one onto the other (per axis, so crops that round differently in x and y are
met exactly): it shrinks exponentially about that map's fixed point, so the zoom speed looks
steady and the view meets every scale's box exactly. Time runs on the log of the magnification
(from box areas), so a step takes time in proportion to its zoom; an easing profile speeds up
over the first ``ease`` of the pass and slows down over the last (velocity ramps as sin^2).

Rendering. Each frame is resampled from the sharpest scale whose box covers the whole view
(scale k while the view lies between ``box_k`` and ``box_k+1``), with Pillow's bicubic on the
view's exact sub-pixel region (the coefficients of ``imageops.resize(box=...)``, antialiased
when shrinking). Over the last ``blend`` of each step the next scale fades in over the part of
the frame it covers: its weight rises smoothly with time, with a feathered edge inside its box
that narrows to nothing as the box reaches the frame's edges, so no frame jumps and the frame at
scale k's own zoom is exactly scale k. The thin strip of the frame that the next box reaches only
at the handover itself keeps scale k until then (it moves with the zoom's own motion there).
Frames are made one at a time on demand (memory: the scales and one frame).

Order. A pass zooms in over N frames (frame 0 = scale 0, frame N-1 = the last scale);
``out`` plays it backwards and ``pingpong`` plays it in and back out without repeating either
end frame (2N - 2 frames), so the video loops seamlessly.

Encoding (:func:`write_video`) uses PyAV, the FFmpeg bindings ComfyUI's own video nodes use;
no ffmpeg program is needed. Colours go to YUV by BT.709 and the file says so: players read
untagged HD video as BT.709, while FFmpeg's default conversion is BT.601 (decoded as BT.709,
such a file turned pure green into 0, 215, 0 and 200, 30, 60 into 212, 46, 57).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

from .imageops import resample_weights
from .zoom import Box, ChainResult

DIRECTIONS = ("in", "out", "pingpong")
CONTAINERS = {".mp4": "h264", ".mov": "h264", ".mkv": "h264", ".webm": "libvpx-vp9"}
_SNAP = 1e-6  # a view this close (in step fraction) to a scale's box is that box


@dataclass
class VideoConfig:
    frames_per_step: int = 30  # frames of each zoom step in one pass (used when frames is None)
    frames: int | None = None  # total frames of the video; overrides frames_per_step
    ease: float = 0.2  # fraction of the pass spent speeding up (and as much slowing down); 0: none
    blend: float = 0.5  # fraction of each step over which the next scale fades in; 0: hard switch
    feather: float = 0.5  # width of the fading edge at the blend's start, in half-sizes of the box
    direction: str = "in"  # in | out | pingpong
    size: tuple[int, int] | None = None  # (width, height) of the frames; None: scale 0's size

    def validate(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {self.direction!r}; choose one of {DIRECTIONS}")
        if self.frames is None and not 1 <= self.frames_per_step <= 100_000:
            raise ValueError(f"frames per step must be at least 1, got {self.frames_per_step}")
        if self.frames is not None and not 2 <= self.frames <= 10_000_000:
            raise ValueError(f"a video needs at least 2 frames, got {self.frames}")
        if not 0.0 <= self.ease <= 0.5:
            raise ValueError(f"ease must be within 0..0.5 (a fraction of the pass at each end), got {self.ease}")
        if not 0.0 <= self.blend <= 1.0:
            raise ValueError(f"blend must be within 0..1 (a fraction of each step), got {self.blend}")
        if not 0.0 <= self.feather <= 1.0:
            raise ValueError(f"feather must be within 0..1, got {self.feather}")
        if self.size is not None and (min(self.size) < 1 or max(self.size) > 16384):
            raise ValueError(f"frame size must be between 1 and 16384 pixels, got {self.size}")

    def pass_frames(self, steps: int) -> int:
        """Frames N of one zoom-in pass for a chain of ``steps`` steps."""
        if self.frames is None:
            return self.frames_per_step * steps + 1
        if self.direction == "pingpong":
            return max(2, self.frames // 2 + 1)  # 2N - 2 frames: the total, rounded down to even
        return self.frames


def ease_curve(t: float, ease: float) -> float:
    """Position 0..1 at time ``t`` 0..1 of a move whose speed ramps up (sin^2) over the first
    ``ease`` of the time, stays constant, and ramps down over the last ``ease``."""
    t = min(max(t, 0.0), 1.0)
    if ease <= 0.0:
        return t
    area = 1.0 - ease  # the integral of the speed profile (peak speed 1)

    def ramp(x: float) -> float:  # distance covered after time x of a ramp of length ease
        return x / 2.0 - ease / (2.0 * math.pi) * math.sin(math.pi * x / ease)

    if t <= ease:
        return ramp(t) / area
    if t >= 1.0 - ease:
        return 1.0 - ramp(1.0 - t) / area
    return (ease / 2.0 + t - ease) / area


def smoothstep(x: torch.Tensor | float):
    """3x^2 - 2x^3 of x clamped to 0..1: 0 and 1 with zero slope at both ends."""
    if isinstance(x, torch.Tensor):
        x = x.clamp(0.0, 1.0)
    else:
        x = min(max(x, 0.0), 1.0)
    return x * x * (3.0 - 2.0 * x)


def frame_order(pass_frames: int, direction: str) -> list[int]:
    """Indices into the zoom-in pass, in the order the video plays them."""
    forward = list(range(pass_frames))
    if direction == "in":
        return forward
    if direction == "out":
        return forward[::-1]
    if direction == "pingpong":
        return forward + forward[-2:0:-1]
    raise ValueError(f"unknown direction {direction!r}; choose one of {DIRECTIONS}")


def _axis_at(a0: float, a1: float, b0: float, b1: float, f: float) -> tuple[float, float]:
    """The interval at fraction ``f`` of the exponential move from [a0, a1] to [b0, b1] (nested):
    it scales by (width ratio)^f about the fixed point of the map taking one onto the other."""
    r = (b1 - b0) / (a1 - a0)
    if abs(1.0 - r) < 1e-12:  # no zoom along this axis: a plain slide
        return a0 + (b0 - a0) * f, a1 + (b1 - a1) * f
    p = (b0 - r * a0) / (1.0 - r)
    s = r**f
    return p + (a0 - p) * s, p + (a1 - p) * s


def view_between(outer: Box, inner: Box, f: float) -> Box:
    """The view at fraction ``f`` (0..1) of the zoom from ``outer`` to ``inner``."""
    left, right = _axis_at(outer.left, outer.right, inner.left, inner.right, f)
    top, bottom = _axis_at(outer.top, outer.bottom, inner.top, inner.bottom, f)
    return Box(left, top, right, bottom)


def _in_pixels(view: Box, box: Box, width: int, height: int) -> tuple[float, float, float, float]:
    """``view`` in pixel coordinates of an image of ``width`` x ``height`` that shows ``box``."""
    sx, sy = width / box.width, height / box.height
    return ((view.left - box.left) * sx, (view.top - box.top) * sy,
            (view.right - box.left) * sx, (view.bottom - box.top) * sy)


class ZoomVideo:
    """The frames of a zoom through nested scales, rendered on demand.

    ``scales``: one [B, 3, H, W] image per scale (0..1), scale 0 first; ``boxes``: the region of
    the original image each shows. Indexing gives frame i of the video as [B, 3, h, w]; iterating
    yields the frames in order; :meth:`chunks` yields them a few at a time.
    """

    def __init__(self, scales: Sequence[torch.Tensor], boxes: Sequence[Box], config: VideoConfig | None = None):
        self.config = config or VideoConfig()
        self.config.validate()
        if len(scales) != len(boxes):
            raise ValueError(f"got {len(scales)} scales but {len(boxes)} boxes; give one box per scale")
        if len(scales) < 2:
            raise ValueError("a zoom video needs at least two scales (a chain of one step or more)")
        batch = scales[0].shape[0]
        for k, image in enumerate(scales):
            if image.ndim != 4 or image.shape[1] != 3 or image.shape[0] != batch:
                raise ValueError(f"scale {k} has shape {tuple(image.shape)}; expected [{batch}, 3, H, W] "
                                 "like scale 0")
        self.scales = list(scales)
        # Box objects (of any import of coz_core) or (left, top, right, bottom) sequences
        self.boxes = [Box(*map(float, b.as_list() if hasattr(b, "as_list") else b)) for b in boxes]
        for k in range(len(self.boxes) - 1):
            _check_nested(self.boxes[k], self.boxes[k + 1], k)
        width, height = self.config.size or (scales[0].shape[-1], scales[0].shape[-2])
        self.size = (int(width), int(height))
        area0 = self.boxes[0].width * self.boxes[0].height
        # log-magnification of every scale: the time axis of the pass
        self.levels = [0.5 * math.log(area0 / (b.width * b.height)) for b in self.boxes]
        self.steps = len(self.scales) - 1
        self.pass_frames = self.config.pass_frames(self.steps)
        self.order = frame_order(self.pass_frames, self.config.direction)

    @classmethod
    def from_chain(cls, result: ChainResult, config: VideoConfig | None = None) -> "ZoomVideo":
        return cls([s.image for s in result.steps], [s.box for s in result.steps], config)

    def __len__(self) -> int:
        return len(self.order)

    def position(self, i: int) -> tuple[int, float]:
        """(k, f) of frame ``i`` of the zoom-in pass: the view is at fraction f of step k (k = n,
        f = 0 at the end)."""
        if not 0 <= i < self.pass_frames:
            raise IndexError(f"frame {i} of a {self.pass_frames}-frame pass")
        t = i / (self.pass_frames - 1)
        level = ease_curve(t, self.config.ease) * self.levels[-1]
        k = 0
        while k < self.steps - 1 and level >= self.levels[k + 1]:
            k += 1
        f = (level - self.levels[k]) / (self.levels[k + 1] - self.levels[k])
        f = min(max(f, 0.0), 1.0)
        if f > 1.0 - _SNAP:
            return k + 1, 0.0
        return k, 0.0 if f < _SNAP else f

    def view(self, k: int, f: float) -> Box:
        """The region of the original image shown at fraction ``f`` of step ``k``."""
        if k >= self.steps:
            return self.boxes[-1]
        return view_between(self.boxes[k], self.boxes[k + 1], f)

    def blend_weight(self, f: float) -> float:
        """How far the next scale has faded in at fraction ``f`` of a step (0 before the blend)."""
        blend = self.config.blend
        if blend <= 0.0:
            return 0.0
        return smoothstep((f - (1.0 - blend)) / blend)

    def _render(self, k: int, view: Box, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Scale ``k`` resampled over ``view`` into ``size`` = (w, h) pixels (default the frame's)."""
        image, box = self.scales[k], self.boxes[k]
        left, top, right, bottom = _in_pixels(view, box, image.shape[-1], image.shape[-2])
        width, height = size or self.size
        rows = _resample(image, -2, height, top, bottom)
        return _resample(rows, -1, width, left, right)

    def _mask(self, view: Box, inner: Box, weight: float, device: torch.device) -> torch.Tensor:
        """[h, w] weight of the next scale: ``weight`` inside ``inner``, feathered at its edge over
        a band that narrows to nothing as the blend completes, 0 outside (pixel centres). The
        coordinates need float64 at deep zooms, which Apple's GPUs lack: computed on the CPU there."""
        width, height = self.size
        px, py = width / view.width, height / view.height  # frame pixels per original pixel
        where = torch.device("cpu") if device.type == "mps" else device
        x = view.left + (torch.arange(width, device=where, dtype=torch.float64) + 0.5) / px
        y = view.top + (torch.arange(height, device=where, dtype=torch.float64) + 0.5) / py
        dx = torch.minimum(x - inner.left, inner.right - x) * px  # distance to the box's edge, frame px
        dy = torch.minimum(y - inner.top, inner.bottom - y) * py
        d = torch.minimum(dy[:, None], dx[None, :])
        band = self.config.feather * (1.0 - weight) * min(inner.width * px, inner.height * py) / 2.0
        inside = smoothstep(d / band) if band > 0 else (d > 0).to(d.dtype)
        return (weight * inside).float().to(device)

    def pass_frame(self, i: int) -> torch.Tensor:
        """Frame ``i`` of the zoom-in pass, [B, 3, h, w]."""
        k, f = self.position(i)
        view = self.view(k, f)
        frame = self._render(k, view)
        weight = self.blend_weight(f) if k < self.steps else 0.0
        if weight > 0.0:
            mask = self._mask(view, self.boxes[k + 1], weight, frame.device)
            rows, cols = (mask > 0).any(1).nonzero(), (mask > 0).any(0).nonzero()
            if len(rows):
                # the next scale only where its box covers the frame (never resampled beyond its image)
                r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
                width, height = self.size
                sub = Box(view.left + view.width * c0 / width, view.top + view.height * r0 / height,
                          view.left + view.width * c1 / width, view.top + view.height * r1 / height)
                inner = self._render(k + 1, sub, (c1 - c0, r1 - r0))
                frame[..., r0:r1, c0:c1] = torch.lerp(frame[..., r0:r1, c0:c1], inner, mask[r0:r1, c0:c1])
        return frame.clamp(0, 1)

    def __getitem__(self, i: int) -> torch.Tensor:
        """Frame ``i`` of the video (in play order), [B, 3, h, w]."""
        return self.pass_frame(self.order[i])

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self[i]

    def chunks(self, size: int = 16) -> Iterator[tuple[int, torch.Tensor]]:
        """(first index, [T, B, 3, h, w]) for consecutive runs of at most ``size`` frames."""
        for start in range(0, len(self), size):
            stop = min(start + size, len(self))
            yield start, torch.stack([self[i] for i in range(start, stop)])


def _resample(image: torch.Tensor, dim: int, size: int, start: float, stop: float) -> torch.Tensor:
    """``image`` resampled along ``dim`` (-2: rows, -1: columns) to ``size`` samples of the span
    start..stop with Pillow's bicubic, as ``imageops.resize(box=...)`` does, but only over the
    source pixels the span's kernels reach (a frame deep in a step reads a fraction of its scale)."""
    matrix = resample_weights(image.shape[dim], size, "bicubic", start, stop)
    used = matrix.abs().sum(0).nonzero()
    a, b = int(used[0]), int(used[-1]) + 1
    weights = matrix[:, a:b].to(image.device, image.dtype)
    if dim == -2:
        return torch.matmul(weights, image[..., a:b, :])
    return torch.matmul(image[..., a:b], weights.T)


def _check_nested(outer: Box, inner: Box, k: int) -> None:
    tol = 1e-6 * max(outer.width, outer.height)
    nested = (inner.left >= outer.left - tol and inner.top >= outer.top - tol
              and inner.right <= outer.right + tol and inner.bottom <= outer.bottom + tol)
    if not nested or inner.width * inner.height >= outer.width * outer.height:
        raise ValueError(f"the box of scale {k + 1} {inner.as_list()} does not lie inside and below the box "
                         f"of scale {k} {outer.as_list()}: a zoom video needs the nested boxes of one chain")


# --- encoding -------------------------------------------------------------------------------

def _import_av():
    try:
        import av
    except ImportError as exc:
        raise ValueError("writing a video needs PyAV (the FFmpeg bindings ComfyUI uses): pip install av") from exc
    return av


def check_output(path: str | Path, fps: float, seconds: float | None = None) -> str:
    """The codec for ``path``, after checking the settings and that PyAV is installed (before any
    long work): a clear ValueError otherwise."""
    path = Path(path)
    codec = CONTAINERS.get(path.suffix.lower())
    if codec is None:
        raise ValueError(f"cannot write a video to {path}: use one of {', '.join(CONTAINERS)}")
    if not (math.isfinite(fps) and 0 < fps <= 1000):
        raise ValueError(f"fps must be above 0 and at most 1000, got {fps}")
    if seconds is not None and not (math.isfinite(seconds) and 0 < seconds <= 86400):
        raise ValueError(f"the video length must be above 0 seconds, got {seconds}")
    _import_av()
    return codec


# the encoder's colour tags (AVCodecContext options): BT.709 limited range, as converted
_BT709 = {"colorspace": "bt709", "color_primaries": "bt709", "color_trc": "bt709", "color_range": "tv"}


def write_video(frames: Iterable[torch.Tensor], path: str | Path, fps: float = 30.0, crf: int = 18,
                on_frame: Callable[[int], None] | None = None) -> int:
    """Encode frames ([3, H, W] or [1, 3, H, W] float 0..1) into ``path`` with PyAV; returns the
    number of frames written. The codec follows the suffix: .mp4 / .mov / .mkv H.264 (yuv420p,
    as ComfyUI's Save Video), .webm VP9. ``crf``: quality, lower is better (18: visually lossless)."""
    codec = check_output(path, fps)
    path = Path(path)
    av = _import_av()
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(round(fps * 1000), 1000))
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(int(crf)), **_BT709}
        for frame in frames:
            frame = frame[0] if frame.ndim == 4 else frame
            height, width = frame.shape[-2:]
            if count == 0:
                if width % 2 or height % 2:
                    raise ValueError(f"{width}x{height} frames: yuv420p video needs an even width and height")
                stream.width, stream.height = width, height
            elif (width, height) != (stream.width, stream.height):
                raise ValueError(f"frame {count} is {width}x{height}, the video {stream.width}x{stream.height}")
            array = (frame.detach().float().clamp(0, 1) * 255.0 + 0.5).byte().permute(1, 2, 0).cpu().numpy()
            yuv = av.VideoFrame.from_ndarray(array, format="rgb24").reformat(
                format="yuv420p", dst_colorspace="ITU709", dst_color_range="MPEG")
            container.mux(stream.encode(yuv))
            count += 1
            if on_frame:
                on_frame(count)
        if count == 0:
            raise ValueError("no frames to write")
        container.mux(stream.encode(None))
    return count


def save_zoom_video(result: ChainResult, path: str | Path, fps: float = 30.0, seconds: float = 8.0,
                    direction: str = "in", on_frame: Callable[[int, int], None] | None = None) -> int:
    """The zoom video of a chain's first batch element, ``seconds`` long at ``fps`` (sizes cut to
    even numbers for yuv420p), written to ``path`` one frame at a time; returns the frame count.
    ``on_frame(done, total)`` follows the progress."""
    check_output(path, fps, seconds)
    width, height = result.steps[0].image.shape[-1], result.steps[0].image.shape[-2]
    config = VideoConfig(frames=max(2, round(fps * seconds)), direction=direction,
                         size=(width - width % 2, height - height % 2))
    video = ZoomVideo([s.image[:1] for s in result.steps], [s.box for s in result.steps], config)
    report = (lambda done: on_frame(done, len(video))) if on_frame else None
    return write_video(iter(video), path, fps, on_frame=report)

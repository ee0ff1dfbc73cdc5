"""Zoom geometry and the Chain-of-Zoom chain.

Geometry follows the CoZ reference's integer arithmetic (``inference_coz.py``): scale 0 is the
input resized (Lanczos) so it covers the process size and centre-cropped; step k crops
``w // zoom`` x ``h // zoom`` pixels of scale k-1 at ``(w - new_w) // 2`` and resizes that crop
(bicubic) back to the process size, which is the SR input. Beyond the reference: a zoom target
anywhere (the box is clamped inside the image and follows the same point of the original at every
step), non-square sizes and non-integer zoom factors, and the region of the original image
that every scale shows.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .color import COLOR_METHODS, align_color
from .imageops import ensure_rgb, resize
from .prompt.base import FixedPrompts, PromptRequest, PromptSource, compose_prompt, prompt_info
from .sr.base import SRBackbone, SRRequest

MODES = ("recursive_multiscale", "recursive", "onestep", "bicubic", "nearest")
MODEL_MODES = ("recursive_multiscale", "recursive", "onestep")
DIRECT_MODES = ("onestep", "bicubic", "nearest")  # crop scale 0 directly, no recursion

# Total magnification (zoom ^ steps) is capped at 2^40 (about 10^12): beyond it the box a scale
# shows is narrower than float64 can resolve next to its coordinates in the original image.
MAX_MAGNIFICATION_LOG2 = 40
# Step k samples with seed + k, wrapped into torch.manual_seed's range (0 .. 2^64 - 1).
SEED_RANGE = 2**64

CropBox = tuple[int, int, int, int]  # (left, top, right, bottom) in pixels, right/bottom exclusive


@dataclass(frozen=True)
class Box:
    """A region of the original input image, in its pixel coordinates (floats)."""

    left: float
    top: float
    right: float
    bottom: float

    @property
    def width(self) -> float:
        return self.right - self.left

    @property
    def height(self) -> float:
        return self.bottom - self.top

    def sub(self, crop: CropBox, size: tuple[int, int]) -> "Box":
        """The part of this box that ``crop`` selects from an image of ``size`` = (w, h) showing it."""
        w, h = size
        sx, sy = self.width / w, self.height / h
        return Box(self.left + crop[0] * sx, self.top + crop[1] * sy,
                   self.left + crop[2] * sx, self.top + crop[3] * sy)

    def as_list(self) -> list[float]:
        return [self.left, self.top, self.right, self.bottom]


def _place(center: float, full: int, part: int) -> int:
    """Left edge of a ``part``-wide window centred on ``center`` (0..1 of ``full``), clamped inside."""
    start = math.floor(center * full - part / 2 + 1e-9)
    return min(max(start, 0), full - part)


def initial_plan(
    in_size: tuple[int, int], out_size: tuple[int, int], center: tuple[float, float] = (0.5, 0.5)
) -> tuple[tuple[int, int], CropBox]:
    """Scale 0: the (w, h) to resize the input to so it covers ``out_size``, and the crop box.

    With a square ``out_size`` and the centre this is the reference's
    ``resize_and_center_crop`` (short side to the size with ``int()``, then ``(new - size) // 2``).
    """
    (in_w, in_h), (out_w, out_h) = in_size, out_size
    scale = max(out_w / in_w, out_h / in_h)
    # max(): int() of a float product can land one pixel short (e.g. 511.9999 -> 511)
    rw, rh = max(out_w, int(in_w * scale)), max(out_h, int(in_h * scale))
    left, top = _place(center[0], rw, out_w), _place(center[1], rh, out_h)
    return (rw, rh), (left, top, left + out_w, top + out_h)


def zoom_box(size: tuple[int, int], zoom: float, center: tuple[float, float] = (0.5, 0.5)) -> CropBox:
    """Crop box of one zoom step on an image of ``size`` = (w, h).

    The window is ``floor(w / zoom)`` x ``floor(h / zoom)``; at the centre its left edge is
    ``(w - new_w) // 2``, the reference's arithmetic. Elsewhere it is centred on ``center`` and
    clamped inside the image.
    """
    w, h = size
    new_w, new_h = math.floor(w / zoom + 1e-9), math.floor(h / zoom + 1e-9)
    if new_w < 1 or new_h < 1:
        raise ValueError(
            f"a {w}x{h} image is too small to zoom in {zoom:g}x (the crop would be "
            f"{new_w}x{new_h} pixels); use a larger process size or fewer steps"
        )
    left, top = _place(center[0], w, new_w), _place(center[1], h, new_h)
    return left, top, left + new_w, top + new_h


def center_in_crop(center: tuple[float, float], crop: CropBox, size: tuple[int, int]) -> tuple[float, float]:
    """Where the point ``center`` (0..1 of an image of ``size``) lies inside ``crop``, as 0..1."""
    w, h = size
    return ((center[0] * w - crop[0]) / (crop[2] - crop[0]),
            (center[1] * h - crop[1]) / (crop[3] - crop[1]))


def crop(image: torch.Tensor, box: CropBox) -> torch.Tensor:
    left, top, right, bottom = box
    return image[..., top:bottom, left:right]


def zoom_in(image: torch.Tensor, box: CropBox, filter: str = "bicubic") -> tuple[torch.Tensor, torch.Tensor]:
    """(region, zoomed): the crop at native resolution and resized to the image's own size."""
    region = crop(image, box)
    zoomed = resize(region, tuple(image.shape[-2:]), filter).clamp(0, 1)
    return region, zoomed


# --- the chain -------------------------------------------------------------------------------

@dataclass
class ChainConfig:
    mode: str = "recursive_multiscale"
    steps: int = 4
    zoom: float = 4.0  # magnification per step
    size: tuple[int, int] = (512, 512)  # process (width, height)
    center: tuple[float, float] = (0.5, 0.5)  # zoom target, 0..1 of the input image
    # wavelet by default: CoZ's error accumulates over steps and colour drift is its most visible
    # form; wavelet keeps the zoomed input's colour and costs almost nothing (the reference: none).
    color: str = "wavelet"
    user_prompt: str = ""
    seed: int | None = None  # for sampling backbones; step k uses seed + k

    def __post_init__(self) -> None:
        if isinstance(self.size, int):
            self.size = (self.size, self.size)
        self.size = (int(self.size[0]), int(self.size[1]))
        self.center = (float(self.center[0]), float(self.center[1]))

    def validate_settings(self) -> None:
        """Check everything that needs no model (mode, steps, zoom, size, centre, colour), so a
        face can refuse bad settings before loading anything."""
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {MODES}")
        if not 1 <= self.steps <= 64:
            raise ValueError(f"steps must be between 1 and 64, got {self.steps}")
        if not (math.isfinite(self.zoom) and 1.0 < self.zoom <= 64.0):
            raise ValueError(f"zoom per step must be above 1 and at most 64, got {self.zoom}")
        if self.steps * math.log2(self.zoom) > MAX_MAGNIFICATION_LOG2 + 1e-9:
            most = math.floor(MAX_MAGNIFICATION_LOG2 / math.log2(self.zoom) + 1e-9)
            raise ValueError(
                f"{self.steps} steps at zoom {self.zoom:g} magnify {self.zoom:g}^{self.steps} = "
                f"2^{self.steps * math.log2(self.zoom):.1f}x, beyond 2^{MAX_MAGNIFICATION_LOG2} where "
                f"positions in the original image can no longer be told apart; use at most {most} steps"
            )
        if min(self.size) < 8 or max(self.size) > 16384:
            raise ValueError(f"process size must be between 8 and 16384 pixels, got {self.size}")
        if not all(0.0 <= c <= 1.0 for c in self.center):
            raise ValueError(f"zoom centre must be within 0..1, got {self.center}")
        if self.color not in COLOR_METHODS:
            raise ValueError(f"unknown colour method {self.color!r}; choose one of {sorted(COLOR_METHODS)}")
        # the deepest crop must keep at least one pixel
        zoom_box(self.size, self.zoom ** (self.steps if self.mode in DIRECT_MODES else 1))

    def validate(self, backbone: SRBackbone | None = None) -> None:
        """:meth:`validate_settings`, then whether ``backbone`` fits them."""
        self.validate_settings()
        if self.mode in MODEL_MODES:
            if backbone is None:
                raise ValueError(f"mode {self.mode!r} needs an SR backbone")
            multiple = int(getattr(backbone, "size_multiple", 1))
            if self.size[0] % multiple or self.size[1] % multiple:
                raise ValueError(
                    f"the {backbone.name} backbone needs a process size that is a multiple of "
                    f"{multiple}; {self.size[0]}x{self.size[1]} is not"
                )


@dataclass
class ZoomStep:
    index: int  # 0 = scale 0
    image: torch.Tensor  # [B, 3, H, W] float 0..1
    zoomed: torch.Tensor | None  # the SR input (None for scale 0)
    prompts: list[str]  # one per batch element ([] where no prompt was used)
    box: Box  # the region of the original input this scale shows
    crop: CropBox | None  # the crop taken from the source scale (k-1, or 0 in direct modes)
    seconds: dict[str, float] = field(default_factory=dict)  # prompt, model, total
    # log2 of the pixels of this scale per pixel of the original input (horizontal), carried
    # from step to step as a sum of logs (the box width itself underflows at deep zooms);
    # None: computed from the box
    magnification_log2: float | None = None

    @property
    def magnification(self) -> float:
        """Pixels of this scale per pixel of the original input (horizontal)."""
        if self.magnification_log2 is not None:
            return 2.0 ** self.magnification_log2
        return self.image.shape[-1] / self.box.width

    def record(self) -> dict:
        """JSON-friendly description (no pixels)."""
        return {"index": self.index, "prompts": self.prompts, "box": self.box.as_list(),
                "crop": list(self.crop) if self.crop else None,
                "magnification": self.magnification, "seconds": self.seconds}


@dataclass
class ChainResult:
    steps: list[ZoomStep]
    config: ChainConfig
    input_size: tuple[int, int]  # (w, h) of the original input
    cancelled: bool = False
    prompt: dict | None = None  # the prompt source's prompt.base.prompt_info (type, model, adapter, tokens)

    @property
    def final(self) -> torch.Tensor:
        return self.steps[-1].image

    @property
    def images(self) -> list[torch.Tensor]:
        return [s.image for s in self.steps]

    @property
    def prompts(self) -> list[list[str]]:
        return [s.prompts for s in self.steps[1:]]

    def zoom_of(self, step: ZoomStep) -> float:
        """Magnification of ``step`` relative to scale 0 (4, 16, 64 ... by default)."""
        first = self.steps[0]
        if step.magnification_log2 is not None and first.magnification_log2 is not None:
            return 2.0 ** (step.magnification_log2 - first.magnification_log2)
        return step.magnification / first.magnification

    def record(self) -> dict:
        steps = [{**s.record(), "zoom": self.zoom_of(s)} for s in self.steps]
        return {"config": asdict(self.config), "input_size": list(self.input_size),
                "cancelled": self.cancelled, "prompt": self.prompt, "steps": steps}


def prepare_input(image: torch.Tensor) -> torch.Tensor:
    """Validate a [B, C, H, W] (or [C, H, W]) image and return float32 RGB in 0..1."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor image, got {type(image).__name__}")
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[0] == 0 or image.shape[-1] == 0 or image.shape[-2] == 0:
        raise ValueError(f"expected a non-empty image [B, C, H, W], got shape {tuple(image.shape)}")
    image = ensure_rgb(image.float())
    if not torch.isfinite(image).all():
        raise ValueError("the image contains NaN or infinite values")
    return image.clamp(0, 1)


def scale_zero(
    image: torch.Tensor, size: tuple[int, int], center: tuple[float, float]
) -> tuple[torch.Tensor, Box, tuple[float, float]]:
    """Scale 0 of ``image`` [B, 3, H, W]: resized (Lanczos) to cover ``size`` = (w, h) and cropped.

    Returns it with the region of the input it shows and the zoom target in its coordinates
    (0..1; the target moves off the centre when the crop was clamped at the image's edge).
    """
    in_w, in_h = image.shape[-1], image.shape[-2]
    (rw, rh), box = initial_plan((in_w, in_h), size, center)
    resized = resize(image, (rh, rw), "lanczos").clamp(0, 1)
    sx, sy = in_w / rw, in_h / rh
    region = Box(box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    return crop(resized, box).contiguous(), region, center_in_crop(center, box, (rw, rh))


def _clock(device: torch.device) -> float:
    """perf_counter after the device's queued work (so the step's timings add up on GPUs too)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def run_chain(
    image: torch.Tensor,
    backbone: SRBackbone | None = None,
    config: ChainConfig | None = None,
    prompt_source: PromptSource | None = None,
    on_step: Callable[[ZoomStep], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    device: torch.device | str | None = None,
) -> ChainResult:
    """Run the zoom chain on every image of the batch ``image`` [B, C, H, W] (float 0..1).

    ``on_step`` is called after every scale (scale 0 included); ``should_stop`` is asked before
    every step and ends the chain cleanly, returning the scales done so far. ``device``: where the
    scales live and are cropped, resized and colour-fixed (None: the backbone's device, so nothing
    crosses to the host between steps; the input's device when there is no backbone).
    """
    config = config or ChainConfig()
    config.validate(backbone)
    if device is None:
        device = getattr(backbone, "device", None) or image.device
    device = torch.device(device)
    image = prepare_input(image.to(device))
    in_w, in_h = image.shape[-1], image.shape[-2]
    source = prompt_source or FixedPrompts("")

    t0 = _clock(device)
    first, region, target = scale_zero(image, config.size, config.center)
    steps = [ZoomStep(0, first, None, [], region, None, {"total": _clock(device) - t0},
                      math.log2(first.shape[-1] / region.width))]
    if on_step:
        on_step(steps[0])
    size_wh = config.size

    cancelled = False
    for k in range(1, config.steps + 1):
        if should_stop and should_stop():
            cancelled = True
            break
        t_start = _clock(device)
        if config.mode in DIRECT_MODES:
            source_step = steps[0]
            box = zoom_box(size_wh, config.zoom**k, target)
        else:
            source_step = steps[-1]
            box = zoom_box(size_wh, config.zoom, target)
        filter = "nearest" if config.mode == "nearest" else "bicubic"
        region_px, zoomed = zoom_in(source_step.image, box, filter)
        shown = source_step.box.sub(box, size_wh)
        seconds: dict[str, float] = {}

        if config.mode in ("bicubic", "nearest"):
            out, prompts = zoomed, []
        else:
            t = _clock(device)
            request = PromptRequest(steps[-1].image, zoomed, k, multiscale=config.mode == "recursive_multiscale",
                                    user_prompt=config.user_prompt)
            generated = source(request)  # also for prompt-free backbones: the chain records it
            prompts = [compose_prompt(g, config.user_prompt) for g in generated]
            seconds["prompt"] = _clock(device) - t
            t = _clock(device)
            seed = None if config.seed is None else (config.seed + k) % SEED_RANGE
            out = backbone(SRRequest(region_px, zoomed, prompts, seed=seed))
            seconds["model"] = _clock(device) - t
            if out.shape != zoomed.shape:
                raise RuntimeError(
                    f"the {backbone.name} backbone returned {tuple(out.shape)}, expected {tuple(zoomed.shape)}"
                )
            out = align_color(out.float().clamp(0, 1), zoomed, config.color)
        if config.mode not in DIRECT_MODES:
            target = center_in_crop(target, box, size_wh)
        seconds["total"] = _clock(device) - t_start
        # this scale's crop of ``box[2] - box[0]`` pixels of the source scale fills its full width
        log2_mag = source_step.magnification_log2 + math.log2(size_wh[0] / (box[2] - box[0]))
        steps.append(ZoomStep(k, out, zoomed, prompts, shown, box, seconds, log2_mag))
        if on_step:
            on_step(steps[-1])
    return ChainResult(steps, config, (in_w, in_h), cancelled, prompt_info(source))

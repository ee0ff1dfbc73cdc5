"""Whole-image Chain-of-Zoom: the entire picture made x2 to x16 (or more) larger, a prompt per tile.

Reference (upstream ``inference_coz_full.py``, class ``OSEDiff_SD3_TEST_TILE``): the image is
resized by the pass factor (Lanczos) and encoded (tiled VAE); the latent is cut into tiles of
64 cells with 16 cells of overlap; every tile gets a VLM prompt from two images (the whole input
at 512 short side as the "zoom-out" view, then the tile; 16 new tokens, the chain's question),
one SD3 step with that prompt, and the tiles are blended with a separable Gaussian weight
(variance 0.01 of the tile size) and decoded. Wan2GP's port reaches x8 / x16 with passes of x4
then x2 / x4; so does this engine (x4 per pass, x2 for the rest: any power of two).

Where this engine departs, and why:
- **Streamed per tile**: every tile is encoded (with a margin of context), stepped, decoded,
  colour-fixed and added into one preallocated output with weights normalised in advance (the
  blend weights are separable, so their sum is a product of two 1-D sums). Nothing else grows with
  the image: memory is the output plus one tile (upstream keeps every tile's latent until the end).
  Tiles are therefore blended in image space, not in latent space; each decoded tile's own border
  gets no weight (the blend ramp starts with a zero margin), so decoder edge effects never show.
- **Tile prompts from the enlarged input's crop** (as Wan2GP), not from a VAE decode of the
  latent tile (upstream): the same picture without an extra decode per tile.
- **Decode adds the VAE shift factor** as the chain and CoZ's training do; upstream's tiled
  decode omits it (a small brightness offset there).
- **One noise field**: the latent sample's noise is fixed per latent cell (seeded per row), so
  overlapping tiles draw the same noise where they overlap, and the seed is used (upstream's is not).
- **Colour fix** against the enlarged input (wavelet by default; upstream: none), per tile.
- **Blend**: a raised cosine over the overlap (default, exact where tiles agree) or upstream's
  Gaussian.
- **Any backbone**: backbones other than CoZ's SD3 (e.g. Real-ESRGAN) run on image tiles with
  ``context`` input pixels around them and are blended the same way: a seam-free tiled upscale of
  any size (prompts are still written and recorded, the model ignores them).
- Non-square sizes and sizes that are no multiple of the tile or of 16 (padded by replication,
  cropped back); alpha is enlarged with Lanczos and carried through unchanged by the model.
- Memory is estimated first and a run that would not fit is refused with the estimate.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from . import policy
from .color import COLOR_METHODS, align_color
from .imageops import resize
from .prompt.base import FixedPrompts, PromptRequest, PromptSource, compose_prompt
from .sr.base import SRBackbone, SRRequest
from .tiling import ramp, tile_starts

BLENDS = ("cosine", "gaussian")
CONTEXT_SIZE = 512  # short side of the zoom-out view the VLM sees (upstream)
PROMPT_TOKENS, PROMPT_BATCH = policy.VLM_TILE_TOKENS, policy.VLM_TILE_BATCH  # the faces set these on the VLM
SD3_TILE, SD3_OVERLAP = policy.WHOLE_IMAGE_SD3_TILE, policy.WHOLE_IMAGE_SD3_OVERLAP
OTHER_TILE, OTHER_OVERLAP = policy.WHOLE_IMAGE_TILE, policy.WHOLE_IMAGE_OVERLAP
SD3_ENCODE_MARGIN = 64  # output pixels of context around a tile for the VAE encoder
LANCZOS_REACH = 4  # input pixels Pillow's Lanczos reads beyond a box when enlarging (support 3)


def plan_passes(factor: int) -> list[int]:
    """The passes that make ``factor``: x4 each, then x2 for the rest (8 -> [4, 2], 16 -> [4, 4])."""
    if isinstance(factor, bool) or int(factor) != factor or factor < 2 or int(factor) & (int(factor) - 1):
        raise ValueError(
            f"an upscale factor of {factor} cannot be made from x4 and x2 passes; choose a power of two "
            "(2, 4, 8, 16, 32 ...)"
        )
    n = int(factor).bit_length() - 1
    return [4] * (n // 2) + [2] * (n % 2)


def is_sd3(backbone) -> bool:
    """Whether ``backbone`` exposes CoZ SD3's step pieces (encode / velocity / decode)."""
    return all(callable(getattr(backbone, name, None)) for name in ("encode", "velocity", "decode")) \
        and hasattr(backbone, "text_encoder")


@dataclass
class UpscaleConfig:
    factor: int = 4
    tile: int | None = None  # output pixels per tile side (None: 512 for SD3 as upstream, else 1024)
    overlap: int | None = None  # output pixels shared by neighbours (None: 128 for SD3, else 64)
    context: int | None = None  # input pixels of context around image tiles (None: the backbone's overlap or 16)
    color: str = "wavelet"  # against the enlarged input; upstream: none
    blend: str = "cosine"
    user_prompt: str = ""
    seed: int | None = 42
    context_size: int = CONTEXT_SIZE
    memory_limit: int | None = None  # bytes the buffers may take (None: the memory available now)

    def resolved(self, backbone) -> "UpscaleConfig":
        """A copy with tile, overlap and context chosen for ``backbone``."""
        sd3 = is_sd3(backbone)
        tile = self.tile if self.tile is not None else (SD3_TILE if sd3 else OTHER_TILE)
        overlap = self.overlap if self.overlap is not None else (SD3_OVERLAP if sd3 else OTHER_OVERLAP)
        context = self.context if self.context is not None else int(getattr(backbone, "overlap", 16) or 0)
        return UpscaleConfig(**{**asdict(self), "tile": tile, "overlap": overlap, "context": context})

    def validate(self, backbone) -> None:
        plan_passes(self.factor)
        if self.color not in COLOR_METHODS:
            raise ValueError(f"unknown colour method {self.color!r}; choose one of {sorted(COLOR_METHODS)}")
        if self.blend not in BLENDS:
            raise ValueError(f"unknown blend {self.blend!r}; choose one of {BLENDS}")
        align = alignment(backbone, 4)
        if self.tile is None or self.tile < max(64, 2 * align):
            raise ValueError(f"tile must be at least {max(64, 2 * align)} output pixels, got {self.tile}")
        if self.overlap is None or not 0 <= self.overlap <= self.tile // 2:
            raise ValueError(f"overlap must be between 0 and half the tile ({self.tile // 2}), got {self.overlap}")
        if self.context is None or self.context < 0:
            raise ValueError(f"context must not be negative, got {self.context}")
        if self.context_size < 28:
            raise ValueError(f"the VLM's context view needs at least 28 pixels, got {self.context_size}")


def alignment(backbone, factor: int) -> int:
    """Tile offsets and sizes in output pixels are multiples of this: 16 for SD3 (VAE 8 x patch 2);
    for image backbones the pass factor (so every tile is whole input pixels)."""
    return 16 if is_sd3(backbone) else factor


# --- geometry ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tile:
    index: int  # raster order within its pass
    row: int
    col: int
    box: tuple[int, int, int, int]  # (left, top, right, bottom) in output pixels of the pass (padded grid)


def tile_grid(height: int, width: int, tile: int, overlap: int, align: int) -> list[Tile]:
    """Tiles of at most ``tile`` pixels covering ``height`` x ``width`` with ``overlap`` shared, all of
    one size, offsets on multiples of ``align`` (the sides must be multiples of ``align``)."""
    tile = max(align, tile // align * align)
    th, tw = min(tile, height), min(tile, width)
    ys = tile_starts(height, th, min(overlap, th - 1), align)
    xs = tile_starts(width, tw, min(overlap, tw - 1), align)
    return [Tile(r * len(xs) + c, r, c, (x, y, x + tw, y + th)) for r, y in enumerate(ys) for c, x in enumerate(xs)]


def _profile(size: int, overlap: int, rise: bool, fall: bool, blend: str) -> torch.Tensor:
    if blend == "gaussian":  # upstream's weight: variance 0.01 of the tile size, never zero
        x = (torch.arange(size, dtype=torch.float64) - (size - 1) / 2) / size
        return torch.exp(-x * x / 0.02).float()
    return ramp(size, overlap, rise, fall, "cpu", torch.float32)


def blend_profiles(tiles: list[Tile], height: int, width: int, overlap: int, blend: str
                   ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Per tile row and column: 1-D weights divided by their sum over the grid, so the separable
    products of every tile add up to exactly 1 at every pixel."""
    rows = {t.row: (t.box[1], t.box[3]) for t in tiles}
    cols = {t.col: (t.box[0], t.box[2]) for t in tiles}

    def normalised(spans: dict[int, tuple[int, int]], length: int) -> dict[int, torch.Tensor]:
        raw = {k: _profile(b - a, overlap, a > 0, b < length, blend) for k, (a, b) in spans.items()}
        total = torch.zeros(length)
        for k, (a, b) in spans.items():
            total[a:b] += raw[k]
        if (total <= 0).any():
            raise RuntimeError("the tile grid leaves pixels without weight; raise the overlap")
        return {k: raw[k] / total[a:b] for k, (a, b) in spans.items()}

    return normalised(rows, height), normalised(cols, width)


def enlarge(image: torch.Tensor, factor: int, box: tuple[int, int, int, int]) -> torch.Tensor:
    """The pixels ``box`` (left, top, right, bottom, output pixels) of ``image`` resized x``factor``
    with Lanczos, exactly as those of the whole enlarged image (Pillow's arithmetic, clamped to 0..1
    as Pillow's 8-bit result is); parts of the box beyond the enlarged image repeat its edge."""
    h, w = image.shape[-2:]
    left, top, right, bottom = box
    cl, ct, cr, cb = max(left, 0), max(top, 0), min(right, w * factor), min(bottom, h * factor)
    # only the input pixels the Lanczos windows read: same weights, small matrices
    x0, y0 = max(math.floor(cl / factor) - LANCZOS_REACH, 0), max(math.floor(ct / factor) - LANCZOS_REACH, 0)
    x1, y1 = min(math.ceil(cr / factor) + LANCZOS_REACH, w), min(math.ceil(cb / factor) + LANCZOS_REACH, h)
    part = image[..., y0:y1, x0:x1]
    out = resize(part, (cb - ct, cr - cl), "lanczos",
                 box=(cl / factor - x0, ct / factor - y0, cr / factor - x0, cb / factor - y0)).clamp_(0, 1)
    pad = (cl - left, right - cr, ct - top, bottom - cb)
    if any(pad):
        out = F.pad(out, pad, mode="replicate")
    return out


def cell_noise(seed: int, salt: int, channels: int, rows: range, cols: range, width: int) -> torch.Tensor:
    """[1, channels, len(rows), len(cols)] standard normal noise, a fixed field over latent cells:
    row y is drawn from a generator seeded by (seed, salt, y) over the whole ``width``."""
    out = []
    for y in rows:
        g = torch.Generator().manual_seed((seed * 0x9E3779B1 + salt * 0x85EBCA6B + y) % (2**63))
        out.append(torch.randn(channels, width, generator=g)[:, cols.start:cols.stop])
    return torch.stack(out, dim=1).unsqueeze(0)


# --- memory --------------------------------------------------------------------------------

def available_memory() -> int:
    """Bytes of RAM available now (psutil when installed, else the OS's free pages)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


@dataclass(frozen=True)
class MemoryEstimate:
    output: int  # the result (float32, every batch element)
    passes: int  # the largest intermediate pass image
    tile: int  # one tile's image buffers (model activations not included)

    @property
    def total(self) -> int:
        return self.output + self.passes + self.tile


def estimate_memory(height: int, width: int, channels: int, batch: int, config: UpscaleConfig) -> MemoryEstimate:
    """Host memory of an upscale of ``batch`` images of ``height`` x ``width`` (``config`` resolved)."""
    passes = plan_passes(config.factor)
    out = batch * channels * height * width * config.factor**2 * 4
    inter, scale = 0, 1
    for p in passes[:-1]:
        scale *= p
        inter = max(inter, channels * height * width * scale**2 * 4)
    side = config.tile + 2 * max(SD3_ENCODE_MARGIN, config.context * max(passes))
    return MemoryEstimate(out, inter, 12 * 4 * 4 * side * side)


class MemoryLimitError(MemoryError):
    """The upscale would not fit; the message holds the estimate and how to lower it."""


def check_memory(height: int, width: int, channels: int, batch: int, config: UpscaleConfig) -> MemoryEstimate:
    estimate = estimate_memory(height, width, channels, batch, config)
    limit = config.memory_limit if config.memory_limit is not None else available_memory()
    if estimate.total > limit:
        gb = 1024**3
        raise MemoryLimitError(
            f"upscaling {batch} image(s) of {width}x{height} x{config.factor} makes "
            f"{width * config.factor}x{height * config.factor} pixels: about {estimate.total / gb:.2f} GB "
            f"(output {estimate.output / gb:.2f} GB, intermediate pass {estimate.passes / gb:.2f} GB, "
            f"tile {estimate.tile / gb:.2f} GB) but only {limit / gb:.2f} GB may be used; lower the factor, "
            "upscale a crop or fewer images at once, or free memory"
        )
    return estimate


# --- the engine ----------------------------------------------------------------------------

@dataclass
class TileRecord:
    batch: int
    pass_index: int  # 0-based
    tile: Tile
    prompt: str = ""
    seconds: dict[str, float] = field(default_factory=dict)  # prompt, model

    def record(self) -> dict:
        return {"batch": self.batch, "pass": self.pass_index, "index": self.tile.index, "row": self.tile.row,
                "col": self.tile.col, "box": list(self.tile.box), "prompt": self.prompt, "seconds": self.seconds}


@dataclass
class TileEvent:
    """What ``on_tile`` gets after every unit of work."""

    phase: str  # "prompt" or "tile"
    record: TileRecord
    done: int  # units finished in the whole run
    total: int
    image: torch.Tensor  # the output being filled [1, C, H, W] (a view; do not keep)


@dataclass
class PassInfo:
    batch: int
    index: int
    factor: int
    size: tuple[int, int]  # (width, height) made by this pass
    grid: tuple[int, int]  # (rows, cols)
    tile: tuple[int, int]  # (width, height) of every tile

    def record(self) -> dict:
        return asdict(self)


@dataclass
class UpscaleResult:
    image: torch.Tensor  # [B, C, H, W] float32 0..1 (C = 4 when the input had alpha); partial when cancelled
    config: UpscaleConfig
    input_size: tuple[int, int]  # (w, h)
    backbone: str
    tiles: list[TileRecord]
    passes: list[PassInfo]
    memory: MemoryEstimate
    seconds: dict[str, float]
    cancelled: bool = False

    @property
    def prompts(self) -> list[str]:
        return [t.prompt for t in self.tiles]

    def record(self) -> dict:
        """JSON-friendly manifest (no pixels)."""
        return {"config": asdict(self.config), "input_size": list(self.input_size),
                "output_size": [int(self.image.shape[-1]), int(self.image.shape[-2])], "backbone": self.backbone,
                "cancelled": self.cancelled, "memory_estimate_bytes": asdict(self.memory),
                "passes": [p.record() for p in self.passes], "tiles": [t.record() for t in self.tiles],
                "seconds": self.seconds}


def _split_alpha(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    channels = image.shape[1]
    if channels == 4:
        return image[:, :3], image[:, 3:]
    if channels == 2:
        return image[:, :1].expand(-1, 3, -1, -1), image[:, 1:]
    if channels == 1:
        return image.expand(-1, 3, -1, -1), None
    if channels == 3:
        return image, None
    raise ValueError(f"expected 1 to 4 image channels, got {channels}")


def _check_input(image: torch.Tensor) -> torch.Tensor:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor image, got {type(image).__name__}")
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or 0 in image.shape:
        raise ValueError(f"expected a non-empty image [B, C, H, W], got shape {tuple(image.shape)}")
    if not 1 <= image.shape[1] <= 4:
        raise ValueError(f"expected 1 to 4 image channels, got {image.shape[1]}")
    image = image.float()
    if not torch.isfinite(image).all():
        raise ValueError("the image contains NaN or infinite values")
    return image if 0 <= float(image.min()) and float(image.max()) <= 1 else image.clamp(0, 1)  # no copy if in range


class _Run:
    """One upscale: the state shared by its passes."""

    def __init__(self, backbone, config, source, on_tile, should_stop, load_models, total):
        self.backbone, self.config, self.source = backbone, config, source
        self.on_tile, self.should_stop, self.load_models = on_tile, should_stop, load_models
        self.sd3 = is_sd3(backbone)
        self.done, self.total = 0, total
        self.records: list[TileRecord] = []
        self.passes: list[PassInfo] = []

    def stop(self) -> bool:
        return bool(self.should_stop and self.should_stop())

    def tick(self, phase: str, record: TileRecord, image: torch.Tensor) -> None:
        self.done += 1
        if self.on_tile:
            self.on_tile(TileEvent(phase, record, self.done, self.total, image))

    def one_pass(self, rgb: torch.Tensor, context: torch.Tensor, factor: int, out: torch.Tensor,
                 b: int, k: int) -> bool:
        """Upscale ``rgb`` [1, 3, h, w] x``factor`` into ``out`` [1, 3, H, W] (zeros). False when stopped."""
        cfg = self.config
        h, w = rgb.shape[-2:]
        H, W = h * factor, w * factor
        align = alignment(self.backbone, factor)
        Hp, Wp = -(-H // align) * align, -(-W // align) * align  # padded grid (SD3: multiples of 16)
        tiles = tile_grid(Hp, Wp, cfg.tile, cfg.overlap, align)
        wy, wx = blend_profiles(tiles, Hp, Wp, cfg.overlap, cfg.blend)
        box0 = tiles[0].box
        self.passes.append(PassInfo(b, k, factor, (W, H), (tiles[-1].row + 1, tiles[-1].col + 1),
                                    (box0[2] - box0[0], box0[3] - box0[1])))
        records = [TileRecord(b, k, t) for t in tiles]
        self.records.extend(records)

        # 1. prompts, all first: the VLM is loaded once, then the SR model. A source with a
        # ``batch_size`` (the VLM) gets that many tiles per request; others one tile (its step = tile number)
        size = max(1, int(getattr(self.source, "batch_size", 1) or 1))
        for start in range(0, len(records), size):
            if self.stop():
                return False
            group = records[start:start + size]
            t0 = time.perf_counter()
            # the tile as the model gets it (a padded SD3 grid repeats the image's edge): all of one size
            views = torch.cat([enlarge(rgb, factor, r.tile.box) for r in group])
            request = PromptRequest(context.expand(len(group), -1, -1, -1), views, group[0].tile.index + 1,
                                    user_prompt=cfg.user_prompt)
            generated = list(self.source(request))
            if len(generated) != len(group):
                raise RuntimeError(f"the prompt source wrote {len(generated)} prompts for {len(group)} tiles")
            for rec, text in zip(group, generated):
                rec.prompt = compose_prompt(text, cfg.user_prompt)
                rec.seconds["prompt"] = (time.perf_counter() - t0) / len(group)
                self.tick("prompt", rec, out)

        if self.load_models:
            self.load_models()
        remaining: dict[str, int] = {}
        for rec in records:
            remaining[rec.prompt] = remaining.get(rec.prompt, 0) + 1
        conditions: dict[str, object] = {}

        # 2. tiles: model, colour fix, weighted add into the output
        for rec in records:
            if self.stop():
                return False
            t0 = time.perf_counter()
            left, top, right, bottom = rec.tile.box
            if self.sd3:
                piece = self._sd3_tile(rgb, factor, rec, (Hp, Wp), conditions, remaining, b, k)
            else:
                piece = self._image_tile(rgb, factor, rec, k)
            weight = wy[rec.tile.row][:, None] * wx[rec.tile.col][None, :]
            vb, vr = min(bottom, H), min(right, W)  # the part inside the real (unpadded) image
            out[0, :, top:vb, left:vr] += (piece * weight)[0, :, :vb - top, :vr - left]
            rec.seconds["model"] = time.perf_counter() - t0
            self.tick("tile", rec, out)
        out.clamp_(0, 1)
        return True

    def _sd3_tile(self, rgb, factor, rec, padded, conditions, remaining, b, k):
        backbone, cfg = self.backbone, self.config
        Hp, Wp = padded
        left, top, right, bottom = rec.tile.box
        m = SD3_ENCODE_MARGIN
        ctx = (max(left - m, 0), max(top - m, 0), min(right + m, Wp), min(bottom + m, Hp))
        x = enlarge(rgb, factor, ctx)
        noise = None
        if backbone.latent_mode == "sample":
            channels = backbone.vae.config.latent_channels
            seed = 0 if cfg.seed is None else cfg.seed
            noise = cell_noise(seed, b * 64 + k, channels, range(ctx[1] // 8, ctx[3] // 8),
                               range(ctx[0] // 8, ctx[2] // 8), Wp // 8)
        if rec.prompt not in conditions:
            if backbone.text_encoder is None:
                raise ValueError("this CoZ model was loaded without text encoders; whole-image upscaling "
                                 "encodes a prompt per tile and needs them")
            conditions[rec.prompt] = backbone.text_encoder([rec.prompt])
        cond = conditions[rec.prompt]
        with torch.no_grad():
            z = backbone.encode(x * 2 - 1, noise=noise)
            cy, cx = (top - ctx[1]) // 8, (left - ctx[0]) // 8
            z = z[..., cy:cy + (bottom - top) // 8, cx:cx + (right - left) // 8]
            z0 = z - backbone.velocity(z, cond)
            piece = (backbone.decode(z0) + 1) / 2
        remaining[rec.prompt] -= 1
        if not remaining[rec.prompt]:  # identical prompts are encoded once, kept until their last tile
            del conditions[rec.prompt]
        reference = x[..., top - ctx[1]:bottom - ctx[1], left - ctx[0]:right - ctx[0]]
        return align_color(piece.float().clamp(0, 1).cpu(), reference, cfg.color)

    def _image_tile(self, rgb, factor, rec, k):
        cfg = self.config
        h, w = rgb.shape[-2:]
        left, top, right, bottom = rec.tile.box
        c = cfg.context
        x0, y0 = max(left // factor - c, 0), max(top // factor - c, 0)  # the tile and its context, in rgb
        x1, y1 = min(right // factor + c, w), min(bottom // factor + c, h)
        region = rgb[..., y0:y1, x0:x1]
        zoomed = enlarge(rgb, factor, (x0 * factor, y0 * factor, x1 * factor, y1 * factor))
        seed = None if cfg.seed is None else cfg.seed + k
        with torch.no_grad():
            out = self.backbone(SRRequest(region, zoomed, [rec.prompt], seed=seed))
        if tuple(out.shape[-2:]) != tuple(zoomed.shape[-2:]):
            raise RuntimeError(f"the {self.backbone.name} backbone returned {tuple(out.shape)} for "
                               f"{tuple(zoomed.shape)}")
        # colour-fixed with the context, then cropped to the tile
        out = align_color(out.float().clamp(0, 1).cpu(), zoomed, cfg.color)
        oy, ox = top - y0 * factor, left - x0 * factor
        crop = (slice(oy, oy + bottom - top), slice(ox, ox + right - left))
        return out[..., crop[0], crop[1]]


def count_units(height: int, width: int, backbone, config: UpscaleConfig) -> int:
    """Prompts + tiles of one image (progress total); ``config`` resolved."""
    units = 0
    for p in plan_passes(config.factor):
        height, width = height * p, width * p
        align = alignment(backbone, p)
        grid = tile_grid(-(-height // align) * align, -(-width // align) * align, config.tile, config.overlap, align)
        units += 2 * len(grid)
    return units


def new_output(batch: int, channels: int, height: int, width: int) -> torch.Tensor:
    """A zeroed float32 [B, C, H, W] view of [B, H, W, C] storage: ComfyUI's IMAGE layout and
    the layout image files are written in, so neither needs a copy of the (large) result."""
    return torch.zeros(batch, height, width, channels).permute(0, 3, 1, 2)


def upscale_image(
    image: torch.Tensor,
    backbone: SRBackbone,
    config: UpscaleConfig | None = None,
    prompt_source: PromptSource | None = None,
    on_tile: Callable[[TileEvent], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    load_models: Callable[[], None] | None = None,
) -> UpscaleResult:
    """Upscale every image of ``image`` [B, C, H, W] (float 0..1, C 1..4) by ``config.factor``.

    ``prompt_source`` writes each tile's prompt (default: none, i.e. the user prompt alone);
    ``on_tile`` is called after every prompt and every tile; ``should_stop`` is asked before each
    and ends the run keeping what is done (``cancelled``); ``load_models`` is called after the
    prompts of a pass, before its tiles (a host loads the SR model there).
    """
    t_start = time.perf_counter()
    config = (config or UpscaleConfig()).resolved(backbone)
    config.validate(backbone)
    image = _check_input(image)
    batch, channels, h, w = image.shape
    rgb_all, alpha_all = _split_alpha(image)
    out_channels = 4 if alpha_all is not None else 3
    memory = check_memory(h, w, out_channels, batch, config)
    passes = plan_passes(config.factor)
    source = prompt_source or FixedPrompts("")
    result = new_output(batch, out_channels, h * config.factor, w * config.factor)
    run = _Run(backbone, config, source, on_tile, should_stop, load_models, batch * count_units(h, w, backbone, config))

    cancelled = False
    for b in range(batch):
        rgb = rgb_all[b:b + 1]
        short = min(h, w)  # the zoom-out view: the original at context_size short side (upstream)
        context = resize(rgb, (max(1, int(h * config.context_size / short)),
                               max(1, int(w * config.context_size / short))),
                         "lanczos").clamp(0, 1)
        for k, factor in enumerate(passes):
            last = k == len(passes) - 1
            H, W = rgb.shape[-2] * factor, rgb.shape[-1] * factor
            out = result[b:b + 1, :3] if last else new_output(1, 3, H, W)
            if not run.one_pass(rgb, context, factor, out, b, k):
                cancelled = True
                if not last:  # show what the interrupted pass made, enlarged to the result's size
                    result[b:b + 1, :3] = resize(out, tuple(result.shape[-2:]), "bicubic").clamp(0, 1)
                break
            rgb = out
        if alpha_all is not None:
            a = alpha_all[b:b + 1]
            result[b:b + 1, 3:] = enlarge(a, config.factor, (0, 0, w * config.factor, h * config.factor))
        if cancelled:
            break
    name = getattr(backbone, "name", type(backbone).__name__)
    return UpscaleResult(result, config, (w, h), name, run.records, run.passes, memory,
                         {"total": time.perf_counter() - t_start}, cancelled)

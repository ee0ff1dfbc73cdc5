"""Image tensors: layout conversion, PIL-exact resampling, loading and saving.

Inside coz_core images are float32 [B, C, H, W] in 0..1. ComfyUI's IMAGE is [B, H, W, C]; the
two conversions below are the only place that layout changes.

The resampler reproduces Pillow's ``Image.resize`` (its coefficient maths in
``libImaging/Resample.c``) on float data (bilinear and bicubic through torch's antialiased
``interpolate``, which implements the same filters; Lanczos, nearest and sub-pixel boxes by
hand): the CoZ reference resizes with PIL's Lanczos and bicubic (Keys a = -0.5, antialiased
when shrinking), which torch's interpolate does not match.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

FILTERS = ("nearest", "bilinear", "bicubic", "lanczos")
# filters torch.nn.functional.interpolate(antialias=True) computes as Pillow does (whole images);
# Lanczos and nearest, and sub-pixel boxes, stay on the hand-written matrices below
_TORCH_EQUAL = ("bilinear", "bicubic")


def to_bchw(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [B, H, W, C] -> [B, C, H, W]."""
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4:
        raise ValueError(f"expected an image tensor [B, H, W, C], got shape {tuple(image.shape)}")
    return image.permute(0, 3, 1, 2).contiguous()


def to_bhwc(image: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> ComfyUI IMAGE [B, H, W, C]."""
    return image.permute(0, 2, 3, 1).contiguous()


def ensure_rgb(image: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] with C in 1..4 -> [B, 3, H, W]: grey is repeated, alpha is dropped."""
    channels = image.shape[1]
    if channels == 3:
        return image
    if channels == 1:
        return image.expand(-1, 3, -1, -1).contiguous()
    if channels == 2:  # grey + alpha
        return image[:, :1].expand(-1, 3, -1, -1).contiguous()
    if channels == 4:
        return image[:, :3].contiguous()
    raise ValueError(f"expected 1 to 4 image channels, got {channels}")


# --- Pillow's filters (libImaging/Resample.c) ------------------------------------------------

def _bilinear(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


def _bicubic(x: float, a: float = -0.5) -> float:
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x *= math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    return _sinc(x) * _sinc(x / 3.0) if -3.0 <= x < 3.0 else 0.0


_KERNELS = {"bilinear": (_bilinear, 1.0), "bicubic": (_bicubic, 2.0), "lanczos": (_lanczos, 3.0)}


@lru_cache(maxsize=256)
def _weights(in_size: int, out_size: int, filter: str, in0: float, in1: float) -> torch.Tensor:
    """Dense [out_size, in_size] resampling matrix, Pillow's precompute_coeffs in float64."""
    scale = (in1 - in0) / out_size
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    if filter == "nearest":  # Pillow's affine nearest: floor((x + 0.5) * scale + in0)
        idx = np.floor((np.arange(out_size) + 0.5) * scale + in0).astype(np.int64)
        matrix[np.arange(out_size), np.clip(idx, 0, in_size - 1)] = 1.0
        return torch.from_numpy(matrix)
    kernel, support = _KERNELS[filter]
    filterscale = max(scale, 1.0)
    support *= filterscale
    inv = 1.0 / filterscale
    for xx in range(out_size):
        center = in0 + (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        w = np.array([kernel((x - center + 0.5) * inv) for x in range(xmin, xmax)])
        total = w.sum()
        matrix[xx, xmin:xmax] = w / total if total != 0.0 else w
    return torch.from_numpy(matrix)


@lru_cache(maxsize=256)
def _placed_weights(in_size: int, out_size: int, filter: str, in0: float, in1: float,
                    device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """:func:`_weights` on ``device`` in ``dtype``, kept there: no host copy per resize on a GPU."""
    return _weights(in_size, out_size, filter, in0, in1).to(device, dtype)


def resample_weights(in_size: int, out_size: int, filter: str, start: float, stop: float) -> torch.Tensor:
    """Pillow's [out_size, in_size] resampling matrix (float64) for the source span start..stop,
    computed afresh: for one-off spans (video frames) that would only crowd resize's cache."""
    if filter not in FILTERS:
        raise ValueError(f"unknown filter {filter!r}; choose one of {FILTERS}")
    return _weights.__wrapped__(int(in_size), int(out_size), filter, float(start), float(stop))


def resize(
    image: torch.Tensor,
    size: tuple[int, int],
    filter: str = "bicubic",
    box: tuple[float, float, float, float] | None = None,
) -> torch.Tensor:
    """Resize [..., H, W] to ``size`` = (height, width) exactly as Pillow would on float data.

    ``box`` = (left, top, right, bottom) in input pixels selects a (sub-pixel) source region,
    as Pillow's ``resize(box=...)`` does. No clamping: callers clamp when they need 0..1.
    """
    if filter not in FILTERS:
        raise ValueError(f"unknown filter {filter!r}; choose one of {FILTERS}")
    out_h, out_w = int(size[0]), int(size[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(f"output size must be positive, got {size}")
    in_h, in_w = image.shape[-2], image.shape[-1]
    if in_h < 1 or in_w < 1:
        raise ValueError(f"cannot resize an empty image ({in_w}x{in_h} pixels)")
    left, top, right, bottom = box if box is not None else (0.0, 0.0, float(in_w), float(in_h))
    if (out_h, out_w) == (in_h, in_w) and (left, top, right, bottom) == (0, 0, in_w, in_h):
        return image.clone()
    work = image if image.dtype in (torch.float32, torch.float64) else image.float()
    if filter in _TORCH_EQUAL and box is None:
        # torch's antialiased bilinear/bicubic is Pillow's filter (a = -0.5, support scaled when
        # shrinking). In float32 it strays up to 2.3e-5 from Pillow on large shrinks; in float64
        # (on the CPU: 2.6x faster than the matrices below all the same) within 2e-7
        compute = torch.float64 if work.device.type == "cpu" else work.dtype
        flat = work.reshape(-1, 1, in_h, in_w).to(compute)
        out = F.interpolate(flat, size=(out_h, out_w), mode=filter, antialias=True, align_corners=False)
        out = out.reshape(*work.shape[:-2], out_h, out_w).to(work.dtype)
        return out.to(image.dtype) if out.dtype != image.dtype else out
    wy = _placed_weights(in_h, out_h, filter, float(top), float(bottom), work.device, work.dtype)
    wx = _placed_weights(in_w, out_w, filter, float(left), float(right), work.device, work.dtype)
    out = torch.matmul(torch.matmul(wy, work), wx.T)
    return out.to(image.dtype) if out.dtype != image.dtype else out


# --- files -----------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".avif", ".heic", ".heif")
WHITE = (1.0, 1.0, 1.0)


@lru_cache(maxsize=1)
def heif_plugin() -> bool:
    """Whether HEIC/HEIF files (phones' photos) open: with the pillow-heif package (optional),
    registered with Pillow on first use."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


@contextmanager
def open_image(path: Path) -> Iterator[Any]:
    """``path`` opened by Pillow (HEIC/HEIF too where pillow-heif is installed). What goes wrong
    while it is open and read is told with the file's name: :class:`ImageTooLarge` over Pillow's
    pixel limit, not an image (with what would read it), or damaged."""
    from PIL import Image, UnidentifiedImageError

    heif_plugin()
    try:
        with Image.open(path) as img:
            yield img
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{path} is too large to read safely ({exc})") from None
    except UnidentifiedImageError as exc:
        raise _unreadable(path, exc) from exc
    except (OSError, ValueError) as exc:  # a damaged file (plugins such as pillow-heif raise ValueError)
        raise ValueError(f"{path} could not be decoded: {exc}") from exc


def _unreadable(path: Path, error: Exception) -> ValueError:
    """The error for a file Pillow cannot identify, with what would read it where that is known."""
    hint = ""
    if path.suffix.lower() in (".heic", ".heif") and not heif_plugin():
        hint = "; HEIC/HEIF photos need the pillow-heif package: pip install pillow-heif"
    elif path.suffix.lower() == ".avif":
        hint = "; AVIF needs Pillow 11.3 or newer: pip install -U pillow"
    return ValueError(f"{path} is not an image Pillow can read ({error}){hint}")


class ImageTooLarge(ValueError):
    """An image above Pillow's pixel limit (its guard against decompression bombs)."""


@dataclass
class LoadedImage:
    """An image file read as float32 [1, 3, H, W] in 0..1, with what reading it did."""

    image: torch.Tensor
    size: tuple[int, int]  # (w, h) stored in the file; differs from the tensor's when reduced
    scale: tuple[float, float] = (1.0, 1.0)  # file pixels per tensor pixel (> 1: reduced on reading)
    alpha: str | None = None  # how transparency was handled; None: the file has none
    frames: int = 1  # frames in the file (the first is read)
    icc_profile: bytes | None = None  # the file's RGB colour profile (rgb_profile), for the outputs

    @property
    def notes(self) -> list[str]:
        notes = [self.alpha] if self.alpha else []
        if self.scale != (1.0, 1.0):
            w, h = self.image.shape[-1], self.image.shape[-2]
            notes.append(f"read reduced from {self.size[0]}x{self.size[1]} to {w}x{h} (a large image)")
        if self.frames > 1:
            notes.append(f"first of {self.frames} frames")
        if self.icc_profile:
            notes.append("colour profile (ICC) kept in the output images")
        return notes


def load_image(path: str | Path, background: tuple[float, float, float] = WHITE) -> torch.Tensor:
    """Read an image file as float32 [1, 3, H, W] in 0..1 (see :func:`read_image`)."""
    return read_image(path, background).image


def read_image(
    path: str | Path,
    background: tuple[float, float, float] = WHITE,
    *,
    allow_large: bool = False,
    process_size: tuple[int, int] | None = None,
) -> LoadedImage:
    """Read an image file as float32 [1, 3, H, W] in 0..1.

    Grey is expanded to RGB; transparency is composited on ``background`` (RGB in 0..1, white by
    default), so the colour stored under transparent pixels never shows; 16-bit and float images
    keep their precision; of an animation the first frame is read. Images above Pillow's pixel
    limit raise :class:`ImageTooLarge` unless ``allow_large``; they are then shrunk on reading by
    the largest integer factor that keeps them at least three times the size scale 0 resizes
    them to for ``process_size`` = (w, h) (Pillow's ``reducing_gap=3``: the Lanczos resize from
    the reduced copy is then indistinguishable), so only a fraction of their pixels is held.
    """
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    limit = Image.MAX_IMAGE_PIXELS
    try:
        if allow_large:
            Image.MAX_IMAGE_PIXELS = None
        with open_image(path) as img:
            stored, frames = img.size, getattr(img, "n_frames", 1)
            factor = 1
            if allow_large and limit and stored[0] * stored[1] > limit and process_size is not None:
                w, h = _seen(stored, _orientation(img, before_reading=True))
                factor = max(1, math.floor(1 / (3 * max(process_size[0] / w, process_size[1] / h))))
            if factor > 1 and img.format == "JPEG":
                img.draft(img.mode, (stored[0] // factor, stored[1] // factor))  # decodes at 1/2 .. 1/8
            drafted = stored[0] // img.size[0]  # 1, 2, 4 or 8: what JPEG's draft did already
            array = _reduce(_read_array(img, path), max(1, factor // drafted))
            size, profile = _seen(stored, _orientation(img)), rgb_profile(img)
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    scale = (float(drafted * max(1, factor // drafted)),) * 2
    tensor = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)
    alpha = None
    if tensor.shape[1] in (2, 4):
        colour, opacity = tensor[:, :-1], tensor[:, -1:]
        bg = torch.tensor(background, dtype=tensor.dtype).view(1, 3, 1, 1)
        if colour.shape[1] == 1:
            colour = colour.expand(-1, 3, -1, -1)
        tensor = colour * opacity + bg * (1.0 - opacity)
        alpha = f"alpha composited on background {tuple(round(float(c), 4) for c in background)}"
    return LoadedImage(ensure_rgb(tensor).contiguous(), size, scale, alpha, frames, profile)


def rgb_profile(img) -> bytes | None:
    """The ICC colour profile of an open Pillow image when it describes RGB (phones' Display P3,
    Adobe RGB...): the pixels are processed as they are, so images made from them are written
    with it to look as the input does. None without one, or for a grey or CMYK profile (such
    pictures are written as RGB, which those profiles cannot describe)."""
    icc = img.info.get("icc_profile")
    return icc if isinstance(icc, bytes) and icc[16:20] == b"RGB " else None  # the header's colour space


def _reduce(array: np.ndarray, factor: int) -> np.ndarray:
    """Box-average [H, W, C] by ``factor``; a partial last row or column of blocks is dropped
    (so every pixel stands for exactly ``factor`` x ``factor`` of the file's)."""
    if factor <= 1:
        return array
    h, w = array.shape[0] // factor * factor, array.shape[1] // factor * factor
    blocks = array[:h, :w].reshape(h // factor, factor, w // factor, factor, array.shape[2])
    return blocks.mean(axis=(1, 3), dtype=np.float64).astype(np.float32)


def _read_array(img, path: Path) -> np.ndarray:
    """A Pillow image as float32 [H, W, C] in 0..1, keeping 16-bit and float precision, turned
    upright as its EXIF orientation says (as viewers and ComfyUI's LoadImage show it)."""
    return _upright(_read_stored(img, path), _orientation(img))


# EXIF orientation -> the stored pixels turned upright (what PIL.ImageOps.exif_transpose does)
_UPRIGHT = {
    2: lambda a: a[:, ::-1],  # mirrored
    3: lambda a: a[::-1, ::-1],  # upside down
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),  # a phone held upright: the stored picture lies on its side
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
}
_TRANSPOSING = (5, 6, 7, 8)


def _orientation(img, before_reading: bool = False) -> int:
    """The EXIF orientation (1: as stored), as Pillow's ``exif_transpose`` reads it. A PNG's
    ``getexif`` decodes the whole picture to reach an eXIf chunk after it; ``before_reading``
    looks only at what precedes the pixels (where Pillow and exiftool write it)."""
    if before_reading and img.format == "PNG" and "exif" not in img.info:
        return 1
    try:
        return int(img.getexif().get(0x0112, 1))  # ExifTags.Base.Orientation
    except (ValueError, TypeError, OSError):  # a damaged EXIF block: the pixels as stored
        return 1


def _seen(stored: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(width, height) of the picture as it is seen."""
    return stored[::-1] if orientation in _TRANSPOSING else stored


def _upright(array: np.ndarray, orientation: int) -> np.ndarray:
    turn = _UPRIGHT.get(orientation)
    return array if turn is None else np.ascontiguousarray(turn(array))


def _read_stored(img, path: Path) -> np.ndarray:
    mode = img.mode
    if img.format == "PNG" and len(img.tile) == 1 and img.tile[0][3] in _PNG16:
        return _read_png16(img, path)
    img.load()
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return (np.asarray(img, dtype=np.uint16).astype(np.float32) / 65535.0)[..., None]
    if mode == "I":  # 32-bit int, what Pillow often gives for 16-bit PNGs
        array = np.asarray(img, dtype=np.int64).astype(np.float32)
        peak = 65535.0 if array.max(initial=0) > 255 else 255.0
        return np.clip(array / peak, 0.0, 1.0)[..., None]
    if mode == "F":
        return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)[..., None]
    if mode not in ("L", "LA", "RGB", "RGBA"):
        img = img.convert("RGBA" if "A" in mode or "transparency" in img.info else "RGB")
    array = np.asarray(img, dtype=np.uint8).astype(np.float32) / 255.0
    return array[..., None] if array.ndim == 2 else array


# Pillow keeps only the high byte of 16-bit RGB(A) PNGs ("RGB;16B" unpacks to 8-bit RGB). Its PNG
# decoder undoes the row filters on the full 16-bit samples either way; unpacking the same stream
# as little-endian ("RGB;16L") yields the low bytes, so two decodes give every 16-bit value.
_PNG16 = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L"}


def _read_png16(img, path: Path) -> np.ndarray:
    from PIL import Image

    img.load()
    high = np.asarray(img, dtype=np.uint16)
    with Image.open(path) as again:
        tile = again.tile[0]  # a named tuple since Pillow 11, a plain tuple before
        low_bytes = _PNG16[tile[3]]
        again.tile = [tile._replace(args=low_bytes) if hasattr(tile, "_replace") else (*tile[:3], low_bytes)]
        again.load()
        low = np.asarray(again, dtype=np.uint16)
    return ((high << 8) | low).astype(np.float32) / 65535.0


def save_image(image: torch.Tensor, path: str | Path, icc_profile: bytes | None = None) -> Path:
    """Write one [3, H, W] or [1, 3, H, W] float 0..1 image as 8-bit (PNG unless the suffix says),
    tagged with ``icc_profile`` (an RGB ICC profile) when given."""
    from PIL import Image

    if image.ndim == 4:
        if image.shape[0] != 1:
            raise ValueError("save_image writes one image; index the batch first")
        image = image[0]
    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path, **({"icc_profile": icc_profile} if icc_profile else {}))
    return path

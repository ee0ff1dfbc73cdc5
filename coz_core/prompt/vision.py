"""Images for Qwen2.5-VL, prepared the way the CoZ reference's pipeline prepares them.

The reference saves every image as an 8-bit PNG and hands the path to qwen-vl-utils'
``process_vision_info``, whose ``fetch_image`` opens it as RGB and resizes it (Pillow's default
filter, bicubic) to the size its ``smart_resize`` picks: both sides multiples of 28 (patch 14 x
merge 2), the pixel count within [min_pixels, max_pixels], the aspect ratio kept as closely as
possible. The Qwen processor then normalises and patchifies. Here the same happens on tensors in
memory: quantise to 8 bits, resize with Pillow to the same size; no files. For a VLM on a GPU all
of it runs there: the resize by :mod:`.pillow_resize` (Pillow's pixels exactly), the normalising
and patchifying by :func:`patchify` (which the processor does with NumPy).
"""
from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..imageops import ensure_rgb
from . import pillow_resize

FACTOR = 28  # patch_size 14 x spatial merge 2
MIN_PIXELS = 4 * FACTOR * FACTOR  # qwen-vl-utils: 4 image tokens
MAX_PIXELS = 16384 * FACTOR * FACTOR  # qwen-vl-utils: 16384 image tokens
MAX_RATIO = 200


def smart_size(
    height: int, width: int, factor: int = FACTOR, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> tuple[int, int]:
    """The (height, width) qwen-vl-utils' ``smart_resize`` gives an image of ``height`` x ``width``.

    Both results are multiples of ``factor``; when rounding each side to the nearest multiple
    lands outside the pixel bounds, both sides are scaled by one factor and floored (too many
    pixels) or ceiled (too few). Python's ``round`` (half to even) as in qwen-vl-utils.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max_pixels < min_pixels:
        raise ValueError(f"max_pixels ({max_pixels}) must not be below min_pixels ({min_pixels})")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(
            f"a {width}x{height} image is too elongated for Qwen2.5-VL (aspect ratio above {MAX_RATIO}); "
            "crop it closer to a square"
        )
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def pixel_limits(folder: str | Path) -> tuple[int, int]:
    """(min_pixels, max_pixels) from a model folder's ``preprocessor_config.json``.

    Qwen publishes ``min_pixels``/``max_pixels`` (newer folders may hold ``size`` with
    ``shortest_edge``/``longest_edge``, the same numbers). Missing values fall back to
    qwen-vl-utils' defaults, which equal those Qwen publishes for Qwen2.5-VL.
    """
    path = Path(folder) / "preprocessor_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} is missing: a Qwen2.5-VL folder needs its preprocessor_config.json "
            "(copy it from the model's original release)"
        ) from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from exc
    size = config.get("size") or {}
    low = config.get("min_pixels", size.get("shortest_edge", MIN_PIXELS))
    high = config.get("max_pixels", size.get("longest_edge", MAX_PIXELS))
    return int(low), int(high)


def quantise(images: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] (float 0..1) as uint8 [B, H, W, 3] on their device: ``floor(x * 255 + 0.5)``
    in float64 (round half up, as :func:`coz_core.imageops.save_image`; the reference truncates its
    SR output when it saves it, a difference of at most one level). Apple's GPUs have no float64:
    there the images are quantised on the CPU."""
    if images.device.type == "mps":
        images = images.cpu()
    levels = images.detach().double().clamp(0, 1).mul(255.0).add(0.5).floor().to(torch.uint8)
    return levels.permute(0, 2, 3, 1).contiguous()


def _checked(images: torch.Tensor, min_pixels: int, max_pixels: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``images`` as RGB after checking them, and the (h, w) they go to."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected images [B, C, H, W], got {shape}")
    if images.shape[0] == 0 or images.shape[-1] == 0 or images.shape[-2] == 0:
        raise ValueError(f"expected non-empty images [B, C, H, W], got shape {tuple(images.shape)}")
    images = ensure_rgb(images)
    if not torch.isfinite(images).all():
        raise ValueError("the image contains NaN or infinite values")
    height, width = int(images.shape[-2]), int(images.shape[-1])
    return images, smart_size(height, width, FACTOR, min_pixels, max_pixels)


def _quantised(images: torch.Tensor, min_pixels: int, max_pixels: int) -> tuple[list[np.ndarray], tuple[int, int]]:
    """The checked images of ``images`` as uint8 [H, W, 3] arrays, and the (h, w) they go to."""
    images, size = _checked(images, min_pixels, max_pixels)
    return list(quantise(images).cpu().numpy()), size


def _resized(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pillow's bicubic resize to (h, w) ``size`` (none when it already fits, as Pillow does)."""
    from PIL import Image

    if array.shape[:2] == size:
        return array
    return np.asarray(Image.fromarray(array).resize((size[1], size[0]), Image.BICUBIC))


def prepare_images(
    images: torch.Tensor, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> list[np.ndarray]:
    """Each image of ``images`` [B, C, H, W] (float 0..1) as the uint8 [h, w, 3] array the VLM sees.

    Grey is expanded and alpha dropped first; every image is resized with Pillow's bicubic to
    :func:`smart_size` (no resize when it already fits, as Pillow does).
    """
    arrays, size = _quantised(images, min_pixels, max_pixels)
    return [_resized(array, size) for array in arrays]


_THREADS: ThreadPoolExecutor | None = None


def prepare_together(
    batches: list[torch.Tensor], min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> list[list[np.ndarray]]:
    """:func:`prepare_images` of each batch, the Pillow resizes in parallel threads (they release
    the GIL; the tensors are read on the calling thread, on its CUDA stream): the two images of a
    multi-scale prompt take about the time of one (measured on 2 CPU cores: 19 ms instead of 32
    for two 512 images)."""
    global _THREADS
    staged = [_quantised(batch, min_pixels, max_pixels) for batch in batches]
    jobs = [(array, size) for arrays, size in staged for array in arrays]
    if len(jobs) < 2:
        resized = [_resized(*job) for job in jobs]
    else:
        if _THREADS is None:
            _THREADS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="coz-vlm-images")
        resized = list(_THREADS.map(lambda job: _resized(*job), jobs))
    out, start = [], 0
    for arrays, _ in staged:
        out.append(resized[start:start + len(arrays)])
        start += len(arrays)
    return out


# above this many pixels (2048 x 2048) an image is resized by Pillow on the CPU even for a GPU:
# its int64 copies there would take hundreds of MiB
DEVICE_RESIZE_PIXELS = 1 << 22


def prepare_batches(
    batches: list[torch.Tensor], device: torch.device, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> list[list[np.ndarray | torch.Tensor]]:
    """Each batch [B, C, H, W] (float 0..1) as the uint8 [h, w, 3] images a VLM on ``device`` sees,
    the pixels of :func:`prepare_images`. For a CUDA ``device``: tensors quantised and resized there
    (:mod:`.pillow_resize`, every pixel equal to Pillow's), with no round trip through the CPU.
    Otherwise arrays resized by Pillow (:func:`prepare_together`)."""
    if device.type != "cuda" or any(b.shape[-2] * b.shape[-1] > DEVICE_RESIZE_PIXELS for b in batches):
        return prepare_together(batches, min_pixels, max_pixels)
    return [prepare_on(batch, device, min_pixels, max_pixels) for batch in batches]


def prepare_on(
    images: torch.Tensor, device: torch.device, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> list[torch.Tensor]:
    """:func:`prepare_images` computed with torch on ``device``: uint8 [h, w, 3] tensors there."""
    images, size = _checked(images, min_pixels, max_pixels)
    pixels = quantise(images).to(device)
    return list(pixels if tuple(pixels.shape[1:3]) == size else pillow_resize.resize(pixels, size))


def patchify(
    images: list[np.ndarray | torch.Tensor], processor: Any, device: torch.device
) -> dict[str, torch.Tensor] | None:
    """What the Qwen image ``processor`` returns for ``images`` (uint8 [h, w, 3] arrays or tensors,
    already at a size it keeps), computed with torch on ``device``: pixel_values [patches, C * t * p * p] there
    (float32), image_grid_thw [n, 3] on the CPU. None when an image would be resized (the
    processor must do that). The same arithmetic as the processor's, in another order: results
    agree to float32 rounding (tests compare them)."""
    patch, merge, frames = processor.patch_size, processor.merge_size, processor.temporal_patch_size
    size = processor.size
    low, high = (size["shortest_edge"], size["longest_edge"]) if processor.do_resize else (0, float("inf"))
    mean = torch.tensor(processor.image_mean, dtype=torch.float32, device=device)[:, None, None]
    std = torch.tensor(processor.image_std, dtype=torch.float32, device=device)[:, None, None]
    patches, grids = [], []
    for array in images:
        height, width = array.shape[:2]
        if processor.do_resize and (height % (patch * merge) or width % (patch * merge)
                                    or not low <= height * width <= high):
            return None
        x = torch.as_tensor(np.array(array) if isinstance(array, np.ndarray) else array)  # arrays: a writable copy
        x = x.to(device).permute(2, 0, 1).float()
        if processor.do_rescale:
            x = x * processor.rescale_factor
        if processor.do_normalize:
            x = (x - mean) / std
        channels, rows, cols = x.shape[0], height // patch, width // patch
        x = x.reshape(channels, rows // merge, merge, patch, cols // merge, merge, patch)
        x = x.permute(1, 4, 2, 5, 0, 3, 6)[:, :, :, :, :, None]  # (rows, cols, merge, merge, C, t, p, p)
        x = x.expand(*x.shape[:5], frames, patch, patch)
        patches.append(x.reshape(rows * cols, channels * frames * patch * patch))
        grids.append([1, rows, cols])
    return {"pixel_values": torch.cat(patches), "image_grid_thw": torch.tensor(grids, dtype=torch.long)}

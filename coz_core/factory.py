"""One factory for SR backbones and prompt sources, called by the CLI and the ComfyUI nodes alike.

Each builder takes resolved file paths (the faces resolve names: the CLI from its arguments, the
nodes through ComfyUI's model folders), the device the model will compute on (``device``) and a
precision name; the precision policy itself lives in :mod:`coz_core.policy`. ``load_device`` is
where weights are placed after loading (the nodes load onto ComfyUI's offload device and let
its model management move them; the CLI loads straight onto the compute device).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from . import policy
from .prompt.base import FixedPrompts, PromptSource
from .sr.base import SRBackbone

TEXT_ENCODERS = ("clip_l", "clip_g", "t5")


def upscale_backbone(
    model: str | Path,
    device: torch.device,
    precision: str = "auto",
    *,
    tile: int | None = policy.TILE,
    overlap: int = policy.TILE_OVERLAP,
    cache_dir: str | Path | None = None,
    load_device: torch.device | None = None,
) -> SRBackbone:
    """An embedded Real-ESRGAN (``x4plus``, ``x4plus_anime``, ``animevideov3``; converted once into
    ``cache_dir``) or a Real-ESRGAN ``.safetensors``/``.pth`` file, as an SR backbone."""
    from .sr.realesrgan import EMBEDDED_MODELS, ensure_converted, load_upscale_state_dict
    from .sr.upscale import UpscaleModelBackbone

    name = str(model)
    if name in EMBEDDED_MODELS:
        path, label = ensure_converted(name, cache_dir), f"Real-ESRGAN {name}"
    elif Path(name).is_file():
        path, label = Path(name), Path(name).stem
    else:
        raise ValueError(f"backbone {name!r} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}) "
                         "nor an existing Real-ESRGAN file")
    module = load_upscale_state_dict(path)
    return UpscaleModelBackbone(module, module.scale, label, tile=tile, overlap=overlap,
                                device=load_device or device, dtype=policy.resolve_dtype(precision, device))


def module_backbone(
    model,
    weights: torch.nn.Module,
    scale: int,
    device: torch.device,
    *,
    tile: int | None = policy.TILE,
    overlap: int = policy.TILE_OVERLAP,
    name: str | None = None,
) -> SRBackbone:
    """A shared upscale model (a callable ``model`` whose parameters live in ``weights``, e.g.
    ComfyUI's UPSCALE_MODEL) as an SR backbone: it keeps its dtype and layout and is moved to
    ``device`` only while it runs, then put back."""
    from .sr.upscale import UpscaleModelBackbone

    dtype = next(weights.parameters()).dtype
    return UpscaleModelBackbone(model, scale, name, tile=tile, overlap=overlap, device=device, dtype=dtype,
                                channels_last=False, restore=True, weights=weights)


def sd3_backbone(
    sd3: str | Path,
    coz_lora: str | Path | None,
    coz_vae: str | Path | None,
    device: torch.device,
    precision: str = "auto",
    *,
    clip_l: str | Path | None = None,
    clip_g: str | Path | None = None,
    t5: str | Path | None = None,
    text_encoders: Sequence[str] = TEXT_ENCODERS,
    tokenizers: str | Path | dict | None = None,
    latent_mode: str = "sample",
    load_device: torch.device | None = None,
) -> SRBackbone:
    """CoZ's one-step SD3 backbone: SD3 medium (diffusers folder or single file) with CoZ's LoRA and
    VAE encoder merged in (None for either leaves plain SD3, for comparisons only).

    ``text_encoders``: which of clip_l, clip_g, t5 to load (none: conditioning comes from outside,
    e.g. ComfyUI's CLIPTextEncode); ``precision``: an SD3 preset of :mod:`coz_core.policy`."""
    from .sr.coz_sd3 import CoZSD3Backbone

    unknown = set(text_encoders) - set(TEXT_ENCODERS)
    if unknown:
        raise ValueError(f"unknown text encoders {sorted(unknown)}; choose from {TEXT_ENCODERS}")
    return CoZSD3Backbone.from_files(
        sd3, coz_lora, coz_vae, clip_l=clip_l, clip_g=clip_g, t5=t5 if "t5" in text_encoders else None,
        text_encoders=tuple(text_encoders), tokenizers=tokenizers,
        precision=policy.sd3_precision(precision, device), device=load_device or device,
        latent_mode=latent_mode,
    )


def vlm_prompt_source(
    folder: str | Path,
    device: torch.device,
    precision: str = "auto",
    *,
    adapter: str | Path | None = None,
    max_new_tokens: int = policy.VLM_TOKENS,
    load_device: torch.device | None = None,
) -> PromptSource:
    """Qwen2.5-VL (with an optional PEFT LoRA adapter merged in) writing each step's prompt."""
    from .prompt.qwen import QwenPromptSource, load_qwen_vl

    vlm = load_qwen_vl(folder, adapter=adapter, dtype=policy.resolve_dtype(precision, device),
                       device=load_device or device)
    return QwenPromptSource(vlm, max_new_tokens=max_new_tokens)


def fixed_prompt_source(texts: str | Sequence[str] = "") -> PromptSource:
    """No model: one text for every step, or one per step (the last repeats)."""
    return FixedPrompts(texts)

"""One factory for SR backbones and prompt sources, called by the CLI and the ComfyUI nodes alike.

Each builder takes resolved file paths (the faces resolve names: the CLI from its arguments, the
nodes through ComfyUI's model folders), the device the model will compute on (``device``) and a
precision name; the precision policy itself lives in :mod:`coz_core.policy`. ``load_device`` is
where weights are placed after loading (the nodes load onto ComfyUI's offload device and let
its model management move them; the CLI loads straight onto the compute device).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from . import policy
from .prompt.base import FixedPrompts, PromptSource
from .sr.base import SRBackbone

TEXT_ENCODERS = ("clip_l", "clip_g", "t5")
log = logging.getLogger(__name__)

# Upstream's prompt types (inference_coz.py --prompt_type; its DAPE tagger is not carried over):
# vlm = Qwen2.5-VL + CoZ's GRPO adapter (ckpt/VLM_LoRA/checkpoint-10000), vlm_base = plain
# Qwen2.5-VL, fixed = the user's per-step texts, none = no generated text (upstream's null: the
# user prompt alone).
PROMPT_TYPES = ("vlm", "vlm_base", "fixed", "none")


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
    e.g. ComfyUI's CLIPTextEncode); ``precision``: an SD3 preset of :mod:`coz_core.policy`
    (``policy.SD3_PRESETS``; a preset that makes the VLM and SD3 take turns is applied by the
    caller: :func:`coz_core.residency.take_turns` outside ComfyUI, its model management inside)."""
    from .sr.coz_sd3 import CoZSD3Backbone

    unknown = set(text_encoders) - set(TEXT_ENCODERS)
    if unknown:
        raise ValueError(f"unknown text encoders {sorted(unknown)}; choose from {TEXT_ENCODERS}")
    setup = policy.sd3_setup(precision, device)
    if setup.chosen:
        log.info("SD3 precision auto on this GPU: %s, for every model resident (another precision preset "
                 "picks otherwise)", setup.chosen)
    if setup.not_compiled:
        log.info("SD3 %s: %s; it runs uncompiled, slower", precision, setup.not_compiled)
    return CoZSD3Backbone.from_files(
        sd3, coz_lora, coz_vae, clip_l=clip_l, clip_g=clip_g, t5=t5 if "t5" in text_encoders else None,
        text_encoders=tuple(text_encoders), tokenizers=tokenizers, precision=setup.precision,
        transformer_fp8=setup.transformer_fp8, text_fp8=setup.text_fp8, compile=setup.compile,
        device=load_device or device, latent_mode=latent_mode,
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
    """Qwen2.5-VL (with an optional PEFT LoRA adapter merged in: prompt type ``vlm``, else
    ``vlm_base``) writing each step's prompt."""
    from .prompt.qwen import QwenPromptSource, load_qwen_vl

    if precision not in policy.PRECISIONS:  # an SD3-only preset (reference, fast, ...): the VLM's auto
        precision = "auto"
    vlm = load_qwen_vl(folder, adapter=adapter, dtype=policy.resolve_dtype(precision, device),
                       device=load_device or device)
    return QwenPromptSource(vlm, max_new_tokens=max_new_tokens)


def prompt_type(
    kind: str | None,
    vlm: str | Path | None = None,
    adapter: str | Path | None = None,
    texts: str | Sequence[str] = "",
) -> str:
    """The prompt type the given parts make (``kind`` None: inferred from them), or a ValueError
    saying what to change. Cheap (reads only the adapter's config): call it before loading models."""
    has_texts = any(t.strip() for t in ([texts] if isinstance(texts, str) else texts))
    if kind is None:
        kind = "vlm" if adapter else "vlm_base" if vlm else "fixed" if has_texts else "none"
    if kind not in PROMPT_TYPES:
        raise ValueError(f"unknown prompt type {kind!r}; choose one of {', '.join(PROMPT_TYPES)}")
    if kind in ("vlm", "vlm_base"):
        if not vlm:
            raise ValueError(f"prompt type {kind!r} needs a Qwen2.5-VL-Instruct folder (coz-zoom: --vlm FOLDER)")
        if kind == "vlm" and not adapter:
            raise ValueError("prompt type 'vlm' is Qwen2.5-VL with CoZ's GRPO prompt adapter: give its folder "
                             "(ckpt/VLM_LoRA/checkpoint-10000; coz-zoom: --vlm-adapter FOLDER), or choose "
                             "'vlm_base' for the plain model")
        if kind == "vlm_base" and adapter:
            raise ValueError("prompt type 'vlm_base' is the plain Qwen2.5-VL: leave the adapter out "
                             "(--vlm-adapter), or choose 'vlm' to merge it in")
        if not Path(vlm).is_dir():
            raise FileNotFoundError(f"Qwen2.5-VL folder not found: {vlm}")
        if adapter:
            from .prompt.adapter import check_adapter_folder

            check_adapter_folder(Path(adapter))
        if has_texts:
            raise ValueError(f"prompt type {kind!r} writes its own prompts: leave the per-step texts out "
                             "(--step-prompts), or choose 'fixed'")
        return kind
    if vlm or adapter:
        raise ValueError(f"prompt type {kind!r} uses no VLM: leave --vlm/--vlm-adapter out, or choose 'vlm' "
                         "or 'vlm_base'")
    if kind == "fixed" and not has_texts:
        raise ValueError("prompt type 'fixed' needs its texts (coz-zoom: --step-prompts 'a|b|c', one per step, "
                         "the last repeats); for the user prompt alone choose 'none'")
    if kind == "none" and has_texts:
        raise ValueError("prompt type 'none' uses no per-step texts: leave --step-prompts out, or choose 'fixed'")
    return kind


def prompt_source(
    kind: str | None,
    device: torch.device,
    precision: str = "auto",
    *,
    vlm: str | Path | None = None,
    adapter: str | Path | None = None,
    texts: str | Sequence[str] = "",
    max_new_tokens: int = policy.VLM_TOKENS,
    load_device: torch.device | None = None,
) -> PromptSource:
    """The prompt source of prompt type ``kind`` (one of :data:`PROMPT_TYPES`; None: inferred, see
    :func:`prompt_type`). Its ``info`` says what runs, for manifests and node outputs."""
    kind = prompt_type(kind, vlm, adapter, texts)
    if kind in ("vlm", "vlm_base"):
        return vlm_prompt_source(vlm, device, precision, adapter=adapter, max_new_tokens=max_new_tokens,
                                 load_device=load_device)
    return fixed_prompt_source(texts if kind == "fixed" else "")


def fixed_prompt_source(texts: str | Sequence[str] = "") -> PromptSource:
    """No model: one text for every step, or one per step (the last repeats)."""
    return FixedPrompts(texts)

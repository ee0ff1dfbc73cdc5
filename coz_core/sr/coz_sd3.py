"""CoZ's SR step: OSEDiff-style one-step SD3 medium with CoZ's LoRA and VAE encoder merged in.

One step, exactly the reference's conventions: x in [-1, 1]; z = VAE.encode(x) (a sample of
the latent distribution, or its mean in deterministic mode) * scaling_factor, with NO shift on
encode; v = transformer(z, t=1000, text); z0 = z - v; image = VAE.decode(z0 / scaling_factor +
shift_factor), clamped to [-1, 1]. CFG 1 (no negative pass).

Precision: by default CoZ's LoRA is merged into the weights at load time (fast); the ``reference``
preset (``SD3Precision.adaln_lora``) keeps it apart and rounds its outputs to float16 as upstream
does, bit for bit (coz_weights.ReferenceLoraLinear). Wan2GP's merged files replace the transformer
and VAE they hold.

Memory: each batch element is processed on its own, large images go through the VAE (and,
beyond the transformer's positional range or on request, the transformer) in overlapping,
smoothly blended tiles.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import policy
from ..tiling import tiled_map
from .base import SRRequest
from .coz_weights import (
    apply_vae_encoder, attach_reference_lora, coz_file_kind, merge_adaln_lora, wan2gp_transformer_state,
    wan2gp_vae_state,
)
from .sd3_loading import FP8, TEXT_COMPONENTS, SD3Precision, load_sd3_medium, store_linears
from .sd3_text import SD3Conditioning, SD3TextEncoder

TIMESTEP = 1000.0  # FlowMatchEuler (shift 3) with one step: sigma 1, t = 1000
LATENT_MODES = ("sample", "mean")
log = logging.getLogger(__name__)


@dataclass
class TileSettings:
    """Tile sizes in pixels (0 = never tile). Latent tiles are given in pixels too (divided by 8)."""

    vae: int = 1024  # images larger than this go through the VAE in tiles
    vae_overlap: int = 128
    latent: int = 0  # transformer tiles; 0 = whole latent (tiled only beyond its positional range)
    latent_overlap: int = 256


class CoZSD3Backbone:
    """SRBackbone: the CoZ one-step SD3 super-resolution model."""

    name = "coz-sd3"
    size_multiple = 16  # VAE 8 x patch 2
    uses_prompt = True

    def __init__(
        self,
        transformer: torch.nn.Module,
        vae: torch.nn.Module,
        text_encoder: SD3TextEncoder | None = None,
        latent_mode: str = "sample",
        tiles: TileSettings | None = None,
    ) -> None:
        if latent_mode not in LATENT_MODES:
            raise ValueError(f"latent_mode must be one of {LATENT_MODES}, got {latent_mode!r}")
        self.transformer, self.vae, self.text_encoder = transformer, vae, text_encoder
        self.latent_mode = latent_mode
        self.tiles = tiles or TileSettings()
        self.compiled = False

    @classmethod
    def from_files(
        cls,
        sd3: str | Path,
        lora: str | Path | None,
        vae_encoder: str | Path | None,
        *,
        clip_l: str | Path | None = None,
        clip_g: str | Path | None = None,
        t5: str | Path | None = None,
        text_encoders: tuple[str, ...] = TEXT_COMPONENTS,
        tokenizers: str | Path | dict[str, str | Path] | None = None,
        precision: SD3Precision | None = None,
        transformer_fp8: bool = False,
        text_fp8: bool = False,
        device: str | torch.device = "cpu",
        text_device: str | torch.device | None = None,
        latent_mode: str = "sample",
        tiles: TileSettings | None = None,
        config_dir: str | Path | None = None,
        compile: bool = False,
    ) -> "CoZSD3Backbone":
        """Load SD3 medium (folder or single file, see ``load_sd3_medium``), merge CoZ's weights, place it.

        ``lora``/``vae_encoder``: CoZ's ``model_20001.pkl`` / ``vae_encoder_20001.pt`` or their
        safetensors conversions, or Wan2GP's ``CoZ_sd3_medium_srlora_bf16`` / ``CoZ_sd3_vae_srlora_bf16``
        (merged files that replace SD3's transformer / VAE); None leaves plain SD3 (for comparisons).
        ``transformer_fp8`` stores the transformer's linear weights in float8 (per-row scaled) after
        the merge; ``text_fp8`` those of CLIP-L/G (T5's: ``precision.t5_fp8``).
        ``precision.adaln_lora == "reference"`` keeps the LoRA apart, rounded as upstream rounds it.
        ``compile``: :meth:`enable_compile` (CUDA; policy.SD3Setup.compile).
        """
        precision = precision or SD3Precision()
        reference = precision.adaln_lora == "reference"
        if precision.adaln_lora not in ("merged", "reference"):
            raise ValueError(f"adaln_lora must be 'merged' or 'reference', got {precision.adaln_lora!r}")
        kinds = {"lora": coz_file_kind(lora) if lora is not None else None,
                 "vae_encoder": coz_file_kind(vae_encoder) if vae_encoder is not None else None}
        for slot, want in (("lora", ("lora", "wan2gp_transformer")), ("vae_encoder", ("vae_encoder", "wan2gp_vae"))):
            if kinds[slot] is not None and kinds[slot] not in want:
                path = lora if slot == "lora" else vae_encoder
                raise ValueError(f"{path}: this is a CoZ {kinds[slot].replace('_', ' ')} file, but it was given as "
                                 f"the {slot.replace('_', ' ')}; "
                                 f"expected {' or '.join(w.replace('_', ' ') for w in want)}")
        overrides = {}
        if kinds["lora"] == "wan2gp_transformer":
            if reference:
                raise ValueError(f"{lora}: Wan2GP's transformer has CoZ's LoRA merged in; the reference precision "
                                 "needs the LoRA apart (CoZ's model_20001.pkl or its .safetensors)")
            overrides["transformer"] = (lora, lambda cfg: wan2gp_transformer_state(lora, cfg))
        if kinds["vae_encoder"] == "wan2gp_vae":
            overrides["vae"] = (vae_encoder, lambda cfg: wan2gp_vae_state(vae_encoder, cfg))
        if reference and (transformer_fp8 or text_fp8 or precision.transformer != torch.float32):
            raise ValueError("the reference precision runs the transformer in float32 (no fp8), as upstream does")
        models = load_sd3_medium(sd3, clip_l=clip_l, clip_g=clip_g, t5=t5, text_encoders=text_encoders,
                                 tokenizers=tokenizers, precision=precision, config_dir=config_dir,
                                 overrides=overrides)
        if kinds["lora"] == "lora":
            (attach_reference_lora if reference else merge_adaln_lora)(models.transformer, lora)
        if kinds["vae_encoder"] == "vae_encoder":
            apply_vae_encoder(models.vae, vae_encoder)
        if transformer_fp8:
            store_linears(models.transformer, FP8, scaled=True)
        if text_fp8:
            for name in ("clip_l", "clip_g"):
                if name in models.text_encoders:
                    store_linears(models.text_encoders[name], FP8, scaled=True)
        models.transformer.to(device)
        models.vae.to(device)
        text = None
        if "clip_l" in models.text_encoders and "clip_g" in models.text_encoders:
            for m in models.text_encoders.values():
                m.to(text_device or device)
            text = SD3TextEncoder(models.text_encoders["clip_l"], models.text_encoders["clip_g"],
                                  models.text_encoders.get("t5"), models.tokenizer_paths,
                                  joint_dim=models.transformer.config.joint_attention_dim)
        elif models.text_encoders:
            raise ValueError("SD3 needs both CLIP-L and CLIP-G to encode text (T5 is optional)")
        backbone = cls(models.transformer, models.vae, text, latent_mode=latent_mode, tiles=tiles)
        return backbone.enable_compile() if compile else backbone

    # --- switches -----------------------------------------------------------------------------

    def enable_compile(self, transformer: bool = True, text: bool = True, vae: bool = True,
                       mode: str | None = None, backend: str = "inductor") -> "CoZSD3Backbone":
        """torch.compile the step's models in place (``Module.compile``: same modules, same weights).

        Regional compilation, as diffusers' ``compile_repeated_blocks``: each repeated block (the
        transformer's ``JointTransformerBlock``; with ``text``, CLIP's and T5's layers: the classes a
        model lists in ``_repeated_blocks`` or ``_no_split_modules``) is compiled once per block type
        and reused by every instance, so compiling takes seconds, not minutes. ``vae``: also the VAE's
        encoder and decoder as wholes (measured on an H200 at 512: the step 42 -> 24 ms, and a lower
        memory peak, for 28 s of compiling; a second image size compiles once more, shape-generic).
        Compiling happens on the first call, once per loaded model. ``mode``: torch.compile's (None:
        its default)."""
        options = {"mode": mode, "backend": backend, "dynamic": False}
        # every compiled block shares Module._call_impl's code object, whose compiled variants
        # (one per block type) are capped by this limit; beyond it dynamo would silently run eager
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        models = [self.transformer] if transformer else []
        if text and self.text_encoder is not None:
            models += [m for m in self.text_encoder.models.values() if m is not None]
        # inductor's float8 upcasts need an Ada or newer GPU: before that, float8 models run as they are
        fp8_ok = backend != "inductor" or self.device.type != "cuda" or policy.compiles(self.device, fp8=True)
        uncompiled = [] if fp8_ok else [m for m in models if any(t.dtype == FP8 for t in m.buffers())]
        for model in models:
            if model in uncompiled:
                continue
            blocks = set(getattr(model, "_repeated_blocks", None) or getattr(model, "_no_split_modules", None) or ())
            found = [m for m in model.modules() if type(m).__name__ in blocks]
            if not found:
                raise ValueError(f"{type(model).__name__} names no repeated blocks to compile ({sorted(blocks)})")
            for module in found:
                module.compile(**options)
        if uncompiled:
            log.info("SD3: %s not compiled: their float8 weights cannot be compiled before Ada GPUs (compute "
                     "capability 8.9)", ", ".join(type(m).__name__ for m in uncompiled))
        if vae:  # dynamic=None: static for the first size, shape-generic from the second on
            self.vae.encoder.compile(**{**options, "dynamic": None})
            self.vae.decoder.compile(**{**options, "dynamic": None})
        self.compiled = True
        log.info("SD3: compiled on first use: the first step at each image size takes about 30 s more, "
                 "once per loaded model")
        return self

    def modules(self) -> list[torch.nn.Module]:
        """Every model of the step (transformer, VAE, text encoders): what moves to offload it."""
        text = [] if self.text_encoder is None else [m for m in self.text_encoder.models.values() if m is not None]
        return [self.transformer, self.vae, *text]

    # --- pieces of the step -------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def conditioning(self, request: SRRequest) -> SD3Conditioning:
        cond: Any = request.conditioning
        if cond is None:
            if self.text_encoder is None:
                raise ValueError("this CoZ model was loaded without text encoders: give precomputed SD3 "
                                 "conditioning (prompt embeddings + pooled) instead of prompts")
            cond = self.text_encoder(request.prompts or [""] * request.batch)
        elif isinstance(cond, (tuple, list)) and len(cond) == 2 and all(isinstance(c, torch.Tensor) for c in cond):
            cond = SD3Conditioning(cond[0], cond[1])
        elif not isinstance(cond, SD3Conditioning):
            cond = SD3Conditioning.from_comfy(cond)
        return cond.expand(request.batch)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """Latent of ``x`` [1, 3, H, W] in [-1, 1]: (sample or mean) * scaling_factor, no shift.

        ``noise`` (the latent's shape): the standard normal draw of the sample, instead of one from
        ``generator`` (whole-image tiles share one noise field where they overlap)."""
        vae = self.vae
        dtype, device = next(vae.parameters()).dtype, next(vae.parameters()).device

        def moments(tile: torch.Tensor) -> torch.Tensor:
            return vae.encode(tile.to(device, dtype)).latent_dist.parameters.float()

        params = tiled_map(moments, x, self.tiles.vae, self.tiles.vae_overlap, scale=1 / 8, align=8)
        mean, logvar = params.chunk(2, dim=1)
        if self.latent_mode == "mean":
            z = mean
        else:
            if noise is None:
                noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32,
                                    device=generator.device if generator is not None else mean.device)
            elif noise.shape != mean.shape:
                raise ValueError(f"noise {tuple(noise.shape)} does not match the latent {tuple(mean.shape)}")
            z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise.to(mean.device)
        return z * vae.config.scaling_factor

    def velocity(self, z: torch.Tensor, cond: SD3Conditioning) -> torch.Tensor:
        """The transformer's prediction at t = 1000 for latent ``z`` [1, C, h, w] (float32 out)."""
        transformer = self.transformer
        device = self.device
        dtype = next(p.dtype for p in transformer.parameters() if p.dtype.itemsize > 1)
        seq = cond.prompt_embeds.to(device, dtype)
        pooled = cond.pooled.to(device, dtype)
        t = torch.full((z.shape[0],), TIMESTEP, device=device, dtype=dtype)

        def run(tile: torch.Tensor) -> torch.Tensor:
            return transformer(hidden_states=tile.to(device, dtype), timestep=t, encoder_hidden_states=seq,
                               pooled_projections=pooled, return_dict=False)[0].float()

        cfg = transformer.config
        tile = self.tiles.latent // 8
        max_cells = cfg.pos_embed_max_size * cfg.patch_size if cfg.pos_embed_max_size else 0
        if max_cells and max(z.shape[-2:]) > max_cells and not 0 < tile <= max_cells:
            tile = max_cells  # beyond SD3's positional-embedding range: tiles are the only way
        return tiled_map(run, z, tile, min(self.tiles.latent_overlap // 8, max(tile - 2, 0)), align=cfg.patch_size)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] (clamped) of latent ``z``: VAE.decode(z / scaling_factor + shift_factor)."""
        vae = self.vae
        dtype, device = next(vae.parameters()).dtype, next(vae.parameters()).device
        latent = z / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)

        def run(tile: torch.Tensor) -> torch.Tensor:
            return vae.decode(tile.to(device, dtype), return_dict=False)[0].float()

        image = tiled_map(run, latent, self.tiles.vae // 8, self.tiles.vae_overlap // 8, scale=8)
        return image.clamp(-1, 1)

    # --- the backbone -------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, request: SRRequest) -> torch.Tensor:
        cond = self.conditioning(request)
        h, w = request.size
        m = self.size_multiple
        pad_h, pad_w = -h % m, -w % m
        generator = None
        if request.seed is not None and self.latent_mode == "sample":
            generator = torch.Generator("cpu").manual_seed(int(request.seed))
        outputs = []
        for i in range(request.batch):
            x = request.zoomed[i:i + 1].float().clamp(0, 1) * 2 - 1
            if pad_h or pad_w:
                x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
            z = self.encode(x, generator)
            row = SD3Conditioning(cond.prompt_embeds[i:i + 1], cond.pooled[i:i + 1])
            z0 = z - self.velocity(z, row)
            image = self.decode(z0)[..., :h, :w]
            outputs.append((image.to(request.zoomed.device) + 1) / 2)
        return torch.cat(outputs).clamp(0, 1)

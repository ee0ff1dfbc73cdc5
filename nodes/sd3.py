"""Loader of CoZ's SR model: SD3 medium + the CoZ LoRA + the CoZ VAE encoder.

It comes back wrapped for the host's model management (host.Hosted): ComfyUI loads its modules
onto the GPU before each step and offloads them when another model (e.g. the VLM) needs the room.
"""
from __future__ import annotations

from pathlib import Path

from ..coz_core import factory, policy
from . import host
from .common import LOADERS, SR_MODEL

NONE = "none"
FROM_CHECKPOINT = "(from the SD3 model)"


def sd3_sources() -> list[str]:
    """SD3 medium as diffusers folders (models/diffusers) and single files (models/checkpoints)."""
    folders = [f"diffusers/{d}" for d in host.list_model_dirs("diffusers", "model_index.json")]
    files = [f"checkpoints/{f}" for f in host.list_files("checkpoints", (".safetensors",))]
    return folders + files


def resolve_sd3(source: str) -> Path:
    """"diffusers/<folder>" or "checkpoints/<file>" -> its path."""
    kind, _, name = source.partition("/")
    if kind not in ("diffusers", "checkpoints") or not name:
        raise ValueError(f"{source!r} is neither diffusers/<folder> nor checkpoints/<file>")
    return host.resolve(kind, name)


def coz_file_lists(files: list[str]) -> tuple[list[str], list[str]]:
    """models/coz files split for the two lists by name: VAE encoders have "vae" in their name
    (vae_encoder_20001.pt), LoRAs are the rest (model_20001.pkl); a list that would be empty
    offers every file (renamed files stay usable)."""
    vae = [f for f in files if "vae" in f.rsplit("/", 1)[-1].lower()]
    lora = [f for f in files if f not in vae]
    return lora or files, vae or files


class LoadCoZSD3:
    DESCRIPTION = ("Loads CoZ's one-step SR model: Stable Diffusion 3 medium (a diffusers folder or the "
                   "single-file checkpoint) with the CoZ LoRA and the CoZ VAE encoder merged in. Text "
                   "encoders come from the SD3 model or separate files; T5 can stay off to save ~10 GB.")
    CATEGORY = LOADERS
    FUNCTION = "load"
    RETURN_TYPES = (SR_MODEL,)
    RETURN_NAMES = ("sr_model",)
    OUTPUT_TOOLTIPS = ("The CoZ SR backbone for CoZ SR Step or CoZ Zoom Chain.",)

    @classmethod
    def INPUT_TYPES(cls):
        coz = host.list_files("coz", (".safetensors", ".pkl", ".pt", ".pth"))
        loras, vae_encoders = coz_file_lists(coz)
        text = [FROM_CHECKPOINT] + host.list_files("text_encoders", (".safetensors",))
        return {
            "required": {
                "sd3": (sd3_sources(), {"tooltip": "SD3 medium: a folder in models/diffusers or "
                                                   "sd3_medium.safetensors in models/checkpoints."}),
                "coz_lora": ([NONE] + loras, {"tooltip": "CoZ's SR LoRA (model_20001.pkl or its .safetensors) "
                                              "in models/coz, or Wan2GP's CoZ_sd3_medium_srlora_bf16.safetensors "
                                              "(replaces SD3's transformer). none = plain SD3 (for comparisons "
                                              "only)."}),
                "coz_vae_encoder": ([NONE] + vae_encoders, {"tooltip": "CoZ's VAE encoder (vae_encoder_20001.pt "
                                                     "or its .safetensors) in models/coz, or Wan2GP's "
                                                     "CoZ_sd3_vae_srlora_bf16.safetensors (replaces SD3's VAE)."}),
                "clip_l": (text, {"tooltip": "CLIP-L text encoder file (models/text_encoders), "
                                             "or the SD3 model's own."}),
                "clip_g": (text, {"tooltip": "CLIP-G text encoder file (models/text_encoders), "
                                             "or the SD3 model's own."}),
                "t5": (text, {"tooltip": "T5-XXL text encoder file (models/text_encoders), or the SD3 model's own."}),
                "use_t5": ("BOOLEAN", {"default": True, "tooltip":
                                       "Off: no T5 (saves ~10 GB; SD3 gets zeros in its place)."}),
                "text_encoders": ("BOOLEAN", {"default": True, "tooltip":
                                              "Off: load no text encoder; give SR Step CONDITIONING from "
                                              "CLIPTextEncode instead of prompt text."}),
                "precision": (list(policy.SD3_PRESETS), {"default": "auto", "tooltip":
                                                         "auto (the pack's one policy, as on the command line): "
                                                         "transformer bf16 (fp16 on older GPUs and MPS, fp32 on "
                                                         "CPUs without native bf16), VAE fp32 as the reference, "
                                                         "CLIPs fp16 on GPUs, T5 bf16; on GPUs under 32 GiB T5 in "
                                                         "fp8, under 22 GiB compact, under 15 GiB lowvram (the "
                                                         "console says which). fp32 / bf16 / fp16: every part in that "
                                                         "dtype (T5 never in fp16: it overflows). "
                                                         "reference: upstream's arithmetic bit for bit (slower). "
                                                         "fast: bf16 VAE (fp32 "
                                                         "without bf16), compiled on CUDA where Triton is installed "
                                                         "(on Windows: triton-windows). compact: fast with fp8 "
                                                         "transformer, CLIPs and T5 (every model within 16 GiB with "
                                                         "the VLM). lowvram: compact, "
                                                         "not compiled; ComfyUI moves the VLM and SD3 in turn."}),
            },
        }

    def load(self, sd3, coz_lora, coz_vae_encoder, clip_l, clip_g, t5, use_t5, text_encoders, precision):
        text_parts = (("clip_l", "clip_g", "t5") if use_t5 else ("clip_l", "clip_g")) if text_encoders else ()
        files = {name: None if value == FROM_CHECKPOINT else host.resolve("text_encoders", value)
                 for name, value in (("clip_l", clip_l), ("clip_g", clip_g), ("t5", t5))}
        source = resolve_sd3(sd3)
        backbone = factory.sd3_backbone(
            source,
            None if coz_lora == NONE else host.resolve("coz", coz_lora),
            None if coz_vae_encoder == NONE else host.resolve("coz", coz_vae_encoder),
            host.torch_device(), precision, **files, text_encoders=text_parts,
            # a single file has no tokenizers: the host's (a diffusers folder brings its own)
            tokenizers=None if source.is_dir() else host.host_tokenizers() or None,
            load_device=host.offload_device(),
        )
        modules = {"SD3 transformer": backbone.transformer, "SD3 VAE": backbone.vae}
        if backbone.text_encoder is not None:
            modules.update({f"SD3 {name}": m for name, m in backbone.text_encoder.models.items() if m is not None})
        return (host.Hosted(backbone, modules),)


NODE_CLASS_MAPPINGS = {"CoZLoadSD3": LoadCoZSD3}
NODE_DISPLAY_NAME_MAPPINGS = {"CoZLoadSD3": "CoZ Load SR Model (SD3)"}

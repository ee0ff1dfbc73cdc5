"""Loader of the VLM that writes CoZ's prompts (Qwen2.5-VL + an optional LoRA adapter).

It comes back wrapped for the host's model management (host.Hosted): ComfyUI loads it onto the
GPU for each prompt and offloads it when the SR model needs the room.
"""
from __future__ import annotations

from ..coz_core import factory, policy
from . import host
from .common import LOADERS, PRECISION_TOOLTIP, VLM

NONE = "none"


class LoadVLM:
    DESCRIPTION = ("Loads the vision-language model that writes CoZ's prompts: a Qwen2.5-VL folder in "
                   "models/LLM (e.g. Qwen2.5-VL-3B-Instruct), with an optional LoRA adapter (a fine-tuned "
                   "prompt extractor).")
    CATEGORY = LOADERS
    FUNCTION = "load"
    RETURN_TYPES = (VLM,)
    RETURN_NAMES = ("vlm",)
    OUTPUT_TOOLTIPS = ("The prompt extractor for CoZ VLM Prompt or CoZ Zoom Chain.",)

    @classmethod
    def INPUT_TYPES(cls):
        adapters = set(host.list_model_dirs("LLM", "adapter_config.json"))
        folders = [d for d in host.list_model_dirs("LLM") if d not in adapters]
        return {
            "required": {
                "model": (folders, {"tooltip": "A Qwen2.5-VL folder in models/LLM."}),
                "adapter": ([NONE] + sorted(adapters), {"tooltip":
                                                        "A PEFT LoRA adapter folder in models/LLM, merged into the model."}),
                "precision": (list(policy.PRECISIONS), {"default": "auto", "tooltip": PRECISION_TOOLTIP}),
                "max_new_tokens": ("INT", {"default": policy.VLM_TOKENS, "min": 8, "max": 1024, "tooltip":
                                           "Longest answer in tokens (CoZ's current code: 32; its first "
                                           "release: 128). Longer answers cost time on every step."}),
            },
        }

    def load(self, model, adapter, precision, max_new_tokens):
        source = factory.vlm_prompt_source(
            host.resolve("LLM", model), host.torch_device(), precision,
            adapter=None if adapter == NONE else host.resolve("LLM", adapter),
            max_new_tokens=int(max_new_tokens), load_device=host.offload_device())
        return (host.Hosted(source, {"Qwen2.5-VL": source.vlm.model}),)


NODE_CLASS_MAPPINGS = {"CoZLoadVLM": LoadVLM}
NODE_DISPLAY_NAME_MAPPINGS = {"CoZLoadVLM": "CoZ Load VLM"}
